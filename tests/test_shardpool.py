"""Shards on worker processes (issue #14): `bams3 convert` runs the shards of an indexed BAM on
--threads processes; the dataset is the one-shard dataset; a failure in a worker is one line and
commits nothing; the workers end with the command (Ctrl-C, SIGTERM, SIGKILL); --resume takes
over a killed run. samtools (pysam) is the oracle for the records."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import psutil
import pysam
import pytest

from bams3 import shardpool, stages
from bams3.errors import InputError
from conftest_data import BAMS3, samtools_view

WAIT = 120  # seconds to reach a state on a loaded machine (a hang fails the test after this)


@pytest.fixture(scope="module")
def bam(tmp_path_factory):
    """A coordinate-sorted, indexed BAM of 12,000 pairs (~2 MB): several shards of many chunks."""
    from bams3.sample import make_sample

    d = tmp_path_factory.mktemp("procs")
    return make_sample(d, 12000, 4)["bam"]


def cli(*args) -> int:
    from bams3.cli import main

    return main([str(a) for a in args])


def query(ds) -> str:
    out = f"{ds}-q.sam"
    assert cli("query", "--no-cache", ds, "-o", out) == 0
    with open(out) as f:
        return f.read()


def _env() -> dict:
    e = dict(os.environ)
    e.setdefault("BAMS3_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "bams3-test-cache"))
    return e


def _wait_for(what, cond, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def _workers(proc: psutil.Process) -> list[psutil.Process]:
    """The shard workers of a running `bams3 convert` (the forkserver's children) once both are
    set up (their thread watching the caller runs)."""
    try:
        workers = [w for c in proc.children() for w in c.children()]
        return workers if len(workers) >= 2 and all(w.num_threads() >= 2 for w in workers) else []
    except psutil.NoSuchProcess:
        return []


def _gone(procs: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)


# -- the default: processes, same records --------------------------------------------------------
def test_cli_converts_on_processes_like_one_shard(bam, tmp_path, capsys, monkeypatch):
    from test_stages import spy_pools

    pools = spy_pools(monkeypatch)
    assert cli("convert", "--chunk-size", "64K", bam, tmp_path / "one", "--shards", "1") == 0
    assert pools == []
    capsys.readouterr()
    assert cli("convert", "--chunk-size", "64K", "--shards", "5", bam, tmp_path / "many") == 0
    assert pools == [2]  # -@ 2 (the default): two worker processes
    err = capsys.readouterr().err
    totals = [int(t) for t in re.findall(r"total (\d+) records", err)]
    n = int(pysam.samtools.view("-c", bam))
    assert totals and max(totals) == n  # progress summed over the shards of both workers
    assert f"wrote {n} records" in err
    assert query(tmp_path / "many") == query(tmp_path / "one") == samtools_view(bam)
    # by default, the plan makes at least two shards per process (a 66 MB BAM: 4, not 2)
    assert stages._shard_count(66 << 20, None, 2, stages.DEFAULT_SHARD_BYTES) == 4
    assert stages._shard_count(66 << 20, 3, 2, stages.DEFAULT_SHARD_BYTES) == 3  # --shards wins


def test_share_threads_and_memory():
    job = stages.ShardJob(number=0, source="x", kind="range", run_id="r", store={}, threads=4, max_memory=768 << 20)
    assert [(j.threads, j.max_memory) for j in shardpool.share([job], 2)] == [(2, 384 << 20)]
    assert [(j.threads, j.max_memory) for j in shardpool.share([job], 8)] == [(1, 96 << 20)]
    assert shardpool.worth_it([job, job], 2) and not shardpool.worth_it([job], 2)
    assert not shardpool.worth_it([job, job], 1) and not shardpool.worth_it([job, job], 2, inp=object())
    stream = stages.ShardJob(number=0, source="x", kind="stream", run_id="r", store={})
    assert not shardpool.worth_it([stream, job], 2)


# -- failures --------------------------------------------------------------------------------
def test_corrupt_block_in_a_worker_is_one_line(bam, tmp_path):
    src = tmp_path / "bad.bam"
    shutil.copy(bam, src)
    size = src.stat().st_size
    with open(src, "r+b") as f:  # garble 64 bytes two thirds in: one shard's block fails its CRC
        f.seek(size * 2 // 3)
        junk = bytes(b ^ 0x5A for b in f.read(64))
        f.seek(size * 2 // 3)
        f.write(junk)
    shutil.copy(bam + ".bai", str(src) + ".bai")  # (newer than the BAM: htslib says nothing)
    r = subprocess.run(BAMS3 + ["convert", "--shards", "4", str(src), str(tmp_path / "ds")], capture_output=True,
                       env=_env(), timeout=600)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "corrupt BGZF block" in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "ds" / "manifest.json").exists()
    assert [p for p in (tmp_path / "ds").rglob("*") if p.is_file()] == []  # bad input: nothing kept


def test_killed_worker_is_one_line(bam, tmp_path):
    """A worker killed mid-shard (here: blocked reading a FIFO) is WorkerDied, not a hang."""
    fifo = tmp_path / "fifo.bam"
    os.mkfifo(fifo)
    job = stages.ShardJob(number=3, source=str(fifo), kind="range", run_id="0123456789abcdef",
                          store=stages.store_spec(str(tmp_path / "ds")), threads=1, block_bytes=1 << 16,
                          chunk_bytes=1 << 20)
    with pytest.raises(shardpool.WorkerDied, match="shard 3: its worker process ended unexpectedly"):
        with shardpool.ShardPool(1) as pool:
            fut = pool.submit(job)
            proc = _wait_for("the worker", lambda: list(pool._pool._processes.values()))[0]
            os.kill(proc.pid, signal.SIGKILL)
            pool.result(fut, "shard 3")
    assert not proc.is_alive()


def test_errors_come_back_as_they_were_raised(tmp_path):
    job = stages.ShardJob(number=0, source=str(tmp_path / "missing.bam"), kind="range", run_id="0123456789abcdef",
                          store=stages.store_spec(str(tmp_path / "ds")), threads=1, block_bytes=1 << 16,
                          chunk_bytes=1 << 20)
    with pytest.raises(InputError, match="missing.bam: No such file"):
        with shardpool.ShardPool(2) as pool:
            pool.run([job, job])


# -- the workers end with the command ------------------------------------------------------------
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_no_orphans(bam, tmp_path, how):
    """Stop the workers (SIGSTOP: they cannot finish first), then signal the command: it ends,
    its workers and forkserver end, nothing is committed (Ctrl-C / SIGTERM: nothing is left)."""
    dest = tmp_path / "ds"
    p = subprocess.Popen(BAMS3 + ["convert", "-q", "--chunk-size", "24K", "--block-size", "8K", "--shards", "4", bam,
                                  str(dest)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        proc = psutil.Process(p.pid)
        workers = _wait_for("two workers", lambda: _workers(proc))
        everyone = proc.children(recursive=True)
        for w in workers:
            w.send_signal(signal.SIGSTOP)
        if how == "SIGINT":  # Ctrl-C: the whole foreground group
            os.killpg(p.pid, signal.SIGINT)
        else:
            p.send_signal(getattr(signal, how))
        rc = p.wait(WAIT)
        _wait_for("the workers and the forkserver to end", lambda: _gone(everyone), timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read().decode()
    assert rc != 0
    assert not (dest / "manifest.json").exists()
    if how == "SIGKILL":
        assert rc == -signal.SIGKILL
    else:
        assert rc == 130 and err.strip() == "bams3: interrupted", err
        assert [x for x in dest.rglob("*") if x.is_file()] == []  # the run was aborted: nothing left


def _leading(dest) -> list:
    """The ledger entries of shards' first chunks (number s * CHUNK_STRIDE) under ``dest``."""
    from bams3core.shards import CHUNK_STRIDE

    return [p for p in dest.glob("_tmp/*/chunk-*.json") if int(p.stem.split("-")[1]) % CHUNK_STRIDE == 0]


def test_resume_after_kill(bam, tmp_path, capsys):
    """SIGKILL of the command once a chunk is in the ledger; --resume reuses the finished chunks."""
    dest = tmp_path / "ds"
    args = ["convert", "--resume", "-q", "--chunk-size", "24K", "--block-size", "8K", "--shards", "4", bam, str(dest)]
    p = subprocess.Popen(BAMS3 + args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc = psutil.Process(p.pid)
        workers = _wait_for("two workers", lambda: _workers(proc))
        # a shard's uploads run concurrently, so its chunk 1 may reach the ledger before its
        # chunk 0; resume reuses a shard's leading chunks only: wait for some shard's first one
        _wait_for("a shard's first chunk in the ledger", lambda: _leading(dest))
        everyone = proc.children(recursive=True)
        for w in workers:
            w.send_signal(signal.SIGSTOP)
        p.kill()
        p.wait(WAIT)
        _wait_for("the workers to end", lambda: _gone(everyone + workers), timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert _leading(dest) and not (dest / "manifest.json").exists()
    capsys.readouterr()
    assert cli(*[a for a in args if a != "-q"]) == 0
    m = re.search(r"resumed a previous run: (\d+) chunks reused", capsys.readouterr().err)
    assert m and int(m.group(1)) >= 1
    assert query(dest) == samtools_view(bam)


def test_unguarded_script_runs_its_shards_in_process(bam, tmp_path):
    """A worker process imports the caller's main module first: a script that converts at its
    top level, without ``if __name__ == "__main__":``, would convert again in every worker (and
    the pool would break). Such a caller gets its shards run in its own process instead; `python
    -c` and bams3's own entry points keep the workers."""
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "import sys\n"
        "from bams3 import shardpool\n"
        "from bams3.convert import ConvertOptions, convert\n"
        "from bams3.store import open_store\n"
        "print('safe', shardpool.main_reimport_safe(), flush=True)\n"
        "with open_store(sys.argv[2]) as st:\n"
        "    r = convert(sys.argv[1], st, ConvertOptions(processes=2, threads=2, shards=3, chunk_bytes=1 << 18))\n"
        "print('records', r.records, 'shards', r.shards, flush=True)\n")
    out = tmp_path / "ds"
    p = subprocess.run([sys.executable, str(script), bam, str(out)], capture_output=True, text=True, env=_env(),
                       timeout=WAIT * 3)
    assert p.returncode == 0, p.stderr[-2000:]
    n = int(pysam.samtools.view("-c", bam).strip())
    assert p.stdout.split() == ["safe", "False", "records", str(n), "shards", "4"], p.stdout
    assert query(out) == samtools_view(bam)
    code = "from bams3 import shardpool; print(shardpool.main_reimport_safe())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"
    assert shardpool.main_reimport_safe()  # pytest's console script (this process)
