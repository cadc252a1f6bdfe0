"""Scale rows (issue #11, docs/SCALE.md): the flow against the CLI, Dask workers, resume after
kill -9, and migrate run twice. Every figure is measured in this run on the same sorted BAM.

* flow vs CLI: ``convert_to_s3`` in its own process against a running ``prefect server``
  (started here, SQLite in the scratch directory) vs ``bams3 convert``, both into a local
  directory, process wall time, best of ``repeat``.
* Dask: ``taskset -c 0[,1] bams3 convert --dask local:N -@ 1 --shards S`` for N = 1, 2
  (one-thread workers, one core each); the time is the conversion's own (the line ``wrote ... in X s``: the cluster's start is not
  the workers' speed), best of ``repeat``.
* resume: ``bams3 convert --resume`` SIGKILLed once ~70% of its chunks have a ledger entry,
  then run again; the share of records encoded again and record identity (``bams3 query``
  output hashed, against an uninterrupted conversion).
* migrate: a directory of 5 BAMs migrated twice; chunk objects written by the second run.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .report import Goal
from .s3 import base_env
from .util import CommandError, log, run

SHARDS = 8  # Dask and resume runs: enough shards for two workers and a kill at ~70%
_WROTE = re.compile(r"wrote (\d+) records to .* in ([0-9.]+) s")
_RESUMED = re.compile(r"resumed a previous run: (\d+) chunks reused, (\d+) of (\d+) records encoded")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectServer:
    """``prefect server start`` on 127.0.0.1 with its own PREFECT_HOME (stopped by PID)."""

    def __init__(self, work: Path):
        self.home = work / "prefect-home"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict:
        return dict(base_env(), PREFECT_HOME=str(self.home), PREFECT_API_URL=self.url,
                    PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING")

    def start(self, timeout: float = 120) -> "PrefectServer":
        self.home.mkdir(parents=True, exist_ok=True)
        env = self.env()
        env.pop("PREFECT_API_URL")
        prefect = Path(sys.executable).parent / "prefect"
        self.log = open(self.home / "server.log", "wb")
        self.proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port",
                                      str(self.port)], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({self.proc.returncode}); see {self.home}/server.log")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"prefect server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()


def _conversion_seconds(stderr: str) -> float:
    m = _WROTE.search(stderr)
    if not m:
        raise CommandError(f"no 'wrote ... in X s' line in: {stderr[-300:]}")
    return float(m.group(2))


def measure(ctx) -> None:
    """Append the scale rows to ``ctx`` (a :class:`bench.measure.Ctx`)."""
    src, work, to = ctx.ds.sorted_bam, ctx.work, ctx.timeout
    env = dict(base_env(), BAMS3_CACHE_DIR=str(work / "cache-scale"))
    b3 = ctx.bams3
    n = ctx.ds.n_records

    # -- flow vs CLI (a running Prefect server) ---------------------------------------------
    sec = "scale: convert-to-s3 flow vs bams3 convert (running Prefect server, local dir)"
    flow_code = ("import sys; from flows import convert_to_s3; "
                 "convert_to_s3(source=sys.argv[1], destination=sys.argv[2], threads=2, overwrite=True)")
    server = None
    try:
        server = PrefectServer(work).start()
        cli_cmd = b3("convert", "-q", "-@", 2, "--overwrite", src, work / "sc-cli")
        flow_cmd = [sys.executable, "-c", flow_code, src, work / "sc-flow"]
        ctx.cmdlog("scale: CLI", cli_cmd)
        ctx.cmdlog("scale: flow (PREFECT_API_URL = a local prefect server)", flow_cmd)
        t_cli, t_flow = [], []
        for _ in range(max(1, ctx.repeat)):
            t_cli.append(run(cli_cmd, env=env, timeout=to).seconds)
            t_flow.append(run(flow_cmd, env=dict(server.env(), BAMS3_CACHE_DIR=env["BAMS3_CACHE_DIR"]),
                              timeout=to).seconds)
        ctx.row(sec, "flow wall time vs CLI", "s", min(t_flow), "bams3 convert", min(t_cli), goal=Goal("<=", 1.25),
                note="both whole processes (interpreter start, imports, plan, shards, commit); "
                     "the flow's default verify_mode (upload) reads nothing back")
    except (CommandError, RuntimeError) as e:
        ctx.errors.append(f"flow vs CLI: {e}")
        ctx.row(sec, "flow wall time vs CLI", "s", None, "bams3 convert", None, goal=Goal("<=", 1.25),
                missing=("ERROR", f"error: {str(e)[:300]}"))
    finally:
        if server is not None:
            server.stop()

    # -- 1 vs 2 Dask workers -------------------------------------------------------------------
    sec = f"scale: Dask workers × 1 thread, one core each (taskset), --shards {SHARDS}"
    try:
        times = {}
        # A shard's "one thread" still overlaps BGZF inflation, encoding and uploads, so an
        # unpinned worker spreads over every core: each worker gets its own core (taskset) —
        # 1 worker on core 0, 2 workers on cores 0-1 — else 1 vs 2 measures nothing.
        cores = {1: "0", 2: "0,1"}
        cmds = {w: ["taskset", "-c", cores[w], *b3("convert", "--dask", f"local:{w}", "-@", 1, "--shards", SHARDS,
                                                    "--overwrite", src, work / f"sc-dask{w}")] for w in (1, 2)}
        for w in (1, 2):
            ctx.cmdlog(f"scale: Dask {w} worker(s)", cmds[w])
        for _ in range(max(1, ctx.repeat)):
            for w in (1, 2):
                r = run(cmds[w], env=env, timeout=to)
                times.setdefault(w, []).append(_conversion_seconds(r.stderr))
        ctx.details += ["### Scale: Dask", "",
                        f"- conversion seconds (excluding the LocalCluster's start), 1 worker: "
                        f"{', '.join(f'{t:.1f}' for t in times[1])}; 2 workers: "
                        f"{', '.join(f'{t:.1f}' for t in times[2])}",
                        f"- per-core rate (1 worker × 1 thread): {n / min(times[1]):,.0f} records/s", ""]
        ctx.scale_rate = n / min(times[1])
        # the machine's own ceiling: two independent one-core conversions at once vs one alone
        one = [*b3("convert", "-q", "-@", 1, "--shards", 1, "--overwrite", src)]
        alone = run(["taskset", "-c", "0", *one, work / "sc-c0"], env=env, timeout=to).seconds
        procs = [subprocess.Popen(["taskset", "-c", str(c), *[str(x) for x in one], str(work / f"sc-c{c}")],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in (0, 1)]
        t0 = time.perf_counter()
        if any(p.wait() != 0 for p in procs):
            raise CommandError("two concurrent one-core conversions: one failed")
        both = time.perf_counter() - t0
        ctx.row(sec, "ceiling: 2 one-core conversions at once vs 1 (throughput)", "", 2 * alone / both,
                note=f"{alone:.1f} s alone, {both:.1f} s for two at once on cores 0 and 1: what two cores "
                     "give here, whatever the program")
        ctx.row(sec, "2 workers vs 1 worker → reads/s", "reads/s", n / min(times[2]), "1 worker × 1 thread",
                n / min(times[1]), goal=Goal(">=", 1.7), note="each worker on its own core (taskset)")
    except CommandError as e:
        ctx.errors.append(f"dask: {e}")
        ctx.row(sec, "2 workers vs 1 worker → reads/s", "reads/s", None, "1 worker × 1 thread", None,
                goal=Goal(">=", 1.7), missing=("ERROR", f"error: {str(e)[:300]}"))

    # -- kill -9 at ~70 %, resume ----------------------------------------------------------------
    sec = "scale: kill -9 at ~70%, then --resume"
    ref, dst = work / "sc-ref", work / "sc-resume"
    try:
        args = ["-q", "-@", 2, "--shards", SHARDS, src]
        run(b3("convert", *args, ref), env=env, timeout=to)
        total_chunks = sum(1 for _ in ref.glob("data/*/chunks/*.b3c"))
        cmd = b3("convert", "--resume", *args, dst)
        ctx.cmdlog("scale: resume (killed, then again)", cmd)
        proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killed_at = None
        deadline = time.time() + to
        while proc.poll() is None and time.time() < deadline:
            done = sum(1 for _ in dst.glob("_tmp/*/chunk-*.json"))
            if done >= 0.7 * total_chunks:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = done
                break
            time.sleep(0.05)
        proc.wait()
        if killed_at is None:
            raise CommandError("the conversion ended before ~70% of its chunks were written: nothing to kill")
        r = run(b3("convert", "--resume", *args[1:], dst), env=env, timeout=to)
        m = _RESUMED.search(r.stderr)
        if not m:
            raise CommandError(f"the rerun did not resume: {r.stderr[-300:]}")
        reused, encoded, records = (int(x) for x in m.groups())
        qa = run(b3("query", "--no-cache", ref), env=env, timeout=to, hash_stdout=True)
        qb = run(b3("query", "--no-cache", dst), env=env, timeout=to, hash_stdout=True)
        same = qa.out_sha256 == qb.out_sha256 and qa.out_lines == records
        ctx.details += ["### Scale: resume", "",
                        f"- killed (SIGKILL) with {killed_at} of {total_chunks} chunks in the ledger; the rerun "
                        f"reused {reused} chunks and encoded {encoded:,} of {records:,} records", ""]
        ctx.row(sec, "records encoded again (share)", "", encoded / records, goal=Goal("<=", 0.35, on="value",
                                                                                    label="≤ 0.35"),
                note=f"killed at {killed_at}/{total_chunks} chunks")
        ctx.row(sec, "resumed dataset = uninterrupted one (bams3 query)", "bool", 1.0 if same else 0.0,
                goal=Goal(">=", 1, on="value", label="identical"))
    except CommandError as e:
        ctx.errors.append(f"resume: {e}")
        ctx.row(sec, "records encoded again (share)", "", None, goal=Goal("<=", 0.35, on="value", label="≤ 0.35"),
                missing=("ERROR", f"error: {str(e)[:300]}"))

    # -- migrate twice ---------------------------------------------------------------------------
    sec = "scale: migrate a directory of 5 BAMs, twice"
    srcdir, dest = work / "sc-inputs", work / "sc-archive"
    try:
        srcdir.mkdir(exist_ok=True)
        import pysam

        for i in range(5):
            pysam.samtools.view("-b", "--subsample", "0.2", "--subsample-seed", str(i), "-o",
                                str(srcdir / f"s{i}.bam"), str(src), catch_stdout=False)
        cmd = b3("migrate", "-q", srcdir, dest)
        ctx.cmdlog("scale: migrate (twice)", cmd)
        run(cmd, env=env, timeout=to)
        first = {p: p.stat().st_mtime_ns for p in dest.rglob("*.b3c")}
        r = run(cmd, env=env, timeout=to)
        after = {p: p.stat().st_mtime_ns for p in dest.rglob("*.b3c")}
        written = sum(1 for p, t in after.items() if first.get(p) != t)
        ctx.row(sec, "chunk objects written by the second run", "chunks", written,
                goal=Goal("<=", 0, on="value", label="none"),
                note=f"{len(first)} chunks after the first run; second run {r.seconds:.1f} s")
    except CommandError as e:
        ctx.errors.append(f"migrate: {e}")
        ctx.row(sec, "chunk objects written by the second run", "chunks", None,
                goal=Goal("<=", 0, on="value", label="none"), missing=("ERROR", f"error: {str(e)[:300]}"))
    log("scale: done")
