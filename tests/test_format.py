"""Format v1 + CLI against samtools (pysam's bundled samtools is the oracle).

- every lossless corpus case: export and query text == samtools view --no-PG -h of the source
- a simulated paired-end dataset (>100k records): 200+ regions, record-for-record vs samtools
- stats == samtools flagstat -O json / idxstats; verify catches a flipped byte
- unsorted stdin with a tiny --max-memory == the dataset of the samtools-sorted input
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pysam
import pytest

from bams3.dataset import Dataset
from bams3.output import write_sam
from bams3.store import LocalStore
from conftest_data import run_cli, samtools_sort, samtools_view
from corpus import build_corpus, reference_for

UNSORTED_CASES = {"unsorted", "queryname", "header_malformed"}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return {k: Path(v) for k, v in build_corpus(d).items()}


@pytest.fixture(scope="session")
def corpus_datasets(corpus, tmp_path_factory):
    """Every corpus file converted with tiny blocks/chunks (many borders)."""
    out = tmp_path_factory.mktemp("corpus_ds")
    result = {}
    for name, path in corpus.items():
        ds = out / name
        args = ["convert", "-q", "--block-size", "4K", "--chunk-size", "16K", path, ds]
        if name == "cram":
            args += ["--reference", reference_for(path)]
        run_cli(*args)
        result[name] = ds
    return result


def _expected_text(name, path, tmp_path) -> str:
    """samtools' text for the source: sorted with samtools sort when the source isn't."""
    args = ["--no-PG", "-h"]
    if name == "cram":
        args += ["-T", reference_for(path)]
    if name in UNSORTED_CASES or name == "no_hd":
        head = samtools_view("--no-PG", "-H", path)
        if "SO:coordinate" not in head:
            return samtools_view("--no-PG", "-h", samtools_sort(path, tmp_path / f"{name}.sorted.bam"))
    return samtools_view(*args, path)


@pytest.mark.parametrize("name", [
    "tags", "tags_sam", "long_cigar", "long_read", "seq_qual_missing", "iupac", "mates", "sec_supp", "ties",
    "contig_edges", "zero_span", "header_full", "odd_contigs", "many_contigs", "unsorted", "queryname", "no_hd",
    "empty", "cram", "simulated",
])
def test_lossless_corpus(name, corpus, corpus_datasets, tmp_path):
    src, ds = corpus[name], corpus_datasets[name]
    expected = _expected_text(name, src, tmp_path)
    out_bam = tmp_path / "export.bam"
    run_cli("export", ds, out_bam)
    assert (tmp_path / "export.bam.bai").exists()
    assert samtools_view("--no-PG", "-h", out_bam) == expected
    q = run_cli("query", "--no-PG", "-h", ds)
    assert q.stdout.decode() == expected
    assert run_cli("verify", ds).returncode == 0


def test_header_with_unparseable_line_is_kept(corpus, corpus_datasets):
    """`@XY\\tfoo:bar` is refused by htslib's header parser (samtools sort fails on it);
    bams3 keeps the header text verbatim and sorts the records."""
    src, ds = corpus["header_malformed"], corpus_datasets["header_malformed"]
    store = LocalStore(str(ds))
    d = Dataset.open(store)
    src_head = samtools_view("--no-PG", "-H", src).splitlines()
    got_head = d.header_text().splitlines()
    assert got_head[0].endswith("SO:coordinate")
    assert got_head[1:] == src_head[1:]
    got = run_cli("query", ds).stdout.decode().splitlines()
    assert sorted(got) == sorted(samtools_view("--no-PG", src).splitlines())


def test_tag_types_survive(corpus_datasets, corpus):
    """Integer tag widths (c C s S i I) are invisible in SAM text: compare the BAM records."""
    ds = Dataset.open(LocalStore(str(corpus_datasets["tags"])))
    raw = b"".join(bytes(b.raw()) for b in ds.query(None))
    with pysam.AlignmentFile(str(corpus["tags"])) as f:
        want = []
        for rec in f:
            want.append([(t, v, ty) for t, v, ty in rec.get_tags(with_value_type=True)])
    got = []
    out = io.BytesIO()
    from bams3.output import iter_segments

    for af in iter_segments(ds.bam_header(), ds.query(None)):
        for rec in af:
            got.append([(t, v, ty) for t, v, ty in rec.get_tags(with_value_type=True)])
    assert len(raw) > 0
    assert repr(got) == repr(want)


# -- the simulated dataset ----------------------------------------------------------------
@pytest.fixture(scope="session")
def sim(tmp_path_factory):
    from bams3.sample import make_sample

    d = tmp_path_factory.mktemp("sim")
    paths = make_sample(d, n_pairs=52000, seed=7)
    ds = d / "ds"
    run_cli("convert", "-q", "--block-size", "64K", "--chunk-size", "512K", paths["bam"], ds)
    return {"bam": Path(paths["bam"]), "ds": ds, "dir": d, "ref": paths["reference"]}


def _features(bam):
    n = spliced = longdel = clipped = 0
    with pysam.AlignmentFile(str(bam)) as f:
        for r in f:
            n += 1
            ops = r.cigartuples or []
            spliced += any(op == 3 for op, _ in ops)
            longdel += any(op == 2 and ln >= 50 for op, ln in ops)
            clipped += any(op in (4, 5) for op, _ in ops)
    return n, spliced, longdel, clipped


def test_sim_dataset_is_realistic(sim):
    n, spliced, longdel, clipped = _features(sim["bam"])
    assert n >= 100_000
    assert spliced > 100 and longdel > 100 and clipped > 1000
    quals = set()
    with pysam.AlignmentFile(str(sim["bam"])) as f:
        for i, r in enumerate(f):
            if r.query_qualities is not None:
                quals.update(r.query_qualities)
            if i > 2000:
                break
    assert len(quals) >= 4  # not a constant quality string
    m = Dataset.open(LocalStore(str(sim["ds"]))).manifest
    assert len(m.chunks) >= 8  # many chunk borders


def _regions(sim, rnd: random.Random) -> list[str]:
    ds = Dataset.open(LocalStore(str(sim["ds"])))
    m = ds.manifest
    refs = [(r["name"], r["length"]) for r in m.references]
    regions = []
    # block and chunk borders, and reads spanning them
    for ix in m.index:
        if ix.ref_id < 0:
            continue
        rows = ds.index(ix.ref_id)
        name = refs[ix.ref_id][0]
        for r in rows[rnd.sample(range(len(rows)), min(len(rows), 40))]:
            a, b = int(r["first_start"]), int(r["last_start"])
            regions.append(f"{name}:{a + 1}-{a + 1}")
            regions.append(f"{name}:{max(1, b - 50)}-{b + 300}")
            regions.append(f"{name}:{b + 1}")  # chr:beg (to the end)
    while len(regions) < 210:
        name, length = rnd.choice(refs)
        span = rnd.choice([1, 10, 150, 1000, 5000, 100_000])
        beg = rnd.randint(1, max(1, length - 1))
        end = min(length, beg + span)
        regions.append(f"{name}:{beg:,}-{end:,}" if rnd.random() < 0.3 else f"{name}:{beg}-{end}")
    regions += [refs[0][0], "*", f"{refs[0][0]}:-1000", f"{{{refs[0][0]}}}:100-2000"]
    if any(":" in n for n, _ in refs):
        odd = next(n for n, _ in refs if ":" in n)
        regions += [f"{{{odd}}}", f"{{{odd}}}:1-5000"]
    return regions


def test_regions_match_samtools(sim):
    rnd = random.Random(11)
    regions = _regions(sim, rnd)
    assert len(regions) >= 200
    ds = Dataset.open(LocalStore(str(sim["ds"])))
    nonempty = 0
    for reg in regions:
        want = samtools_view(sim["bam"], reg)
        out = io.BytesIO()
        write_sam(ds.header, ds.query([ds.parse_region(reg)]), out, with_header=False)
        got = out.getvalue().decode()
        assert got == want, f"region {reg}"
        nonempty += bool(want)
    assert nonempty > 150


def test_multi_region_like_samtools(sim):
    ds = sim["ds"]
    regs = ["chr1:10000-20000", "chr1:15000-30000", "chr2:1-5000"]
    assert run_cli("query", ds, *regs).stdout.decode() == samtools_view(sim["bam"], *regs)
    assert run_cli("query", "-M", ds, *regs).stdout.decode() == samtools_view("-M", sim["bam"], *regs)
    assert run_cli("query", "-c", ds, *regs).stdout.decode() == samtools_view("-c", sim["bam"], *regs)


def test_query_bam_output(sim, tmp_path):
    out = tmp_path / "r.bam"
    run_cli("query", "-b", "-o", out, sim["ds"], "chr2:1000-90000")
    assert samtools_view(out) == samtools_view(sim["bam"], "chr2:1000-90000")
    assert (tmp_path / "r.bam.bai").exists()


def test_export_region_and_whole(sim, tmp_path):
    out = tmp_path / "all.bam"
    run_cli("export", sim["ds"], out)
    assert samtools_view("--no-PG", "-h", out) == samtools_view("--no-PG", "-h", sim["bam"])
    part = tmp_path / "part.bam"
    run_cli("export", sim["ds"], part, "--region", "chr1:5000-60000")
    assert samtools_view(part) == samtools_view("-M", sim["bam"], "chr1:5000-60000")


def test_stats_equal_samtools(sim):
    r = run_cli("stats", "--json", sim["ds"])
    obj = json.loads(r.stdout)
    assert obj["flagstat"] == json.loads(pysam.samtools.flagstat("-O", "json", str(sim["bam"])))
    want_idx = [[f[0], int(f[1]), int(f[2]), int(f[3])] for f in
                (line.split("\t") for line in pysam.samtools.idxstats(str(sim["bam"])).splitlines())]
    assert obj["idxstats"] == want_idx
    assert run_cli("stats", "--flagstat", sim["ds"]).stdout.decode() == pysam.samtools.flagstat(str(sim["bam"]))
    assert run_cli("stats", "--idxstats", sim["ds"]).stdout.decode() == pysam.samtools.idxstats(str(sim["bam"]))


def test_stats_reads_no_chunk(sim, tmp_path):
    """stats answers from the manifest alone: it works with every chunk and index removed."""
    ds = tmp_path / "ds"
    shutil.copytree(sim["ds"], ds)
    for p in ds.glob("data/*/chunks/*"):
        p.unlink()
    for p in ds.glob("data/*/index/*"):
        p.unlink()
    r = run_cli("stats", "--json", ds)
    assert json.loads(r.stdout)["flagstat"] == json.loads(pysam.samtools.flagstat("-O", "json", str(sim["bam"])))


def test_corpus_stats(corpus, corpus_datasets):
    for name in ("mates", "sec_supp", "many_contigs", "empty"):
        obj = json.loads(run_cli("stats", "--json", corpus_datasets[name]).stdout)
        assert obj["flagstat"] == json.loads(pysam.samtools.flagstat("-O", "json", str(corpus[name]))), name


def test_verify_catches_flipped_byte(sim, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(sim["ds"], ds)
    assert run_cli("verify", ds).returncode == 0
    chunk = sorted(ds.glob("data/*/chunks/*.b3c"))[3]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    r = run_cli("verify", ds, check=False)
    assert r.returncode != 0
    assert b"mismatch" in r.stderr
    # a whole-dataset query hits the corrupt block: one clear line, no traceback
    r = run_cli("query", ds, check=False)
    assert r.returncode != 0
    err = r.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "checksum mismatch" in err[0] and "Traceback" not in r.stderr.decode()


def test_unsorted_stdin_tiny_memory_equals_sorted(sim, tmp_path):
    """Aligner-order SAM on stdin, sorted in 1 MiB runs, gives the dataset of `samtools sort`."""
    # pair (name) order, as an aligner writes it
    by_name = tmp_path / "byname.bam"
    pysam.samtools.sort("--no-PG", "-n", "-o", str(by_name), str(sim["bam"]), catch_stdout=False)
    text = pysam.samtools.view("--no-PG", "-h", str(by_name))
    text = text.replace("SO:queryname", "SO:unsorted", 1)
    resorted = samtools_sort(by_name, tmp_path / "resorted.bam")
    a, b = tmp_path / "from_stdin", tmp_path / "from_sorted"
    r = run_cli("convert", "-m", "1M", "--block-size", "64K", "--chunk-size", "512K", "-", a,
                input_bytes=text.encode())
    assert b"records" in r.stderr
    run_cli("convert", "-q", "--block-size", "64K", "--chunk-size", "512K", resorted, b)
    qa = run_cli("query", "--no-PG", "-h", a).stdout
    qb = run_cli("query", "--no-PG", "-h", b).stdout
    assert qa == qb == samtools_view("--no-PG", "-h", resorted).encode()
    ma = Dataset.open(LocalStore(str(a))).manifest
    mb = Dataset.open(LocalStore(str(b))).manifest
    assert [c.sha256 for c in ma.chunks] == [c.sha256 for c in mb.chunks]
    assert ma.stats == mb.stats and ma.sorted_by == "bams3"
    assert not list(a.glob("_tmp/**/*"))  # spill runs removed on commit


def test_bam_on_stdin(sim, tmp_path):
    out = tmp_path / "ds"
    run_cli("convert", "-q", "-", out, input_bytes=sim["bam"].read_bytes())
    assert run_cli("query", out, "chr1:1-20000").stdout.decode() == samtools_view(sim["bam"], "chr1:1-20000")


def test_one_region_decodes_at_most_one_extra_block(sim):
    """A 1 kb query reads only the blocks that can overlap it."""
    ds = Dataset.open(LocalStore(str(sim["ds"])))
    rows = ds.index(0)
    mid = rows[len(rows) // 2]
    start = int(mid["first_start"]) + 10
    reg = ds.parse_region(f"{ds.manifest.references[0]['name']}:{start}-{start + 1000}")
    n = sum(len(b) for b in ds.query([reg]))
    q = ds.qstats
    assert n > 0 and q.requests == 1
    assert q.blocks <= q.blocks_with_hits + 1


def _mates_reference(refid, pos, nref, npos, tlen, names, max_distance):
    """find_mates by brute force: the nearest earlier record whose forward key equals this
    record's reverse key, within max_distance; then no link may point at a linked record."""
    n = len(pos)
    link = [0] * n
    for i in range(n):
        for j in range(i - 1, -1, -1):
            if (names[j], refid[j], pos[j], nref[j], npos[j], -tlen[j]) == \
                    (names[i], nref[i], npos[i], refid[i], pos[i], tlen[i]):
                link[i] = i - j if i - j <= max_distance else 0
                break
    return [0 if link[i] and link[i - link[i]] else link[i] for i in range(n)]


def test_find_mates_matches_brute_force():
    from bams3core import codec

    rng = np.random.default_rng(11)
    for trial in range(30):
        n = int(rng.integers(2, 300))
        # few names, positions and references: many near-matches, repeats and chains
        names = [b"r%d" % rng.integers(0, max(2, n // 3)) for _ in range(n)]
        refid = rng.integers(-1, 2, n)
        pos = rng.integers(0, 6, n)
        nref = rng.integers(-1, 2, n)
        npos = rng.integers(0, 6, n)
        tlen = rng.integers(-3, 4, n)
        for i in range(1, n):  # plant real mate pairs
            if rng.random() < 0.4:
                j = int(rng.integers(0, i))
                names[i], nref[i], npos[i], refid[i], pos[i], tlen[i] = \
                    names[j], refid[j], pos[j], nref[j], npos[j], -tlen[j]
        raw = b"".join(nm + b"\0" for nm in names)
        l_name = np.array([len(nm) + 1 for nm in names], dtype=np.int64)
        got = codec.find_mates(refid, pos, nref, npos, tlen, np.frombuffer(raw, dtype=np.uint8), l_name)
        want = _mates_reference(list(refid), list(pos), list(nref), list(npos), list(tlen), names,
                                codec.MAX_MATE_DISTANCE)
        assert got.tolist() == want, trial
        assert any(want) or n < 10


def _flagstat_reference(flag, mapq, refid, next_refid):
    """samtools bam_stat.c rules, one record at a time (the reference for the kernel)."""
    out = np.zeros((2, 16), dtype=np.int64)
    for f, q, r, nr in zip(flag.tolist(), mapq.tolist(), refid.tolist(), next_refid.tolist()):
        row = 1 if f & 0x200 else 0
        mapped, mmapped = not f & 0x4, not f & 0x8
        sec = bool(f & 0x100)
        sup = not sec and bool(f & 0x800)
        prim = not sec and not sup
        paired = prim and bool(f & 0x1)
        dup = bool(f & 0x400)
        both = paired and mapped and mmapped
        diff = both and nr != r
        cols = [True, prim, sec, sup, dup, prim and dup, mapped, prim and mapped, paired,
                paired and bool(f & 0x40), paired and bool(f & 0x80),
                paired and bool(f & 0x2) and mapped, both, paired and not mmapped and mapped,
                diff, diff and q >= 5]
        out[row] += np.array(cols, dtype=np.int64)
    return out


def test_flagstat_counts_match_per_record_rules():
    from bams3core.bam import FIXED_DTYPE
    from bams3core.stats import flagstat_counts

    rng = np.random.default_rng(7)
    fx = np.zeros(5000, dtype=FIXED_DTYPE)
    fx["flag"] = rng.integers(0, 1 << 12, len(fx))
    fx["mapq"] = rng.integers(0, 10, len(fx))
    fx["refid"] = rng.integers(-1, 3, len(fx))
    fx["next_refid"] = rng.integers(-1, 3, len(fx))
    got = flagstat_counts(fx)
    assert got.tolist() == _flagstat_reference(fx["flag"], fx["mapq"], fx["refid"], fx["next_refid"]).tolist()
    assert got[0].sum() > 0 and got[1].sum() > 0
    assert flagstat_counts(fx[:0]).tolist() == [[0] * 16, [0] * 16]
