"""The benchmark dataset: a random reference, Illumina-like 150 bp pairs (bams3.sample), aligned
by a real aligner, coordinate-sorted and indexed with samtools.

Built once per parameter set and cached under ``bench/cache/<key>/`` (gitignored). The key
hashes every input that changes the bytes: pairs, seed, genome layout, aligner and its version,
samtools version and the source of ``bams3/sample.py``.

Files in a cache entry::

    ref.fa(.fai, bwa index)   the reference
    reads_1.fq.gz reads_2.fq.gz
    aligned.bam               aligner order (read-name grouped, i.e. unsorted)
    quarter.bam               the first quarter of aligned.bam (pairs kept together)
    sorted.bam sorted.bam.bai coordinate-sorted + indexed
    meta.json                 parameters, record counts, contigs, versions
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import util
from .util import log, run

READ_LEN = 150
CONTIG_FRACTIONS = (0.5, 1 / 3, 1 / 6)  # three contigs of decreasing size


@dataclass
class DataParams:
    pairs: int
    seed: int = 1
    depth: float = 25.0
    genome_size: int | None = None  # default: pairs * 2 * 150 / depth
    aligner: str = "bwa"  # bwa | minimap2 | truth
    qual_mode: str = "binned"  # bams3.sample: "binned" (2/12/23/32/37/41) or "full" (2..41)
    threads: int = 2

    def contig_lengths(self) -> list[int]:
        g = self.genome_size or int(self.pairs * 2 * READ_LEN / self.depth)
        g = max(g, 50_000)
        return [max(10_000, int(round(g * f, -3))) for f in CONTIG_FRACTIONS]


@dataclass
class Dataset:
    root: Path
    params: DataParams
    meta: dict = field(default_factory=dict)

    ref = property(lambda self: self.root / "ref.fa")
    aligned = property(lambda self: self.root / "aligned.bam")
    quarter = property(lambda self: self.root / "quarter.bam")
    sorted_bam = property(lambda self: self.root / "sorted.bam")

    @property
    def n_records(self) -> int:
        return self.meta["n_records"]

    @property
    def contigs(self) -> list[tuple[str, int]]:
        return [tuple(c) for c in self.meta["contigs"]]


def _sample_module():
    """bams3.sample, the project's generator: the same data everywhere."""
    try:
        from bams3 import sample
    except ImportError as e:
        raise RuntimeError(f"cannot import bams3.sample ({e}); the benchmark data comes from it") from e
    return sample


def _sample_source_hash() -> str:
    return hashlib.sha256(inspect.getsource(_sample_module()).encode()).hexdigest()[:12]


def _contigs(p: DataParams) -> list[tuple[str, int]]:
    return [(f"chr{i + 1}", n) for i, n in enumerate(p.contig_lengths())]


def _simulate(p: DataParams, d: Path):
    """ref.fa (+ .fai) and the simulated pairs; FASTQ too unless the truth BAM is the alignment."""
    sample = _sample_module()
    ref = sample.make_reference(d / "ref.fa", _contigs(p), seed=p.seed)
    pairs = sample.simulate_pairs(ref, p.pairs, seed=p.seed, read_len=READ_LEN,
                                  qual_mode=p.qual_mode)
    if p.aligner != "truth":
        sample.write_fastq(pairs, d / "reads_1.fq.gz", d / "reads_2.fq.gz")
    return sample, ref, pairs


def cache_key(p: DataParams) -> tuple[str, dict]:
    aligner_v = util.tool_version(p.aligner) if p.aligner in ("bwa", "minimap2") else "truth"
    desc = {
        "pairs": p.pairs, "seed": p.seed, "contigs": p.contig_lengths(), "read_len": READ_LEN,
        "qual_mode": p.qual_mode, "aligner": p.aligner, "aligner_version": aligner_v,
        "samtools": util.tool_version("samtools"), "sample_src": _sample_source_hash(),
        "layout": 3,
    }
    h = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:10]
    return f"{p.pairs // 1000}kpairs-s{p.seed}-{p.aligner}-{p.qual_mode}-{h}", desc


def load_or_build(p: DataParams, cache_dir: Path, *, timeout: float) -> Dataset:
    """The cached dataset for ``p``, building it first if needed (atomically, via a temp dir)."""
    key, desc = cache_key(p)
    root = cache_dir / key
    meta_path = root / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        log(f"dataset: cached {root} ({meta['n_records']:,} records)")
        return Dataset(root, p, meta)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    try:
        meta = _build(p, tmp, desc, timeout=timeout)
        meta["build_seconds"] = round(time.time() - t0, 1)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"dataset: built {root} in {meta['build_seconds']:.0f}s ({meta['n_records']:,} records)")
    return Dataset(root, p, meta)


def _build(p: DataParams, d: Path, desc: dict, *, timeout: float) -> dict:
    lengths = p.contig_lengths()
    log(f"dataset: building {p.pairs:,} pairs, genome {sum(lengths):,} bp in {len(lengths)} contigs, "
        f"aligner {p.aligner} (cached afterwards)")
    t = time.time()
    sample, sref, pairs = _simulate(p, d)
    gen = {"generator": f"bams3.sample (qual_mode={p.qual_mode})", "params": pairs.params}
    log(f"dataset: simulated reads in {time.time() - t:.0f}s")
    ref, r1, r2 = d / "ref.fa", d / "reads_1.fq.gz", d / "reads_2.fq.gz"
    rg = r"@RG\tID:bench\tSM:bench\tPL:ILLUMINA"
    t = time.time()
    if p.aligner == "bwa":
        run(["bwa", "index", ref], timeout=timeout)
        # -K fixes the batch size so the output does not depend on the thread count
        align = ["bwa", "mem", "-t", p.threads, "-K", 10_000_000, "-R", rg, ref, r1, r2]
    elif p.aligner == "minimap2":
        align = ["minimap2", "-ax", "sr", "-t", p.threads, "-R", rg, ref, r1, r2]
    else:
        align = None
    if align is not None:
        run(["samtools", "view", "-b", "-o", d / "aligned.bam", "-"], producer=align,
            timeout=timeout)
        log(f"dataset: aligned with {p.aligner} in {time.time() - t:.0f}s")
    else:  # the simulator's own alignments, in pair order (unsorted)
        sample.write_truth_bam(sref, pairs, d / "aligned.bam", sort=False, threads=p.threads)
        log(f"dataset: wrote the truth BAM (no aligner) in {time.time() - t:.0f}s")
    del pairs, sref
    run(["samtools", "sort", "-@", p.threads, "-m", "256M", "-T", d / "sorttmp",
         "-o", d / "sorted.bam", d / "aligned.bam"], timeout=timeout)
    run(["samtools", "index", d / "sorted.bam"], timeout=timeout)
    n_quarter = _write_quarter(d / "aligned.bam", d / "quarter.bam")
    n = int(run(["samtools", "view", "-c", d / "sorted.bam"], capture=True,
                timeout=timeout).stdout)
    import pysam

    with pysam.AlignmentFile(str(d / "sorted.bam")) as f:
        contigs = [[c, f.get_reference_length(c)] for c in f.references]
    return {"params": asdict(p), "key": desc, "generator": gen, "n_records": n,
            "n_records_quarter": n_quarter, "contigs": contigs, "genome_size": sum(lengths),
            "depth": round(p.pairs * 2 * READ_LEN / sum(lengths), 1),
            "bytes": {f: (d / f).stat().st_size for f in
                      ("aligned.bam", "quarter.bam", "sorted.bam", "sorted.bam.bai")}}


def _write_quarter(src: Path, dst: Path) -> int:
    """The first quarter of ``src``'s records (aligner order), never splitting a read name."""
    import pysam

    with pysam.AlignmentFile(str(src), "rb") as f:
        total = f.mapped + f.unmapped if f.has_index() else None
    if total is None:
        total = int(run(["samtools", "view", "-c", src], capture=True, timeout=3600).stdout)
    want = total // 4
    n = 0
    with pysam.AlignmentFile(str(src), "rb") as f, \
            pysam.AlignmentFile(str(dst), "wb", template=f) as out:
        last = None
        for rec in f:
            if n >= want and rec.query_name != last:
                break
            out.write(rec)
            last = rec.query_name
            n += 1
    return n
