"""Shards on worker processes: what ``bams3 convert`` runs a sharded plan on, and the pool a
``convert-to-s3`` flow run hands its ``shard`` tasks to.

The encoders hold the interpreter lock most of the time, so two threads of one process convert
little faster than one; two processes convert about twice as fast. A :class:`ShardPool` runs
:func:`bams3.stages.run_shard` calls (plain values in, plain values out: each shard opens its
own input and store from the job) on ``N`` processes, each with its share of the threads and
of the memory budget (:func:`share`).

* The processes come from a forkserver (never a fork of the caller, whose threads may hold
  locks), started early by :func:`prestart` and preloaded with :mod:`bams3.shardwarm`: the
  modules and compiled kernels a shard needs are loaded once, and every worker forks from that
  warm interpreter.
* A shard that raises in a worker raises the same error here (one line); a worker that dies
  (killed, out of memory) is :class:`WorkerDied`. Either stops the other workers; the caller
  commits nothing.
* Workers end with the caller: Ctrl-C (they ignore SIGINT; the caller stops them), SIGTERM of
  the caller (turned into KeyboardInterrupt while the pool runs, so the run is aborted or
  suspended as after Ctrl-C), and a caller killed outright (each worker watches the caller's
  end of a pipe, and the forkserver exits with the caller, which the kernel turns into
  SIGKILL for its workers: see :func:`_end_with_the_caller`).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import queue
import signal
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

from .errors import Bams3Error

#: what the forkserver imports before it forks workers (bams3.shardwarm loads the rest)
PRELOAD = ["bams3.shardwarm"]
#: seconds between looks at the workers' progress and at the shards' futures
POLL_SECONDS = 0.2
#: seconds to wait for killed workers to be reaped
STOP_SECONDS = 5.0


class WorkerDied(Bams3Error):
    """A shard's worker process ended without a result (killed, out of memory)."""


def _context():
    import multiprocessing

    return multiprocessing.get_context("forkserver")


def prestart() -> None:
    """Start the forkserver now (it warms up while the caller plans). Idempotent; the
    forkserver ends when this process does."""
    from multiprocessing import forkserver

    ctx = _context()
    ctx.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()


def share(jobs: list, processes: int) -> list:
    """The jobs as they run on ``processes`` workers: each gets its share of the threads (at
    least one) and of the memory budget."""
    n = max(1, processes)
    return [dataclasses.replace(j, threads=max(1, j.threads // n), max_memory=max(1 << 20, j.max_memory // n))
            for j in jobs]


# -- the worker side -------------------------------------------------------------------------
_progress_queue = None


def _init_worker(progress_queue, env: dict, cwd: str) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    # the caller's environment (S3 endpoint, credentials...) and working directory (relative
    # paths) as they are now, not as they were when the forkserver started
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the caller decides
    _end_with_the_caller()


def _end_with_the_caller() -> None:
    """Make this worker end when the process that started the pool does, however it ends.

    * The forkserver exits once no process holds its "alive" pipe: a worker inherits one end
      and lets it go here, so the forkserver goes with the caller; the kernel then sends this
      worker SIGKILL (PR_SET_PDEATHSIG), which ends it even if it is stopped or busy.
    * A thread waits on the caller's sentinel (a pipe whose other end only the caller holds)
      and kills this process when it closes."""
    import multiprocessing
    from multiprocessing import connection, forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:  # (a worker starts no process of its own)
        try:
            os.close(fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    parent = multiprocessing.parent_process()
    if parent is not None:
        def watch() -> None:
            connection.wait([parent.sentinel])
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="caller-watch", daemon=True).start()


def _report(number: int, info: dict) -> None:
    if _progress_queue is not None:
        _progress_queue.put((number, {k: info[k] for k in ("chunk", "bytes", "records", "records_total",
                                                          "bytes_total")}))


def run_job(job):
    """:func:`bams3.stages.run_shard` in a worker (progress sent to the caller, if it listens)."""
    from .stages import run_shard

    try:
        return run_shard(job, progress=(lambda info: _report(job.number, info)) if _progress_queue else None)
    except Bams3Error:
        raise
    except Exception as e:  # noqa: BLE001 - what cannot be pickled back still says what happened
        try:
            pickle.dumps(e)
        except Exception:  # noqa: BLE001
            raise Bams3Error(f"shard {job.number}: {type(e).__name__}: {e}") from None
        raise


# -- the caller's side -----------------------------------------------------------------------
class ShardPool:
    """``processes`` worker processes running shard jobs. Use as a context manager: leaving it
    with an exception (or Ctrl-C) stops the workers at once."""

    def __init__(self, processes: int, *, progress: bool = False):
        prestart()
        ctx = _context()
        self.processes = max(1, processes)
        self._queue = ctx.Queue() if progress else None
        self._pool = ProcessPoolExecutor(self.processes, mp_context=ctx, initializer=_init_worker,
                                         initargs=(self._queue, dict(os.environ), os.getcwd()))

    def __enter__(self) -> "ShardPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(stop=exc_type is not None)

    def submit(self, job) -> Future:
        return self._pool.submit(run_job, job)

    def result(self, fut: Future, what: str = "a shard"):
        """``fut``'s result; a dead worker becomes :class:`WorkerDied` (one line)."""
        try:
            return fut.result()
        except BrokenProcessPool:
            raise WorkerDied(f"{what}: its worker process ended unexpectedly (killed? out of memory?); "
                             "nothing was committed") from None

    def run(self, jobs: list, progress: Callable[[dict], None] | None = None) -> list:
        """Run ``jobs`` (largest first) and return their results; the first failure stops the
        rest and is raised. ``progress`` gets the chunks as the workers upload them, with
        totals over all shards."""
        with _sigterm_interrupts():
            futs = {self.submit(j): j for j in sorted(jobs, key=lambda j: -j.est_bytes)}
            totals: dict[int, tuple[int, int]] = {}
            t0 = time.time()
            pending = set(futs)
            while pending:
                done, pending = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_EXCEPTION)
                self._drain(totals, progress, t0)
                for f in done:
                    if f.exception() is not None:
                        self.result(f, f"shard {futs[f].number}")  # raises
            self._drain(totals, progress, t0)
            return [self.result(f) for f in futs]

    def _drain(self, totals: dict, progress, t0: float) -> None:
        if self._queue is None:
            return
        while True:
            try:
                number, info = self._queue.get_nowait()
            except queue.Empty:
                return
            totals[number] = (info["records_total"], info["bytes_total"])
            if progress:
                el = max(time.time() - t0, 1e-9)
                records = sum(r for r, _b in totals.values())
                progress({**info, "records_total": records, "bytes_total": sum(b for _r, b in totals.values()),
                          "elapsed": el, "records_per_s": records / el})

    def close(self, stop: bool = False) -> None:
        """Wait for the workers to finish (``stop``: end them now: nothing they do is wanted)."""
        procs = list((getattr(self._pool, "_processes", None) or {}).values())
        if stop:  # SIGKILL: a stopped (or hung) worker would never act on SIGTERM
            for p in procs:
                if p.is_alive():
                    p.kill()
        self._pool.shutdown(wait=not stop, cancel_futures=stop)
        if stop:
            deadline = time.time() + STOP_SECONDS
            for p in procs:
                p.join(max(0.0, deadline - time.time()))
        if self._queue is not None:
            self._queue.close()
            self._queue.join_thread()


class _sigterm_interrupts:
    """While the pool runs in the main thread, SIGTERM raises KeyboardInterrupt (the run is
    ended as by Ctrl-C: workers stopped, run aborted or suspended); another handler installed
    by the application (Prefect's, say) is left alone."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            self.old = signal.signal(signal.SIGTERM, _interrupt)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# -- the pools of flow runs ------------------------------------------------------------------
_serving: dict[str, ShardPool] = {}
_serving_lock = threading.Lock()


def serve(run_id: str, pool: ShardPool) -> None:
    """Let the shard tasks of conversion ``run_id`` in this process hand their jobs to ``pool``."""
    with _serving_lock:
        _serving[run_id] = pool


def serving(run_id: str) -> ShardPool | None:
    with _serving_lock:
        return _serving.get(run_id)


def unserve(run_id: str) -> None:
    with _serving_lock:
        _serving.pop(run_id, None)


def worth_it(jobs: list, processes: int, inp=None) -> bool:
    """Whether ``jobs`` go to worker processes: two or more key-range shards (each reads its own
    part of an indexed file), two or more processes, no open input (a stream stays here), and
    a main module the workers may import (:func:`main_reimport_safe`)."""
    return (processes > 1 and inp is None and len(jobs) > 1 and all(j.kind == "range" for j in jobs)
            and main_reimport_safe())


#: main modules known to guard what they run with ``if __name__ == "__main__"``
_SAFE_MAIN_MODULES = ("bams3.", "prefect.engine", "flows.", "tasks.")


def main_reimport_safe() -> bool:
    """Whether worker processes may be started from this process. A forkserver's (or spawn's)
    worker imports the caller's main module before it runs anything, as ``__mp_main__``: a
    script that calls a flow at its top level, without ``if __name__ == "__main__":``, would
    run it again in every worker. Safe: no main file (``python -c``, a REPL, a notebook), a
    ``__main__`` module run with ``-m`` (never re-imported), bams3's and Prefect's engine
    modules, and the console-script wrappers pip writes (they guard their call); anything else
    (a user's script) runs the shards in this process instead."""
    import sys
    import sysconfig

    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        return name == "__main__" or name.endswith(".__main__") or \
            any(name == m or name.startswith(m) for m in _SAFE_MAIN_MODULES)
    path = getattr(main, "__file__", None)
    if path is None:
        return True
    scripts = {os.path.realpath(sysconfig.get_path("scripts")), os.path.realpath(os.path.dirname(sys.executable))}
    return os.path.realpath(os.path.dirname(os.path.abspath(path))) in scripts


__all__ = ["ShardPool", "WorkerDied", "prestart", "share", "serve", "serving", "unserve", "worth_it", "run_job",
           "main_reimport_safe"]
