"""The measurements. Each one measures bams3 and its anchor in the same run and appends rows.

Failures of the product (bams3 exits non-zero, is not installed, prints different records than
samtools) are recorded in the rows (ERROR / n/a / FAIL) and the run goes on; failures of the
anchors or of the harness itself raise.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bams3core.sorting import parse_size

from . import bai, util
from .data import Dataset
from .report import ERROR, NA, Goal, Row
from .s3 import S3Env, base_env
from .util import CommandError, best_of, human_bytes, log, run

MiB = 1 << 20


# ---------------------------------------------------------------------------------------------
# the bams3 command line
# ---------------------------------------------------------------------------------------------
@dataclass
class Bams3Cli:
    cmd: list | None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.cmd is not None

    @classmethod
    def find(cls, override: str | None = None, timeout: float = 120) -> "Bams3Cli":
        """This repository's bams3, run as ``python -m bams3.cli`` with the repo on PYTHONPATH
        (so the code measured is the working tree's, whether or not it is pip-installed), or
        ``override`` (a command line, e.g. "bams3")."""
        cmd = [sys.executable, "-m", "bams3.cli"]
        if override:
            cmd = shlex.split(override)
        elif not (util.REPO / "bams3" / "cli.py").exists():
            exe = shutil.which("bams3", path=os.path.dirname(sys.executable)) or shutil.which("bams3")
            if exe is None:
                return cls(None, "bams3 not installed (no bams3/cli.py, no bams3 executable)")
            cmd = [exe]
        try:
            r = subprocess.run([*cmd, "--help"], env=base_env(), capture_output=True, text=True,
                               timeout=timeout)
        except (OSError, subprocess.SubprocessError) as e:
            return cls(None, f"bams3 not runnable: {e}")
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["?"])[-1]
            return cls(None, f"bams3 not runnable: `{util.fmt_cmd(cmd)} --help` exited "
                             f"{r.returncode}: {tail}")
        for sub in ("convert", "query", "stats"):
            if sub not in r.stdout:
                return cls(None, f"bams3 CLI has no `{sub}` command yet")
        return cls(cmd)

    def __call__(self, *args) -> list:
        return [*self.cmd, *[str(a) for a in args]]


# ---------------------------------------------------------------------------------------------
# context and row helpers
# ---------------------------------------------------------------------------------------------
@dataclass
class Ctx:
    ds: Dataset
    work: Path
    bams3: Bams3Cli
    repeat: int = 3
    sweep_repeat: int = 1
    timeout: float = 1800
    threads: int = 2
    max_memory: str = "64M"
    part_sizes_mib: tuple = (5, 8, 16)
    concurrencies: tuple = (1, 2, 4)
    rows: list = field(default_factory=list)
    details: list = field(default_factory=list)
    commands: list = field(default_factory=list)
    sweep: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    s3: S3Env | None = None
    local_convert_best: float | None = None
    local_dataset_bytes: int | None = None
    s3_dataset_bytes: int | None = None
    s3_dataset_ready: bool = False

    def row(self, section, figure, unit, bams3=None, anchor_name="", anchor=None, goal=None,
            missing=None, note="", **kw) -> Row:
        """Append a row. ``missing`` = (status, text) when bams3's value could not be measured."""
        r = Row(section, figure, unit, bams3=bams3, anchor_name=anchor_name, anchor=anchor,
                goal=goal, note=note, **kw)
        if bams3 is None and missing is not None:
            r.status = missing[0]
            r.note = "; ".join(filter(None, [missing[1], note]))
            r.bams3_text = "error" if r.status == ERROR else (
                "n/a (bams3 not installed)" if not self.bams3.ok else "n/a")
        self.rows.append(r.evaluate())
        return r

    def cmdlog(self, label: str, cmd, producer=None) -> None:
        def short(c):
            out = []
            for x in c:
                x = str(x).replace(str(self.work) + "/", "$WORK/")
                x = x.replace(str(self.ds.root) + "/", "$DATA/").replace(sys.executable, "python")
                out.append(x if x.startswith("$") else util.fmt_cmd([x]))
            return " ".join(out)

        text = (short(producer) + " | " if producer else "") + short(cmd)
        if (label, text) not in self.commands:
            self.commands.append((label, text))

    def fresh(self, name: str) -> Path:
        p = self.work / name
        shutil.rmtree(p, ignore_errors=True)
        return p

    def attempt(self, what: str, fn):
        """Run a bams3 measurement; return (value, None) or (None, (status, why))."""
        if not self.bams3.ok:
            return None, (NA, f"n/a ({self.bams3.reason})")
        try:
            return fn(), None
        except CommandError as e:
            msg = str(e).splitlines()
            why = " / ".join(m.strip() for m in msg[-3:])
            log(f"ERROR in {what}: {e}")
            self.errors.append(f"{what}: {e}")
            return None, (ERROR, f"error: {why[:300]}")


#: issue #14: peak RSS of `convert -` on unsorted input may exceed --max-memory by this much
RSS_OVER_BUDGET = 160 * MiB


def _mib(s: str) -> float:
    return parse_size(s) / MiB


# ---------------------------------------------------------------------------------------------
# convert throughput (and the local dataset used for the size figure) + peak memory
# ---------------------------------------------------------------------------------------------
def convert_local(ctx: Ctx) -> None:
    ds, T, N = ctx.ds, ctx.threads, ctx.repeat
    sec = "convert throughput (2 threads)"
    n, nq = ds.n_records, ds.meta["n_records_quarter"]
    out_bam, out_cram = ctx.work / "anchor.bam", ctx.work / "anchor.cram"
    env = base_env()
    env["BAMS3_CACHE_DIR"] = str(ctx.work / "cache-local")
    to = ctx.timeout

    sam_b = ["samtools", "view", "-@", T, "-b", "-o", out_bam]
    sam_c = ["samtools", "view", "-@", T, "-C", "-T", ds.ref, "-o", out_cram]
    mem_bytes = parse_size(ctx.max_memory)
    sam_sort = ["samtools", "sort", "-@", T, "-m", f"{max(1, mem_bytes // T // MiB)}M",
                "-T", ctx.work / "sorttmp", "-o", out_bam, "-"]
    produce_full = ["samtools", "view", "-u", ds.aligned]
    produce_q = ["samtools", "view", "-u", ds.quarter]

    dst, dst_in = ctx.work / "ds-local", ctx.work / "ds-stdin"
    conv = ctx.bams3("convert", ds.sorted_bam, dst, "--threads", T,
                     "--overwrite") if ctx.bams3.ok else []
    conv_in = ctx.bams3("convert", "-", dst_in, "--threads", T, "--max-memory", ctx.max_memory,
                        "--overwrite") if ctx.bams3.ok else []
    ctx.cmdlog("anchor convert -b", [*sam_b, ds.sorted_bam])
    ctx.cmdlog("anchor convert -C", [*sam_c, ds.sorted_bam])
    ctx.cmdlog("anchor unsorted stdin", sam_sort, produce_full)
    ctx.cmdlog("bams3 convert (file)", conv)
    ctx.cmdlog("bams3 convert (unsorted stdin)", conv_in, produce_full)

    def b3_file():
        shutil.rmtree(dst, ignore_errors=True)
        r = run(conv, env=env, timeout=to)
        ctx.local_dataset_bytes = util.dir_size(dst)
        return r

    def b3_stdin(producer):
        def go():
            shutil.rmtree(dst_in, ignore_errors=True)
            return run(conv_in, env=env, timeout=to, producer=producer, measure_rss=True)
        return go

    # Every command once per round, N rounds, best kept: on a shared machine a burst of load
    # then hits bams3 and its anchors alike instead of whichever happened to be running.
    jobs = {
        "a_b": (False, lambda: run([*sam_b, ds.sorted_bam], timeout=to)),
        "b3_file": (True, b3_file),
        "a_c": (False, lambda: run([*sam_c, ds.sorted_bam], timeout=to)),
        "a_b_in": (False, lambda: run([*sam_b, "-"], producer=produce_full, timeout=to)),
        "b3_in": (True, b3_stdin(produce_full)),
        "a_c_in": (False, lambda: run([*sam_c, "-"], producer=produce_full, timeout=to)),
        "a_sort": (False, lambda: run(sam_sort, producer=produce_full, timeout=to,
                                      measure_rss=True)),
        "b3_q": (True, b3_stdin(produce_q)),
    }
    what = {"b3_file": "convert from sorted BAM", "b3_in": "convert from unsorted stdin",
            "b3_q": "convert from unsorted stdin (1/4 input)"}
    results: dict = {k: [] for k in jobs}
    misses: dict = {}
    log(f"convert: {N} round(s) of bams3 convert and samtools anchors ...")
    for _round in range(max(1, N)):
        for key, (is_b3, fn) in jobs.items():
            if key in misses:
                continue
            if is_b3:
                r, miss = ctx.attempt(what[key], fn)
                if r is None:
                    misses[key] = miss
                    continue
            else:
                r = fn()
            results[key].append(r)

    def best(key):
        rs = results[key]
        return min(r.seconds for r in rs) if rs else None

    a_b, a_c, a_b_in, a_c_in, a_sort = (best(k) for k in ("a_b", "a_c", "a_b_in", "a_c_in", "a_sort"))
    a_sort_all = results["a_sort"]
    a_sort_peak = max(r.peak_rss for r in a_sort_all)
    t_file, miss_file = best("b3_file"), misses.get("b3_file")
    ctx.local_convert_best = t_file
    full = quarter = None
    if results["b3_in"] and "b3_in" not in misses:
        rs = results["b3_in"]
        full = (best("b3_in"), max(r.peak_rss for r in rs), [r.peak_rss for r in rs])
    if results["b3_q"] and "b3_q" not in misses:
        rs = results["b3_q"]
        quarter = (best("b3_q"), max(r.peak_rss for r in rs), [r.peak_rss for r in rs])
    miss_full, miss_q = misses.get("b3_in"), misses.get("b3_q")
    if not ctx.bams3.ok:
        miss_file = miss_full = miss_q = (NA, f"n/a ({ctx.bams3.reason})")

    rate = lambda t, k=n: (k / t) if t else None  # noqa: E731
    # issue #14: a sorted BAM converts at least 1.2x as fast as `samtools view -b` re-deflates
    # it, and unsorted stdin at least as fast as `samtools sort` sorts it (vs view: info)
    ctx.row(sec, "sorted BAM file → reads/s", "reads/s", rate(t_file), "samtools view -@2 -b",
            rate(a_b), goal=Goal(">=", 1.2), missing=miss_file,
            note="bams3 models and columnises every field (the anchor only re-deflates); the quality "
                 "range coder and the base model are ~45% of the encoding CPU, and encoding and "
                 "parsing share one interpreter lock")
    ctx.row(sec, "sorted BAM file → reads/s vs CRAM", "reads/s", rate(t_file),
            "samtools view -@2 -C", rate(a_c), missing=miss_file)
    t_full = full[0] if full else None
    ctx.row(sec, "unsorted stdin → reads/s vs view", "reads/s", rate(t_full), "samtools view -@2 -b",
            rate(a_b_in), missing=miss_full,
            note="anchor only recompresses; bams3 also sorts (spill, merge) before the same encoder")
    ctx.row(sec, "unsorted stdin → reads/s vs CRAM", "reads/s", rate(t_full),
            "samtools view -@2 -C", rate(a_c_in), missing=miss_full)
    ctx.row(sec, "unsorted stdin → reads/s", "reads/s", rate(t_full),
            f"samtools sort -@2 -m {sam_sort[5]}", rate(a_sort), goal=Goal(">=", 1.0), missing=miss_full,
            note="both sort in bounded memory (spilled runs, then a merge); bams3 then models and "
                 "columnises every field where samtools sort only deflates")

    sec_m = f"peak memory, unsorted stdin (--max-memory {ctx.max_memory})"
    q_peak = quarter[1] if quarter else None
    f_peak = full[1] if full else None
    mm = (miss_full or miss_q) if (f_peak is None or q_peak is None) else None
    ctx.row(sec_m, f"full input ({n:,} rec) vs 1/4 input ({nq:,} rec)", "rss",
            f_peak if q_peak else None, "bams3 on 1/4 input", q_peak, goal=Goal("<=", 1.2),
            missing=mm)
    ctx.row(sec_m, "full input vs the --max-memory budget", "rss", f_peak,
            "--max-memory", float(mem_bytes), missing=miss_full,
            goal=Goal("<=", float(mem_bytes + RSS_OVER_BUDGET), on="value",
                      label=f"≤ --max-memory + {RSS_OVER_BUDGET // MiB} MiB (issue #14)"),
            note="the budget bounds the sort, the merge's read-ahead and the chunks in flight; "
                 "the rest is the interpreter, numpy, numba/LLVM and the loaded kernels (~155 MiB)")
    ctx.row(sec_m, "full input vs samtools sort", "rss", f_peak,
            f"samtools sort -@2 -m {sam_sort[5]}", a_sort_peak, missing=miss_full)
    ctx.details += [
        "### Peak memory samples",
        "",
        "Summed RSS of the converting process and all its descendants, polled every 20 ms; the "
        "reported value is the maximum over the repeats.",
        "",
        f"- bams3, full input: {', '.join(human_bytes(x) for x in full[2]) if full else '—'}",
        f"- bams3, 1/4 input: {', '.join(human_bytes(x) for x in quarter[2]) if quarter else '—'}",
        f"- samtools sort, full input: {', '.join(human_bytes(r.peak_rss) for r in a_sort_all)}",
        "",
    ]


# ---------------------------------------------------------------------------------------------
# size
# ---------------------------------------------------------------------------------------------
CRAM_VARIANTS = [
    ("CRAM 3.0 (ref)", ["version=3.0"], True),
    ("CRAM 3.1 (ref)", ["version=3.1"], True),
    ("CRAM 3.0 no_ref", ["version=3.0", "no_ref=1"], False),
    ("CRAM 3.1 no_ref", ["version=3.1", "no_ref=1"], False),
    ("CRAM 3.1 embed_ref", ["version=3.1", "embed_ref=1"], False),
]


def sizes(ctx: Ctx) -> None:
    ds = ctx.ds
    sec = "size"
    bam = ds.sorted_bam.stat().st_size
    bai = Path(str(ds.sorted_bam) + ".bai").stat().st_size
    crams = {}
    for name, opts, needs_ref in CRAM_VARIANTS:
        out = ctx.work / ("size-" + "".join(ch for ch in name if ch.isalnum()) + ".cram")
        cmd = ["samtools", "view", "-@", ctx.threads, "-C", "-T", ds.ref]
        for o in opts:
            cmd += ["--output-fmt-option", o]
        cmd += ["-o", out, ds.sorted_bam]
        run(cmd, timeout=ctx.timeout)
        ctx.cmdlog(f"size {name}", cmd)
        crams[name] = out.stat().st_size
        out.unlink()
    if ctx.s3_dataset_bytes is not None:
        b, how = ctx.s3_dataset_bytes, "sum of object sizes under the S3 prefix"
    elif ctx.local_dataset_bytes is not None:
        b, how = ctx.local_dataset_bytes, "sum of file sizes of the local dataset"
    else:
        b, how = None, ""
    miss = None
    if b is None:
        miss = (NA, f"n/a ({ctx.bams3.reason})") if not ctx.bams3.ok else (
            ERROR, "error: no dataset (convert failed)")
    ctx.row(sec, "dataset bytes vs BAM", "bytes", b, "BAM", bam, goal=Goal("<=", 0.60),
            missing=miss, note=how)
    ctx.row(sec, "dataset bytes vs BAM (stretch)", "bytes", b, "BAM", bam,
            goal=Goal("<=", 0.54), missing=miss, chart=False)
    ctx.row(sec, "dataset bytes vs BAM + BAI", "bytes", b, "BAM + BAI", bam + bai, missing=miss)
    for name, _opts, needs_ref in CRAM_VARIANTS:
        ctx.row(sec, f"dataset bytes vs {name}", "bytes", b, name, crams[name], missing=miss,
                note="decoding needs ref.fa" if needs_ref else "self-contained")
    if ctx.local_dataset_bytes is not None and ctx.s3_dataset_bytes is not None \
            and ctx.local_dataset_bytes != ctx.s3_dataset_bytes:
        ctx.details += [f"Note: local dataset {ctx.local_dataset_bytes:,} B, S3 dataset "
                        f"{ctx.s3_dataset_bytes:,} B (they differ).", ""]


# ---------------------------------------------------------------------------------------------
# S3: convert to S3 vs local, part size x concurrency sweep
# ---------------------------------------------------------------------------------------------
DS_PREFIX = "ds"
BAM_KEY = "bam/sorted.bam"


def convert_s3(ctx: Ctx) -> None:
    ds, s3, N, T = ctx.ds, ctx.s3, ctx.repeat, ctx.threads
    sec = "convert to S3 (sorted BAM file)"
    env = s3.bams3_env(ctx.work / "cache-s3conv")
    dst_local = ctx.work / "ds-local2"
    uri = s3.s3_uri(DS_PREFIX)
    conv_l = ctx.bams3("convert", ds.sorted_bam, dst_local, "--threads", T, "--overwrite") if ctx.bams3.ok else []
    conv_s = ctx.bams3("convert", ds.sorted_bam, uri, "--threads", T, "--overwrite") if ctx.bams3.ok else []
    ctx.cmdlog("bams3 convert → S3", conv_s)

    def go():
        tl, ts, up = [], [], None
        for i in range(max(1, N)):  # interleaved, so drift on a noisy machine hits both alike
            shutil.rmtree(dst_local, ignore_errors=True)
            tl.append(run(conv_l, env=env, timeout=ctx.timeout).seconds)
            s3.delete_prefix(DS_PREFIX)
            s3.reset()
            ts.append(run(conv_s, env=env, timeout=ctx.timeout).seconds)
            up = s3.stats()
        return min(tl), min(ts), up

    res, miss = ctx.attempt("convert to S3", go)
    if res:
        ctx.s3_dataset_bytes, nobj = s3.prefix_size(DS_PREFIX)
        ctx.s3_dataset_ready = True
        ctx.details += ["### Upload of the dataset (convert → S3, default settings)", "",
                        f"{res[2]['requests']} requests ({json.dumps(res[2]['by_op'])}), "
                        f"{human_bytes(res[2]['bytes_in'])} uploaded; {nobj} objects, "
                        f"{ctx.s3_dataset_bytes:,} bytes under s3://bench/{DS_PREFIX}/.", ""]
    ctx.row(sec, "wall time, S3 vs local disk", "s", res[1] if res else None,
            "bams3 → local dir", res[0] if res else None, goal=Goal("<=", 1.2), missing=miss)


def sweep(ctx: Ctx) -> None:
    """Convert → S3 for each part size × concurrency. The cells (and a local-disk baseline)
    are visited round-robin ``sweep_repeat`` times and each keeps its best time, so a noisy
    neighbour slows all cells alike instead of whichever ran at the wrong moment."""
    ds, s3, T = ctx.ds, ctx.s3, ctx.threads
    sec = "upload sweep: convert → S3 wall time"
    env = s3.bams3_env(ctx.work / "cache-sweep")
    cells = [(ps, c) for ps in ctx.part_sizes_mib for c in ctx.concurrencies]
    cmds = {}
    for ps, c in cells:
        cmds[ps, c] = ctx.bams3("convert", ds.sorted_bam, s3.s3_uri("sweep"), "--threads", T,
                                "--s3-part-size", int(ps * MiB), "--s3-concurrency", c,
                                "--overwrite") if ctx.bams3.ok else []
        ctx.cmdlog("bams3 sweep", cmds[ps, c])
    local_dir = ctx.work / "ds-sweep-local"
    local_cmd = ctx.bams3("convert", ds.sorted_bam, local_dir, "--threads", T,
                          "--overwrite") if ctx.bams3.ok else []
    best: dict = {}
    stats_of: dict = {}
    miss_of: dict = {}
    local_best = None
    for _round in range(max(1, ctx.sweep_repeat)):
        def local():
            shutil.rmtree(local_dir, ignore_errors=True)
            return run(local_cmd, env=env, timeout=ctx.timeout).seconds

        t, _m = ctx.attempt("sweep baseline (local)", local)
        if t is not None:
            local_best = t if local_best is None else min(local_best, t)
        for cell in cells:
            if cell in miss_of:
                continue

            def go(cell=cell):
                s3.delete_prefix("sweep")
                s3.reset()
                t = run(cmds[cell], env=env, timeout=ctx.timeout).seconds
                return t, s3.stats()

            res, miss = ctx.attempt(f"sweep part={cell[0]}MiB conc={cell[1]}", go)
            if res is None:
                miss_of[cell] = miss
                continue
            if cell not in best or res[0] < best[cell]:
                best[cell] = res[0]
            stats_of.setdefault(cell, res[1])
    for ps, c in cells:
        st = stats_of.get((ps, c))
        ctx.sweep.append({"part_mib": ps, "concurrency": c, "seconds": best.get((ps, c)),
                          "requests": st["requests"] if st else None,
                          "parts": st["by_op"].get("UploadPart", 0) if st else None})
        ctx.row(sec, f"part {ps:g} MiB × concurrency {c}", "s", best.get((ps, c)),
                "bams3 → local dir", local_best, missing=miss_of.get((ps, c)))
    s3.delete_prefix("sweep")
    lines = ["### Upload sweep (convert → S3, wall time, best of "
             f"{ctx.sweep_repeat})", "", "| part size | concurrency | seconds | requests | UploadPart |",
             "|---|---|---|---|---|"]
    for s in ctx.sweep:
        sec_txt = f"{s['seconds']:.2f}" if s["seconds"] else "—"
        lines.append(f"| {s['part_mib']:g} MiB | {s['concurrency']} | {sec_txt} | "
                     f"{s['requests'] if s['requests'] is not None else '—'} | "
                     f"{s['parts'] if s['parts'] is not None else '—'} |")
    ctx.details += lines + [""]


# ---------------------------------------------------------------------------------------------
# region queries over S3
# ---------------------------------------------------------------------------------------------
def regions(ds: Dataset) -> list[tuple[str, str]]:
    (c0, l0) = ds.contigs[0]
    cl, _ll = ds.contigs[-1]
    s = l0 // 2
    return [("1 kb", f"{c0}:{s + 1}-{s + 1000}"),
            ("100 kb", f"{c0}:{s + 1}-{s + 100_000}"),
            ("whole contig", cl)]


def _floor_bytes(ctx: Ctx, region: str) -> tuple[int, int]:
    """Compressed size of just the overlapping records: BAM(records) - BAM(header only)."""
    recs, hdr = ctx.work / "floor.bam", ctx.work / "floor-hdr.bam"
    run(["samtools", "view", "-b", "-o", recs, ctx.ds.sorted_bam, region], timeout=ctx.timeout)
    run(["samtools", "view", "-H", "-b", "-o", hdr, ctx.ds.sorted_bam], timeout=ctx.timeout)
    n = int(run(["samtools", "view", "-c", recs], capture=True, timeout=ctx.timeout).stdout)
    return recs.stat().st_size - hdr.stat().st_size, n


def queries(ctx: Ctx) -> None:
    ds, s3, N = ctx.ds, ctx.s3, ctx.repeat
    bam_url = s3.htslib_url(BAM_KEY)
    uri = s3.s3_uri(DS_PREFIX)
    hts_env = s3.htslib_env()
    detail = ["### Region queries over S3 (through the counting proxy)", "",
              "| region | who | wall s (best) | requests | bytes | ops |", "|---|---|---|---|---|---|"]
    for label, region in regions(ds):
        sec = f"query {label} ({region}) from S3"
        floor, nrec = _floor_bytes(ctx, region)
        truth = run(["samtools", "view", ds.sorted_bam, region], hash_stdout=True,
                    timeout=ctx.timeout)

        # samtools over S3. htslib saves a remote index into the working directory, so cold =
        # a fresh cwd each time, warm = the cwd left by the last cold run (BAI on local disk)
        def sam(cwd_name, *, fresh):
            def one(i):
                cwd = ctx.work / cwd_name
                if fresh:
                    shutil.rmtree(cwd, ignore_errors=True)
                    cwd.mkdir()
                s3.reset()
                r = run(["samtools", "view", bam_url, region], env=hts_env, cwd=cwd,
                        hash_stdout=True, timeout=ctx.timeout)
                r.extra = s3.stats()
                return r
            return one

        sbest, sall = best_of(N, sam("samq", fresh=True))
        swbest, swall = best_of(N, sam("samq", fresh=False))
        ctx.cmdlog("anchor query", ["samtools", "view", bam_url, region])
        for r in sall + swall:
            if r.out_sha256 != truth.out_sha256:
                raise RuntimeError(f"samtools over S3 printed different records for {region}")
        st, stw = sall[0].extra, swall[0].extra
        need = bai.needed_bytes(ds.sorted_bam, region)

        def b3(cache: Path, *, fresh: bool):
            def one(i):
                if fresh:
                    shutil.rmtree(cache, ignore_errors=True)
                    cache.mkdir(parents=True)
                s3.reset()
                cmd = ctx.bams3("query", uri, region)
                r = run(cmd, env=s3.bams3_env(cache), hash_stdout=True, timeout=ctx.timeout)
                r.extra = s3.stats()
                return r
            return one

        cache = ctx.work / f"qcache-{label.replace(' ', '')}"

        def go():
            if not ctx.s3_dataset_ready:
                raise CommandError(["bams3", "query"], "skipped", "no dataset on S3 (convert → S3 failed)")
            cbest, call = best_of(N, b3(cache, fresh=True))
            wbest, wall = best_of(N, b3(cache, fresh=False))  # cache primed by the cold runs
            return cbest, call, wbest, wall

        if ctx.bams3.ok:
            ctx.cmdlog("bams3 query", ctx.bams3("query", uri, region))
        res, miss = ctx.attempt(f"query {label}", go)
        cold = res[1][0].extra if res else None
        warm = res[3][0].extra if res else None
        is_1kb = label == "1 kb"
        g = lambda *a, **k: Goal(*a, **k) if is_1kb else None  # noqa: E731
        v = lambda d, k: d[k] if d else None  # noqa: E731
        S, SW = "samtools view (BAM+BAI)", "samtools view (BAI cached)"
        ctx.row(sec, "cold: bytes transferred", "bytes", v(cold, "bytes_out"), S,
                st["bytes_out"], goal=g("<=", 0.01), missing=miss,
                note="anchor inflated by aborted open-ended GETs over loopback, see details")
        ctx.row(sec, "cold: bytes vs samtools' minimum", "bytes", v(cold, "bytes_out"),
                "BAI + header + blocks htslib must read", need["total"], missing=miss)
        ctx.row(sec, "cold: bytes vs records' floor", "bytes", v(cold, "bytes_out"),
                f"BAM-compressed records ({nrec:,})", floor, missing=miss)
        ctx.row(sec, "cold: requests", "requests", v(cold, "requests"), S, st["requests"],
                goal=g("<=", 3, on="value"), missing=miss)
        ctx.row(sec, "warm: requests", "requests", v(warm, "requests"), SW, stw["requests"],
                goal=g("<=", 1, on="value"), missing=miss)
        ctx.row(sec, "warm: bytes transferred", "bytes", v(warm, "bytes_out"), SW,
                stw["bytes_out"], missing=miss)
        ctx.row(sec, "cold: wall time", "s", res[0].seconds if res else None, S, sbest.seconds,
                missing=miss)
        ctx.row(sec, "warm: wall time", "s", res[2].seconds if res else None, SW,
                swbest.seconds, goal=g("<=", 2.0), missing=miss)
        if res:
            same = all(r.out_sha256 == truth.out_sha256 for r in res[1] + res[3])
            note = "" if same else (f"bams3 printed {res[1][0].out_lines:,} lines, samtools "
                                    f"{truth.out_lines:,} (or the same count, different bytes)")
            ctx.row(sec, "output identical to samtools view", "bool", float(same), chart=False,
                    goal=Goal(">=", 1, on="value", label="identical"), note=note)
        else:
            ctx.row(sec, "output identical to samtools view", "bool", None, chart=False,
                    goal=Goal(">=", 1, on="value", label="identical"), missing=miss)
        detail.append(f"| {label} `{region}`: {nrec:,} records; floor {human_bytes(floor)}; "
                      f"samtools minimum {human_bytes(need['total'])} (BAI {need['bai']:,} + "
                      f"header {need['header']:,} + {need['chunks']} chunks {need['records']:,}) | "
                      f"samtools cold | {sbest.seconds:.3f} | {st['requests']} | "
                      f"{st['bytes_out']:,} | {_ops(st)} {_status(st)} |")
        detail.append(f"| | samtools, BAI cached | {swbest.seconds:.3f} | {stw['requests']} | "
                      f"{stw['bytes_out']:,} | {_ops(stw)} {_status(stw)} |")
        if res:
            for who, best, d in (("bams3 cold", res[0], cold), ("bams3 warm", res[2], warm)):
                detail.append(f"| | {who} | {best.seconds:.3f} | {d['requests']} | "
                              f"{d['bytes_out']:,} | {_ops(d)} {_status(d)} |")
    ctx.details += detail + ["", _LOOPBACK_NOTE, ""]


def projection(ctx: Ctx) -> None:
    """Column projection over S3: `bams3 depth` (positions, flags, MAPQ, CIGARs) and
    `bams3 query -c` against `bams3 query`'s whole-block read of the same region, warm cache
    (so only chunk bytes are counted); depth's text checked against `samtools depth`."""
    ds, s3 = ctx.ds, ctx.s3
    uri = s3.s3_uri(DS_PREFIX)
    detail = ["### Column projection over S3 (warm metadata cache; chunk reads only)", "",
              "| region | command | requests | bytes |", "|---|---|---|---|"]
    for label, region in regions(ds)[1:]:
        sec = f"query {label} ({region}) from S3: projection"
        truth = run(["samtools", "depth", "-r", region, ds.sorted_bam], hash_stdout=True, timeout=ctx.timeout)
        cache = ctx.work / f"pcache-{label.replace(' ', '')}"

        def go():
            if not ctx.s3_dataset_ready:
                raise CommandError(["bams3", "depth"], "skipped", "no dataset on S3 (convert → S3 failed)")
            shutil.rmtree(cache, ignore_errors=True)
            env = s3.bams3_env(cache)
            run(ctx.bams3("query", "-c", uri, region), env=env, capture=True, timeout=ctx.timeout)  # warm the cache
            out = {}
            for name, args, kw in (("full", ("query", uri, region), dict(hash_stdout=True)),
                                   ("depth", ("depth", "-r", region, uri), dict(hash_stdout=True)),
                                   ("count", ("query", "-c", uri, region), dict(capture=True))):
                s3.reset()
                r = run(ctx.bams3(*args), env=env, timeout=ctx.timeout, **kw)
                out[name] = (r, s3.stats())
            return out

        if ctx.bams3.ok:
            ctx.cmdlog("bams3 depth", ctx.bams3("depth", "-r", region, uri))
        res, miss = ctx.attempt(f"projection {label}", go)
        v = lambda k, f: res[k][1][f] if res else None  # noqa: E731
        full = res["full"][1]["bytes_out"] if res else None
        ctx.row(sec, "depth: bytes vs full read", "bytes", v("depth", "bytes_out"),
                "bams3 query (whole blocks)", full, goal=Goal("<=", 0.35), missing=miss,
                note="reads pos/flag/mapq/CIGAR streams only")
        ctx.row(sec, "depth: requests", "requests", v("depth", "requests"), "bams3 query",
                res["full"][1]["requests"] if res else None, missing=miss)
        ctx.row(sec, "query -c: bytes vs full read", "bytes", v("count", "bytes_out"),
                "bams3 query (whole blocks)", full, missing=miss,
                note="inner blocks counted from the index; edge blocks' position streams only")
        same = None if not res else float(res["depth"][0].out_sha256 == truth.out_sha256)
        ctx.row(sec, "depth output identical to samtools depth", "bool", same, chart=False,
                goal=Goal(">=", 1, on="value", label="identical"), missing=miss)
        if res:
            for name in ("full", "depth", "count"):
                st = res[name][1]
                detail.append(f"| {label} `{region}` | {name} | {st['requests']} | {st['bytes_out']:,} |")
    ctx.details += detail + [""]


# ---------------------------------------------------------------------------------------------
# an htsget slice over S3 (bams3 serve)
# ---------------------------------------------------------------------------------------------
class _Serve:
    """`bams3 serve` on the bench bucket (127.0.0.1, a free port), stopped by its handle."""

    def __init__(self, ctx: Ctx, cache: Path):
        import socket
        import urllib.request

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = ctx.bams3("serve", ctx.s3.s3_uri(""), "--port", self.port)
        self.log = open(ctx.work / "serve.log", "wb")
        self.proc = subprocess.Popen([str(c) for c in cmd], env=ctx.s3.bams3_env(cache), stdout=self.log,
                                     stderr=subprocess.STDOUT)
        for _ in range(600):
            if self.proc.poll() is not None:
                raise CommandError(cmd, "exited", (ctx.work / "serve.log").read_text()[-500:])
            try:
                with urllib.request.urlopen(self.url + "/reads/service-info", timeout=2):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise CommandError(cmd, "timeout", "bams3 serve did not answer within 60 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def htsget_slice(ctx: Ctx) -> None:
    """The 1 kb region as an htsget slice: `samtools view http://.../reads/ds?...` against a
    `bams3 serve` reading the dataset from S3; S3 requests and bytes (the server's, counted by
    the proxy) against samtools reading BAM+BAI from S3 itself, both cold."""
    ds, s3 = ctx.ds, ctx.s3
    label, region = regions(ds)[0]
    name, span = region.rsplit(":", 1)
    beg, end = (int(x) for x in span.split("-"))
    sec = f"htsget slice {label} ({region}) from S3"
    truth = run(["samtools", "view", ds.sorted_bam, region], hash_stdout=True, timeout=ctx.timeout)
    cwd = ctx.fresh("htsget-sam")
    cwd.mkdir()
    s3.reset()
    anchor = run(["samtools", "view", s3.htslib_url(BAM_KEY), region], env=s3.htslib_env(), cwd=cwd,
                 hash_stdout=True, timeout=ctx.timeout)
    ast = s3.stats()
    url = f"{{}}/reads/{DS_PREFIX}?referenceName={name}&start={beg - 1}&end={end}"

    def go():
        if not ctx.s3_dataset_ready:
            raise CommandError(["bams3", "serve"], "skipped", "no dataset on S3 (convert → S3 failed)")
        server = _Serve(ctx, ctx.fresh("htsget-cache"))
        try:
            out = []
            for _ in ("cold", "warm"):
                s3.reset()
                r = run(["samtools", "view", url.format(server.url)], hash_stdout=True, timeout=ctx.timeout,
                        env=base_env())
                r.extra = s3.stats()
                out.append(r)
            return out
        finally:
            server.stop()

    if ctx.bams3.ok:
        ctx.cmdlog("bams3 serve", ctx.bams3("serve", s3.s3_uri(""), "--port", "PORT"))
        ctx.cmdlog("htsget client", ["samtools", "view", url.format("http://127.0.0.1:PORT")])
    res, miss = ctx.attempt("htsget slice", go)
    v = lambda i, k: res[i].extra[k] if res else None  # noqa: E731
    S = "samtools view (BAM+BAI from S3)"
    ctx.row(sec, "cold: S3 requests", "requests", v(0, "requests"), S, ast["requests"], missing=miss,
            note="the server's GETs for the ticket, the header and the records")
    ctx.row(sec, "cold: S3 bytes", "bytes", v(0, "bytes_out"), S, ast["bytes_out"], missing=miss)
    ctx.row(sec, "warm: S3 requests", "requests", v(1, "requests"), missing=miss)
    ctx.row(sec, "warm: S3 bytes", "bytes", v(1, "bytes_out"), missing=miss)
    ctx.row(sec, "cold: wall time", "s", res[0].seconds if res else None, S, anchor.seconds, missing=miss,
            note="a fresh server: its first request also loads the decoders")
    ctx.row(sec, "warm: wall time", "s", res[1].seconds if res else None, missing=miss)
    same = bool(res) and all(r.out_sha256 == truth.out_sha256 for r in res) and anchor.out_sha256 == truth.out_sha256
    ctx.row(sec, "records identical to samtools view", "bool", float(same) if res else None, chart=False,
            goal=Goal(">=", 1, on="value", label="identical"), missing=miss)
    if res:
        ctx.details += [f"### htsget slice `{region}` over S3", "",
                        "| who | requests | bytes | ops |", "|---|---|---|---|",
                        f"| samtools BAM+BAI, cold | {ast['requests']} | {ast['bytes_out']:,} | {_ops(ast)} |"] + [
            f"| bams3 serve, {w} | {r.extra['requests']} | {r.extra['bytes_out']:,} | {_ops(r.extra)} |"
            for w, r in zip(("cold", "warm"), res)] + [""]


_LOOPBACK_NOTE = (
    "htslib reads a BAM over S3 with open-ended GETs (`Range: bytes=N-`, or no range at all "
    "for the header) and drops the connection once it has what it needs. Over loopback the "
    "proxy has by then pushed megabytes into the socket buffers, and counts them as sent: real "
    "transfer, but more than a WAN would carry, and it varies from run to run. \"samtools "
    "minimum\" is the lower bound of what htslib must read: the whole BAI, the BGZF blocks of "
    "the header, and the blocks of the index chunks overlapping the region up to the record "
    "where its iterator stops (computed from the BAI, bench/bai.py).")


def _status(st: dict) -> str:
    return "(HTTP " + ", ".join(f"{k}×{v}" for k, v in sorted(st.get("by_status", {}).items())) + ")"


def _ops(st: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(st.get("by_op", {}).items()))


# ---------------------------------------------------------------------------------------------
# stats over S3
# ---------------------------------------------------------------------------------------------
def stats(ctx: Ctx) -> None:
    ds, s3, N = ctx.ds, ctx.s3, ctx.repeat
    sec = "stats from S3"
    bam_url = s3.htslib_url(BAM_KEY)
    hts_env = s3.htslib_env()
    anchors = {}
    for tool in ("flagstat", "idxstats"):
        def one(i, tool=tool):
            cwd = ctx.fresh(f"sams-{i}")
            cwd.mkdir()
            s3.reset()
            r = run(["samtools", tool, bam_url], env=hts_env, cwd=cwd, capture=True,
                    timeout=ctx.timeout)
            r.extra = s3.stats()
            return r
        best, allr = best_of(N, one)
        anchors[tool] = (best, allr[0].extra)
        ctx.cmdlog(f"anchor {tool}", ["samtools", tool, bam_url])
    uri = s3.s3_uri(DS_PREFIX)
    cache = ctx.work / "stats-cache"

    def one(i):
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        s3.reset()
        r = run(ctx.bams3("stats", uri, "--json"), env=s3.bams3_env(cache), capture=True,
                timeout=ctx.timeout)
        r.extra = s3.stats()
        return r

    def go():
        if not ctx.s3_dataset_ready:
            raise CommandError(["bams3", "stats"], "skipped", "no dataset on S3 (convert → S3 failed)")
        return best_of(N, one)

    if ctx.bams3.ok:
        ctx.cmdlog("bams3 stats", ctx.bams3("stats", uri, "--json"))
    res, miss = ctx.attempt("stats", go)
    st = res[1][0].extra if res else None
    v = lambda k: st[k] if st else None  # noqa: E731
    fs, ix = anchors["flagstat"], anchors["idxstats"]
    ctx.row(sec, "requests (cold cache)", "requests", v("requests"), "samtools flagstat",
            fs[1]["requests"], goal=Goal("<=", 1, on="value"), missing=miss)
    ctx.row(sec, "requests vs idxstats", "requests", v("requests"), "samtools idxstats",
            ix[1]["requests"], missing=miss)
    ctx.row(sec, "bytes transferred", "bytes", v("bytes_out"), "samtools flagstat",
            fs[1]["bytes_out"], missing=miss)
    ctx.row(sec, "bytes vs idxstats", "bytes", v("bytes_out"), "samtools idxstats",
            ix[1]["bytes_out"], missing=miss)
    ctx.row(sec, "wall time", "s", res[0].seconds if res else None, "samtools flagstat",
            fs[0].seconds, missing=miss)
    ctx.row(sec, "wall time vs idxstats", "s", res[0].seconds if res else None,
            "samtools idxstats", ix[0].seconds, missing=miss)
    same, why = (None, miss[1]) if miss else _compare_stats(ctx, res[0].stdout)
    ctx.row(sec, "flagstat + idxstats identical to samtools", "bool",
            None if same is None else float(same), chart=False,
            goal=Goal(">=", 1, on="value", label="identical"),
            missing=miss or (None if same is not None else (NA, why)), note=why if same is False else "")
    if res:
        ctx.details += ["### bams3 stats --json (first 1,500 characters)", "", "```json",
                        res[0].stdout.decode(errors="replace")[:1500], "```", "",
                        "samtools flagstat over S3 said:", "", "```",
                        fs[0].stdout.decode(errors="replace").strip(), "```", ""]


def _compare_stats(ctx: Ctx, out: bytes) -> tuple[bool | None, str]:
    """bams3 stats --json vs local `samtools flagstat -O json` and `samtools idxstats`."""
    try:
        got = json.loads(out)
        fs, ix = got["flagstat"], got["idxstats"]
    except (ValueError, KeyError, TypeError) as e:
        return None, f"cannot read bams3 stats --json ({e})"
    want_fs = json.loads(run(["samtools", "flagstat", "-O", "json", ctx.ds.sorted_bam],
                             capture=True, timeout=ctx.timeout).stdout)
    want_ix = [line.split("\t") for line in run(["samtools", "idxstats", ctx.ds.sorted_bam],
                                                capture=True, timeout=ctx.timeout
                                                ).stdout.decode().splitlines()]
    norm = lambda v: None if v in (None, "N/A") else v  # noqa: E731
    diffs = [f"{grp}/{k}: {norm(fs.get(grp, {}).get(k))} != {norm(v)}"
             for grp, d in want_fs.items() for k, v in d.items()
             if norm(fs.get(grp, {}).get(k)) != norm(v)]
    try:
        got_ix = [[str(c) for c in row] for row in ix]
    except TypeError:
        got_ix = None
    if got_ix != want_ix:
        diffs.append("idxstats rows differ")
    return (not diffs), "; ".join(diffs[:4])


# ---------------------------------------------------------------------------------------------
# start-up: numba's compiled-kernel cache
# ---------------------------------------------------------------------------------------------
def _cache_files(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in d.rglob("*") if p.is_file()} if d.exists() else {}


def startup(ctx: Ctx) -> None:
    """`bams3 warmup` into an empty NUMBA_CACHE_DIR, and the 1 kb query of a local dataset after
    it, which must find every kernel there (no cache file written or changed: nothing compiled);
    then the same query on a fresh install (NUMBA_CACHE_DIR = a new empty directory each run, so
    numba compiles what the query needs) interleaved with it on the warmed cache."""
    ds, N = ctx.ds, ctx.repeat
    sec = "start-up: first query on a fresh install"
    region = regions(ds)[0][1]
    dst = ctx.work / "ds-local"
    env = dict(base_env(), BAMS3_CACHE_DIR=str(ctx.work / "cache-startup"))
    env.pop("NUMBA_CACHE_DIR", None)
    truth = run(["samtools", "view", ds.sorted_bam, region], hash_stdout=True, timeout=ctx.timeout)
    query = ctx.bams3("query", dst, region) if ctx.bams3.ok else []
    wu_cache = ctx.work / "numba-warmup"  # filled by `bams3 warmup`, then the warm runs' cache
    ctx.cmdlog("bams3 first query (empty numba cache)", ["NUMBA_CACHE_DIR=$(mktemp -d)", *query])
    ctx.cmdlog("bams3 warmup", ["NUMBA_CACHE_DIR=DIR", *(ctx.bams3("warmup", "--json") if ctx.bams3.ok else [])])

    def q(cache: Path):
        r = run(query, env=dict(env, NUMBA_CACHE_DIR=str(cache)), hash_stdout=True, timeout=ctx.timeout)
        if r.out_sha256 != truth.out_sha256:
            raise CommandError(query, "different output", f"bams3 printed {r.out_lines} lines, samtools "
                                                           f"{truth.out_lines} (or different bytes)")
        return r

    def go():
        shutil.rmtree(wu_cache, ignore_errors=True)
        wu = run(ctx.bams3("warmup", "--json"), env=dict(env, NUMBA_CACHE_DIR=str(wu_cache)), capture=True,
                 timeout=ctx.timeout)
        if not dst.exists():  # without the convert section: convert once (untimed)
            run(ctx.bams3("convert", ds.sorted_bam, dst, "--threads", ctx.threads), timeout=ctx.timeout,
                env=dict(env, NUMBA_CACHE_DIR=str(wu_cache)))
        before = _cache_files(wu_cache)
        after_wu = q(wu_cache)
        changed = sum(1 for k, v in _cache_files(wu_cache).items() if before.get(k) != v)
        cold, warm = [], []
        for i in range(N):  # interleaved: cold, warm, cold, warm...
            fresh = ctx.fresh(f"numba-cold-{i}")
            fresh.mkdir()
            cold.append(q(fresh))
            warm.append(q(wu_cache))
        return min(cold, key=lambda r: r.seconds), min(warm, key=lambda r: r.seconds), wu, after_wu, changed

    res, miss = ctx.attempt("start-up", go)
    cold, warm, wu, after, changed = res if res else (None,) * 5
    sec_s = lambda r: r.seconds if r else None  # noqa: E731
    ctx.row(sec, "1 kb query, empty numba cache (wall)", "s", sec_s(cold), "same query, numba cache filled",
            sec_s(warm), goal=Goal("<=", 3.0, on="value"), missing=miss,
            note="compiles the kernels the query needs")
    rep = json.loads(wu.stdout) if wu else {}
    ctx.row(sec, "`bams3 warmup` into an empty cache (wall, once)", "s", sec_s(wu), missing=miss,
            note=f"{rep.get('compiled', '?')} kernel signatures compiled" if wu else "")
    ctx.row(sec, "1 kb query after `bams3 warmup` (wall, once)", "s", sec_s(after), "same query, numba cache filled",
            sec_s(warm), goal=Goal("<=", 3.0, on="value"), missing=miss)
    ctx.row(sec, "cache files written by the query after warmup", "files", None if changed is None else float(changed),
            goal=Goal("<=", 0, on="value", label="none (nothing compiled)"), chart=False, missing=miss)
