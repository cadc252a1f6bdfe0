"""bams3 benchmark harness: ``python -m bench`` (full) or ``python -m bench --quick``.

See bench/README.md. Exit status: 0 when the harness ran (whatever the PASS/FAIL lines say),
1 when the harness itself failed, 2 when a bams3 command errored during a measurement;
with ``--strict`` also 1 when any bar is FAIL or not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import data, measure, report, scale, util  # noqa: E402
from bench.s3 import BUCKET, S3Env  # noqa: E402
from bench.util import log  # noqa: E402

SECTIONS = ("convert", "size", "s3convert", "query", "stats", "sweep", "startup", "scale")
ROW_ORDER = ("size", "convert throughput", "peak memory", "convert to S3", "query", "stats",
             "start-up", "upload sweep", "scale")

FULL = dict(pairs=500_000, repeat=3, sweep_repeat=2, max_memory="64M", timeout=1800,
            part_sizes="5,8,16", concurrency="1,2,4")
QUICK = dict(pairs=50_000, repeat=2, sweep_repeat=1, max_memory="16M", timeout=300,
             part_sizes="5,16", concurrency="4")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small dataset (50k pairs), fewer repeats; writes quick.md (< 3 min)")
    p.add_argument("--out", type=Path, default=util.BENCH / "results",
                   help="results directory (default bench/results)")
    p.add_argument("--pairs", type=int, help="read pairs (full 500000, quick 50000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--depth", type=float, default=25.0,
                   help="target depth; sets the genome size (default 25)")
    p.add_argument("--aligner", choices=("bwa", "minimap2", "truth"),
                   help="bwa mem -t 2 (default), minimap2 -ax sr, or bams3.sample's truth BAM "
                        "(quick mode falls back to truth if no aligner is installed)")
    p.add_argument("--qual-mode", choices=("binned", "full"), default="binned",
                   help="bams3.sample qualities: Illumina-binned (default) or full resolution")
    p.add_argument("--repeat", type=int, help="timings are best of N (full 3, quick 2)")
    p.add_argument("--sweep-repeat", type=int, help="rounds over the sweep cells, best kept (full 2, quick 1)")
    p.add_argument("--max-memory", help="--max-memory for convert from stdin (full 64M, quick 16M)")
    p.add_argument("--part-sizes", help="sweep part sizes, MiB (full 5,8,16; quick 5,16)")
    p.add_argument("--concurrency", help="sweep concurrencies (full 1,2,4; quick 4)")
    p.add_argument("--timeout", type=float, help="per-command timeout, s (full 1800, quick 300)")
    p.add_argument("--bams3", metavar="CMD",
                   help="command that runs bams3 (default: python -m bams3.cli from this repo)")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--cache-dir", type=Path, default=util.BENCH / "cache")
    p.add_argument("--work-dir", type=Path,
                   help="scratch directory (default bench/work/<mode>-<pid>, removed afterwards)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    p.add_argument("--no-install", action="store_true",
                   help="never apt-get install missing tools; fail with instructions instead")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if any bar is FAIL or was not measured")
    p.add_argument("-q", "--quiet", action="store_true", help="do not echo every command")
    a = p.parse_args(argv)
    d = QUICK if a.quick else FULL
    for k, v in d.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    # --quick leaves the scale rows out unless asked for (`--quick --only scale`): they start a
    # Prefect server and Dask clusters, minutes that tests/test_bench_quick.py need not spend
    a.only = set(a.only.split(",")) if a.only else set(SECTIONS) - ({"scale"} if a.quick else set())
    bad = a.only - set(SECTIONS)
    if bad:
        p.error(f"unknown sections: {', '.join(sorted(bad))}")
    return a


def _floats(s: str) -> tuple:
    return tuple(float(x) for x in s.split(",") if x.strip())


def _ints(s: str) -> tuple:
    return tuple(int(x) for x in s.split(",") if x.strip())


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / (1 << 30):.0f} GiB RAM"
    except ImportError:
        mem = ""
    return f"{os.cpu_count()} CPUs ({cpu}){mem}, {platform.system()} {platform.release()}"


def git_rev() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=util.REPO,
                           capture_output=True, text=True, timeout=10)
        d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=util.REPO,
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() + ("+dirty" if d.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def main(argv=None) -> int:
    a = parse_args(argv)
    util.set_verbose(not a.quiet)
    # SIGTERM (e.g. a test runner's timeout) unwinds like Ctrl-C, so the local S3 and any
    # running command are stopped by the `finally` blocks
    signal.signal(signal.SIGTERM, _on_sigterm)
    t_start = time.time()
    mode = "quick" if a.quick else "full"
    try:
        import psutil  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as e:
        log(f"missing Python package ({e.name}); install the bench extra: "
            f"pip install -e '.[bench]'  (matplotlib, psutil, moto[server])")
        return 1

    # --- tools ---
    try:
        util.ensure_tools(["samtools"], install=not a.no_install)
        aligner = a.aligner
        if aligner is None:
            if a.quick:  # prefer a real aligner, but do not install one just for --quick
                aligner = "bwa" if shutil.which("bwa") else (
                    "minimap2" if shutil.which("minimap2") else "truth")
                if aligner == "truth":
                    log("quick mode: no aligner installed, using bams3.sample's truth BAM")
            else:
                aligner = "bwa"
        if aligner in ("bwa", "minimap2"):
            util.ensure_tools([aligner], install=not a.no_install)
    except RuntimeError as e:
        log(f"ERROR: {e}")
        return 1

    params = data.DataParams(pairs=a.pairs, seed=a.seed, depth=a.depth, aligner=aligner,
                             qual_mode=a.qual_mode)
    try:
        ds = data.load_or_build(params, a.cache_dir, timeout=max(a.timeout, 3600))
    except Exception as e:  # noqa: BLE001
        log(f"ERROR building the dataset: {e}")
        traceback.print_exc()
        return 1

    work = a.work_dir or (util.BENCH / "work" / f"{mode}-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bams3 = measure.Bams3Cli.find(a.bams3)
    if not bams3.ok:
        log(f"bams3: {bams3.reason} -> bams3 rows will be n/a")
    else:
        log(f"bams3: {util.fmt_cmd(bams3.cmd)}")
    ctx = measure.Ctx(ds=ds, work=work, bams3=bams3, repeat=a.repeat, sweep_repeat=a.sweep_repeat,
                      timeout=a.timeout, max_memory=a.max_memory,
                      part_sizes_mib=_floats(a.part_sizes), concurrencies=_ints(a.concurrency))
    s3 = None
    harness_error = None
    try:
        if "convert" in a.only:
            measure.convert_local(ctx)
        if "startup" in a.only:
            measure.startup(ctx)
        if a.only & {"s3convert", "query", "stats", "sweep"}:
            s3 = S3Env(work).start()
            ctx.s3 = s3
            s3.upload(ds.sorted_bam, measure.BAM_KEY)
            s3.upload(Path(str(ds.sorted_bam) + ".bai"), measure.BAM_KEY + ".bai")
            measure.convert_s3(ctx)  # also leaves the dataset on S3 for query and stats
            if "query" in a.only:
                measure.queries(ctx)
                measure.projection(ctx)
                measure.htsget_slice(ctx)
            if "stats" in a.only:
                measure.stats(ctx)
            if "sweep" in a.only:
                measure.sweep(ctx)
        if "size" in a.only:
            if ctx.local_dataset_bytes is None and ctx.s3_dataset_bytes is None and bams3.ok \
                    and "convert" not in a.only and s3 is None:
                log("size: converting once to a local directory")
                dst = work / "ds-size"
                util.run(bams3("convert", ds.sorted_bam, dst, "--threads", 2), timeout=a.timeout,
                         env=dict(measure.base_env(), BAMS3_CACHE_DIR=str(work / "c")))
                ctx.local_dataset_bytes = util.dir_size(dst)
            measure.sizes(ctx)
        if "scale" in a.only and bams3.ok:
            scale.measure(ctx)  # flow vs CLI, Dask workers, resume after kill -9, migrate twice
    except KeyboardInterrupt:
        harness_error = "interrupted"
        log("interrupted")
    except Exception as e:  # noqa: BLE001
        harness_error = f"{type(e).__name__}: {e}"
        log(f"HARNESS ERROR: {harness_error}")
        traceback.print_exc()
    finally:
        if s3 is not None:
            s3.stop()

    if "s3convert" not in a.only:
        ctx.rows = [r for r in ctx.rows if not r.section.startswith("convert to S3")]
    rank = lambda r: next((i for i, p in enumerate(ROW_ORDER) if r.section.startswith(p)),  # noqa: E731
                          len(ROW_ORDER))
    rows = sorted(ctx.rows, key=rank)

    # --- outputs ---
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "quick" if a.quick else "latest"
    md_path, png_path, json_path = (a.out / f"{stem}.md", a.out / f"{stem}.png",
                                    a.out / f"{stem}.json")
    m = ds.meta
    contigs = ", ".join(f"{c} {n:,}" for c, n in ds.contigs)
    title = f"bams3 benchmark ({mode})"
    preamble = [
        f"- run: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, git {git_rev()}, "
        f"{time.time() - t_start:.0f} s; `python -m bench{' --quick' if a.quick else ''}`",
        f"- machine: {machine()}",
        f"- dataset: {params.pairs:,} pairs × 2 × 150 bp ({m['n_records']:,} BAM records), "
        f"aligner {aligner} ({m['generator'].get('generator', m['generator'])}), random reference "
        f"{m['genome_size']:,} bp ({contigs}), ~{m['depth']}× depth, seed {params.seed}; "
        f"BAM {util.human_bytes(m['bytes']['sorted.bam'])}",
        f"- tools: samtools {util.tool_version('samtools')}"
        + (f", {aligner} {util.tool_version(aligner)}" if aligner != "truth" else "")
        + f"; bams3: {util.fmt_cmd(bams3.cmd).replace(sys.executable, 'python') if bams3.ok else bams3.reason}",
        f"- timings: best of {a.repeat} (sweep: best of {a.sweep_repeat}); 2 threads; "
        f"per-command timeout {a.timeout:.0f} s; S3 = moto on 127.0.0.1 behind the counting "
        "proxy of bams3.testing.s3server (requests and response-body bytes counted there)",
    ]
    if harness_error:
        preamble.append(f"- **harness error, results incomplete:** {harness_error}")
    details = ["## Details", ""] + ctx.details + [
        "### Commands", "", "`$DATA` = the cached dataset directory, `$WORK` = scratch.", ""]
    details += [f"- {label}: `{cmd}`" for label, cmd in ctx.commands]
    details += ["", "### Method", "",
                "- size: bams3 = sum of the object sizes under the dataset prefix on S3 (or of "
                "the local dataset's files); anchors are files written by samtools from the same "
                "sorted BAM.",
                "- convert throughput = BAM records ÷ wall seconds. Unsorted stdin = "
                "`samtools view -u aligned.bam |` (aligner order), the same producer for bams3 "
                "and the anchors.",
                "- query/stats over S3: cold = empty BAMS3_CACHE_DIR; warm = the cache left by "
                "the cold runs. samtools reads the BAM + BAI via htslib's S3 plugin "
                f"(`s3+http://{BUCKET}/...`, HTS_S3_HOST = the proxy, HTS_S3_ADDRESS_STYLE=path); "
                "htslib saves a remote index in its working directory, so its cold runs start "
                "in an empty directory and its warm runs reuse it (BAI local, BAM over S3). "
                "Requests/bytes are from the first repeat (counters read once they settle); "
                "times are the best repeat.",
                "- floor = size of a BAM holding only the overlapping records minus the size of a "
                "header-only BAM.",
                ""]
    report.write_markdown(md_path, rows, title=title, preamble=preamble, details=details)
    try:
        report.write_chart(png_path, rows, ctx.sweep, f"{title}: {params.pairs:,} pairs")
    except Exception as e:  # noqa: BLE001
        log(f"chart failed: {e}")
    json_path.write_text(json.dumps({
        "mode": mode, "params": asdict(params), "meta": m, "sweep": ctx.sweep,
        "rows": [dict(asdict(r), goal=asdict(r.goal) if r.goal else None) for r in rows],
        "errors": ctx.errors, "harness_error": harness_error}, indent=1, default=str))

    print()
    print(report.console_table(rows))
    print()
    for line in report.bar_lines(rows):
        print(line)
    print(f"\nwrote {md_path}, {png_path} ({time.time() - t_start:.0f} s)")

    if not a.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    if harness_error:
        return 1
    if a.strict and any(r.goal is not None and r.status != report.PASS for r in rows):
        return 1
    if ctx.errors:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
