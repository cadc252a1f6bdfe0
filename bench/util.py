"""Process plumbing for the benchmark: running commands with timeouts, timing, peak memory,
installing the external tools, and small formatting helpers.

Every process the harness starts is started in its own session (``start_new_session=True``)
and, on timeout or error, stopped through its own handle: we signal that process group only.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"

_VERBOSE = True


def set_verbose(v: bool) -> None:
    global _VERBOSE
    _VERBOSE = v


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def debug(msg: str) -> None:
    if _VERBOSE:
        log(msg)


class CommandError(RuntimeError):
    def __init__(self, cmd, rc, stderr: str):
        self.cmd, self.rc, self.stderr = cmd, rc, stderr
        tail = stderr.strip().splitlines()[-6:]
        super().__init__(f"command failed (exit {rc}): {fmt_cmd(cmd)}\n    " + "\n    ".join(tail))


def fmt_cmd(cmd) -> str:
    if isinstance(cmd, str):
        return cmd
    return " ".join(shlex.quote(str(c)) for c in cmd)


# ---------------------------------------------------------------------------------------------
# process groups
# ---------------------------------------------------------------------------------------------
def _kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Signal the process group led by ``proc`` (we started it with start_new_session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Ask ``proc`` (and its group) to stop: SIGINT, then SIGTERM, then SIGKILL."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        _kill_group(proc, sig)
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------
# peak memory of a process tree
# ---------------------------------------------------------------------------------------------
class PeakRSS:
    """Poll the summed RSS of a process and all its descendants; keep the maximum.

    Summing RSS over a tree counts shared pages once per process, so it is an upper bound
    for forked workers; for a single process it is exact up to the polling interval.
    """

    def __init__(self, pid: int, interval: float = 0.02):
        import psutil

        self._psutil = psutil
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"peakrss-{pid}", daemon=True)

    def start(self) -> "PeakRSS":
        self._thread.start()
        return self

    def _sample(self) -> None:
        ps = self._psutil
        try:
            root = ps.Process(self.pid)
            procs = [root] + root.children(recursive=True)
        except ps.Error:
            return
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except ps.Error:
                pass
        self.samples += 1
        if total > self.peak:
            self.peak = total

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


# ---------------------------------------------------------------------------------------------
# running commands
# ---------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    cmd: list
    seconds: float
    rc: int = 0
    stdout: bytes = b""           # only when capture=True
    out_sha256: str | None = None  # when hash_stdout=True
    out_bytes: int = 0
    out_lines: int = 0
    stderr: str = ""
    peak_rss: int | None = None
    extra: dict = field(default_factory=dict)


def run(cmd: Sequence, *, env: dict | None = None, timeout: float = 600, cwd=None,
        stdin_file=None, stdout_file=None, capture: bool = False, hash_stdout: bool = False,
        producer: Sequence | None = None, measure_rss: bool = False, rss_interval: float = 0.02,
        check: bool = True) -> RunResult:
    """Run ``cmd`` (optionally fed by ``producer | cmd``) and time it, wall clock.

    stdout: discarded, written to ``stdout_file``, captured (``capture``) or hashed while it
    streams (``hash_stdout``: sha256, byte and line counts; nothing is kept in memory).
    ``measure_rss`` polls the peak RSS of ``cmd``'s process tree (not the producer's).
    The whole pipeline is killed if it runs longer than ``timeout`` seconds.
    """
    cmd = [str(c) for c in cmd]
    debug(("$ " + fmt_cmd(producer) + " | " if producer else "$ ") + fmt_cmd(cmd))
    procs: list[subprocess.Popen] = []
    errf = tempfile.TemporaryFile()
    perrf = tempfile.TemporaryFile() if producer else None
    out_target = subprocess.DEVNULL
    out_handle = None
    if stdout_file is not None:
        out_handle = open(stdout_file, "wb")
        out_target = out_handle
    elif capture or hash_stdout:
        out_target = subprocess.PIPE
    in_handle = open(stdin_file, "rb") if stdin_file is not None else None
    timed_out = threading.Event()
    monitor = None
    t0 = time.perf_counter()
    try:
        stdin = in_handle if in_handle is not None else subprocess.DEVNULL
        if producer:
            p0 = subprocess.Popen([str(c) for c in producer], stdin=stdin, stdout=subprocess.PIPE,
                                  stderr=perrf, env=env, cwd=cwd, start_new_session=True)
            procs.append(p0)
            stdin = p0.stdout
        p = subprocess.Popen(cmd, stdin=stdin, stdout=out_target, stderr=errf, env=env, cwd=cwd,
                             start_new_session=True)
        procs.append(p)
        if producer:
            procs[0].stdout.close()  # our copy; the consumer holds the pipe now
        if measure_rss:
            monitor = PeakRSS(p.pid, rss_interval).start()

        def on_timeout():
            timed_out.set()
            for q in procs:
                _kill_group(q)

        timer = threading.Timer(timeout, on_timeout)
        timer.daemon = True
        timer.start()
        try:
            h = hashlib.sha256() if hash_stdout else None
            chunks = []
            nbytes = nlines = 0
            if out_target is subprocess.PIPE:
                while True:
                    b = p.stdout.read(1 << 20)
                    if not b:
                        break
                    nbytes += len(b)
                    if h is not None:
                        h.update(b)
                        nlines += b.count(b"\n")
                    if capture:
                        chunks.append(b)
                p.stdout.close()
            rcs = [q.wait() for q in procs]
        finally:
            timer.cancel()
        seconds = time.perf_counter() - t0
        peak = monitor.stop() if monitor else None
        monitor = None
        errf.seek(0)
        stderr = errf.read().decode(errors="replace")
        if perrf is not None:
            perrf.seek(0)
            pe = perrf.read().decode(errors="replace")
            if pe.strip():
                stderr = f"[producer] {pe}\n{stderr}"
        rc = next((r for r in reversed(rcs) if r != 0), 0)
        if timed_out.is_set():
            raise CommandError(cmd, "timeout", f"killed after {timeout:.0f}s\n{stderr}")
        if check and rc != 0:
            raise CommandError(([*producer, "|"] if producer else []) + cmd, rc, stderr)
        return RunResult(cmd=cmd, seconds=seconds, rc=rc, stdout=b"".join(chunks),
                         out_sha256=h.hexdigest() if h else None, out_bytes=nbytes,
                         out_lines=nlines, stderr=stderr, peak_rss=peak)
    finally:
        if monitor is not None:
            monitor.stop()
        for q in procs:
            if q.poll() is None:
                _kill_group(q)
                try:
                    q.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        for f in (errf, perrf, out_handle, in_handle):
            if f is not None:
                f.close()


def best_of(n: int, fn: Callable[[int], RunResult], *, setup: Callable[[int], None] | None = None,
            key=lambda r: r.seconds) -> tuple[RunResult, list[RunResult]]:
    """Call ``fn(i)`` ``n`` times (``setup(i)`` before each, untimed); return (best, all)."""
    results = []
    for i in range(max(1, n)):
        if setup:
            setup(i)
        results.append(fn(i))
    return min(results, key=key), results


# ---------------------------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------------------------
APT_PACKAGES = {"samtools": "samtools", "bwa": "bwa", "minimap2": "minimap2"}


def ensure_tools(names: Sequence[str], *, install: bool = True, timeout: float = 900) -> dict:
    """Make sure the external tools exist; apt-get install the missing ones if we may.

    Returns {name: path or None}. Raises RuntimeError with instructions if a required tool is
    missing and cannot be installed.
    """
    found = {n: shutil.which(n) for n in names}
    missing = [n for n, p in found.items() if p is None]
    if not missing:
        return found
    pkgs = sorted({APT_PACKAGES.get(n, n) for n in missing})
    cmd_text = "apt-get update && apt-get install -y " + " ".join(pkgs)
    can_apt = shutil.which("apt-get") is not None and hasattr(os, "geteuid") and os.geteuid() == 0
    if not install or not can_apt:
        why = "--no-install given" if not install else (
            "apt-get not available" if not shutil.which("apt-get") else "not running as root")
        raise RuntimeError(f"missing tools: {', '.join(missing)} ({why}). Install them with:\n"
                           f"    sudo {cmd_text}\n(or conda install -c bioconda {' '.join(pkgs)})")
    log(f"missing tools: {', '.join(missing)} -> installing with: {cmd_text}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for c in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *pkgs]):
        r = subprocess.run(c, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"`{fmt_cmd(c)}` failed (exit {r.returncode}):\n{r.stderr[-2000:]}\n"
                               f"Install the tools yourself: {cmd_text}")
    found = {n: shutil.which(n) for n in names}
    still = [n for n, p in found.items() if p is None]
    if still:
        raise RuntimeError(f"still missing after apt-get: {', '.join(still)}")
    log("installed " + ", ".join(missing))
    return found


def tool_version(name: str) -> str:
    try:
        if name == "samtools":
            r = subprocess.run(["samtools", "--version"], capture_output=True, text=True, errors="replace", timeout=30)
            return r.stdout.splitlines()[0].split()[-1]
        if name == "bwa":
            r = subprocess.run(["bwa"], capture_output=True, text=True, errors="replace", timeout=30)
            for line in r.stderr.splitlines():
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
        if name == "minimap2":
            r = subprocess.run(["minimap2", "--version"], capture_output=True, text=True, errors="replace", timeout=30)
            return r.stdout.strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return "?"


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------
def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total
