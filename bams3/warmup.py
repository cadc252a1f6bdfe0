"""`bams3 warmup`: compile every numba kernel once and keep it in numba's on-disk cache.

The byte-moving loops and the quality coder are numba kernels (``bams3core.kernels``,
``bams3core.qualcodec``), compiled lazily on first use with ``cache=True``: the first command on
a fresh install compiles the kernels it needs (seconds each), later processes load them from
the cache. Container images and throwaway workers would pay that on every start, so ``bams3
warmup`` runs the real commands (convert of a sorted and an unsorted BAM, query, count, BAM
output, export, verify) on a small generated input in a temporary directory: the
kernels are compiled with exactly the argument types the commands pass, and stored.

Where numba keeps them: ``$NUMBA_CACHE_DIR`` if set; else ``__pycache__`` next to the sources
when that is writable; else numba's user-wide cache (``~/.cache/numba``); if none is writable,
``$TMPDIR/bams3-numba-<uid>`` (bams3core.jit). numba reads a cache
directory only if it can write to it, and a cache entry only for the same source file (path,
size, mtime) and the same CPU model (``NUMBA_CPU_NAME=generic`` makes it portable across
machines). docs/STARTUP.md has the Dockerfile lines.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

KERNEL_MODULES = ("bams3core.kernels", "bams3core.qualcodec", "bams3core.seqcodec")


def dispatchers() -> list[tuple[str, object]]:
    """Every numba kernel of bams3core as (module.name, dispatcher); imports numba."""
    import importlib

    mods = [importlib.import_module(m) for m in KERNEL_MODULES]  # before numba: bams3core.jit
    from numba.core.registry import CPUDispatcher

    out = []
    for modname, mod in zip(KERNEL_MODULES, mods):
        for name, obj in sorted(vars(mod).items()):
            if isinstance(obj, CPUDispatcher) and obj.py_func.__module__ == modname:
                out.append((f"{modname}.{name}", obj))
    return out


def loaded_dispatchers() -> list[tuple[str, object]]:
    """The kernels of the kernel modules this process has imported (none if it imported none)."""
    import sys

    if not any(m in sys.modules for m in KERNEL_MODULES):
        return []
    return [(n, d) for n, d in dispatchers() if d.py_func.__module__ in sys.modules]


def cache_counts(disps=None) -> dict:
    """Signatures compiled in this process (cache misses) and loaded from the cache (hits)."""
    disps = loaded_dispatchers() if disps is None else disps
    hits = sum(sum(d.stats.cache_hits.values()) for _n, d in disps)
    misses = sum(sum(d.stats.cache_misses.values()) for _n, d in disps)
    return {"compiled": misses, "loaded": hits}


@dataclass
class WarmupReport:
    seconds: float
    cache_dir: str
    kernels: dict = field(default_factory=dict)  # name -> number of compiled signatures
    compiled: int = 0   # signatures compiled now (and written to the cache)
    loaded: int = 0     # signatures that were already in the cache

    @property
    def unused(self) -> list[str]:
        """Kernels no command called here (called only from other kernels, or inlined)."""
        return [k for k, n in self.kernels.items() if n == 0]

    def to_dict(self) -> dict:
        return {"seconds": round(self.seconds, 3), "cache_dir": self.cache_dir, "compiled": self.compiled,
                "loaded": self.loaded, "signatures": sum(self.kernels.values()), "kernels": self.kernels}

    def summary(self) -> str:
        n = sum(1 for v in self.kernels.values() if v)
        return (f"warmup: {n} kernels, {sum(self.kernels.values())} signatures: {self.compiled} compiled and "
                f"cached now, {self.loaded} loaded from the cache, in {self.seconds:.1f} s; numba cache: "
                f"{self.cache_dir}")


# -- the input: a small SAM with what real data has ----------------------------------------------
_BASES = np.frombuffer(b"ACGT", dtype=np.uint8)
_BINNED = np.frombuffer(b"#-8F", dtype=np.uint8)  # Illumina-binned qualities 2, 12, 23, 37


def _qual(rng, n: int, full: bool) -> str:
    q = rng.integers(35, 75, n).astype(np.uint8) if full else _BINNED[rng.choice(4, n, p=[.05, .1, .25, .6])]
    return q.tobytes().decode()


def write_sam(path: str, *, pairs: int = 300, seed: int = 14) -> None:
    """A coordinate-sorted SAM: two contigs, proper pairs with clips and indels, NM/MD/MC/AS/RG
    tags, a B-array and a float tag, binned and full-range qualities, and unmapped pairs."""
    rng = np.random.default_rng(seed)
    contigs = [("chrW1", 60_000), ("chrW2", 30_000)]
    L = 100
    recs = []
    for i in range(pairs):
        ref = 0 if i < pairs * 2 // 3 else 1
        p1 = int(rng.integers(1, contigs[ref][1] - 600))
        p2 = p1 + int(rng.integers(150, 400))
        name = f"WARM:14:FC{seed}:1:{1101 + i % 7}:{int(rng.integers(1000, 30000))}:{int(rng.integers(1000, 30000))}"
        kinds = ("100M", "5S95M", "50M2I48M", "60M3D40M")
        c1, c2 = kinds[i % 4], kinds[(i // 4) % 4]
        span = lambda c: 103 if "3D" in c else (95 if c.startswith("5S") else (98 if "2I" in c else 100))  # noqa: E731
        tlen = p2 + span(c2) - p1
        full = i % 10 == 0
        for (flag, pos, cig, mpos, mcig, t) in ((99, p1, c1, p2, c2, tlen), (147, p2, c2, p1, c1, -tlen)):
            seq = _BASES[rng.integers(0, 4, L)].tobytes().decode()
            nm = int(rng.integers(0, 4))
            tags = [f"NM:i:{nm}", f"MD:Z:{span(cig) - (2 if 'I' in cig else 0) - (5 if 'S' in cig else 0)}",
                    f"MC:Z:{mcig}", f"AS:i:{int(rng.integers(60, 100))}", "RG:Z:warm"]
            if i % 9 == 0:
                tags += ["ZB:B:s,1,-2,3", f"ZF:f:{rng.random():.3f}"]
            recs.append((ref, pos, f"{name}\t{flag}\t{contigs[ref][0]}\t{pos}\t60\t{cig}\t=\t{mpos}\t{t}\t{seq}\t"
                                   f"{_qual(rng, L, full)}\t" + "\t".join(tags)))
    recs.sort(key=lambda r: (r[0], r[1]))
    lines = ["@HD\tVN:1.6\tSO:coordinate"] + [f"@SQ\tSN:{n}\tLN:{ln}" for n, ln in contigs]
    lines += ["@RG\tID:warm\tSM:warm\tPL:ILLUMINA", "@PG\tID:warm\tPN:bams3-warmup"]
    lines += [r[2] for r in recs]
    for i in range(20):  # unplaced unmapped pairs come last
        name = f"WARM:14:FC{seed}:2:1101:{i}:{i}"
        for flag in (77, 141):
            seq = _BASES[rng.integers(0, 4, L)].tobytes().decode()
            lines.append(f"{name}\t{flag}\t*\t0\t0\t*\t*\t0\t0\t{seq}\t{_qual(rng, L, False)}\tRG:Z:warm")
    with open(path, "w", encoding="ascii") as f:
        f.write("\n".join(lines) + "\n")


def _cli(*argv: str) -> None:
    import contextlib
    import io

    from .cli import main
    from .errors import Bams3Error

    with contextlib.redirect_stdout(io.StringIO()):  # verify's report: not warmup's output
        rc = main(list(argv))
    if rc != 0:
        raise Bams3Error(f"warmup: `bams3 {' '.join(argv[:1])}` failed (exit {rc})")


def run_warmup(*, pairs: int = 300, threads: int = 2) -> WarmupReport:
    """Run every command that calls a kernel on a generated input; report what was compiled."""
    import pysam

    t0 = time.perf_counter()
    install_parallel_compile().done = True  # every kernel compiled here, and counted here
    with tempfile.TemporaryDirectory(prefix="bams3-warmup-") as tmp:
        sam = os.path.join(tmp, "in.sam")
        bam = os.path.join(tmp, "in.bam")
        unsorted = os.path.join(tmp, "unsorted.bam")
        write_sam(sam, pairs=pairs)
        pysam.samtools.view("-b", "--no-PG", "-o", bam, sam, catch_stdout=False)
        pysam.samtools.sort("-n", "--no-PG", "-o", unsorted, bam, catch_stdout=False)
        ds, ds2, ds3 = (os.path.join(tmp, d) for d in ("ds", "ds-unsorted", "ds-sam"))
        t = str(threads)
        _cli("convert", "-q", "--threads", t, bam, ds)
        _cli("convert", "-q", "--threads", t, unsorted, ds2)
        _cli("convert", "-q", "--threads", t, sam, ds3)
        out = os.path.join(tmp, "out")
        _cli("query", "--threads", t, "-o", out + ".sam", ds)
        _cli("query", "--threads", t, "-o", out + "-r.sam", ds, "chrW1:1000-20000", "*")
        _cli("query", "--threads", t, "-M", "-o", out + "-m.sam", ds, "chrW1:1000-20000", "chrW1:15000-30000")
        _cli("query", "--threads", t, "-c", "-o", out + ".txt", ds2, "chrW2")
        _cli("query", "--threads", t, "-b", "-o", out + ".bam", ds, "chrW1")
        _cli("export", "--threads", t, ds, out + "-x.bam")
        _cli("verify", "--threads", t, ds3)
    disps = dispatchers()
    counts = cache_counts(disps)
    kernels = {n: len(d.overloads) for n, d in disps}
    cache_dir = next((d.stats.cache_path for _n, d in disps if d.stats.cache_path), "?")
    return WarmupReport(seconds=time.perf_counter() - t0, cache_dir=cache_dir, kernels=kernels, **counts)


# -- a first query on an empty cache: compile on two cores ---------------------------------------
# s: what the helper does besides compiling (a fresh interpreter importing numpy and numba, and
# numba's start-up) beyond what this process does besides compiling (its own start-up, the
# dataset, pysam, the output; the helper starts before this process imports numba). Measured on
# the benchmark machine (a first 1 kb query, both processes' CPU time): ~0.2.
HELPER_START_COST = 0.2


class ParallelCompile:
    """The kernels a query decodes with, ready early, and compiled on two cores on a fresh install.

    :meth:`start` (a background thread, at the start of a query, while the dataset is opened
    and its first blocks fetched): imports numba and reads numba's cache index; if the
    decoders' kernels are all cached, loads them (numba's start-up overlaps the I/O); if some
    are not (a fresh install), starts a helper process compiling part of them, by their
    declared signatures (bams3core.jit), into numba's cache. As ``bams3core.codec.decode_hook``
    it runs before the first block is assembled: this process compiles the kernels the block
    needs that the helper does not, then waits for the helper if the block needs its part,
    and loads that from the cache. If the helper fails, this process compiles its part itself;
    nothing else depends on it. Later blocks, and later processes, find everything cached."""

    def __init__(self, timeout: float = 300):
        import threading

        self.timeout = timeout
        self.lock = threading.Lock()
        self.done = False
        self.thread = None
        self.proc = None
        self.helper_part: list[str] = []
        self.last: dict = {}  # what the first block did: {"own": [...], "helper": [...]}

    @staticmethod
    def split(names: list[str]) -> tuple[list[str], list[str]]:
        """(this process's part, the helper's part), balanced by COMPILE_COST (the helper
        starts later: it imports numpy and numba first)."""
        from bams3core.jit import COMPILE_COST

        own, other = [], []
        t_own, t_other = 0.0, HELPER_START_COST
        for n in sorted(names, key=lambda n: -COMPILE_COST.get(n, 0.3)):
            c = COMPILE_COST.get(n, 0.3)
            if t_other < t_own:
                other.append(n)
                t_other += c
            else:
                own.append(n)
                t_own += c
        return own, other

    def start(self) -> None:
        """Begin in a background thread (see the class)."""
        import threading

        self.thread = threading.Thread(target=self._start, name="bams3-kernels", daemon=True)
        self.thread.start()

    def _start(self) -> None:
        try:
            from bams3core.jit import DECODE_GROUPS, compile_declared, likely_uncached, uncached

            names = [k for g in DECODE_GROUPS.values() for k in g]
            # a fresh install (no cache index file): the helper starts before numba is imported here
            absent = likely_uncached(names)
            if absent:
                self._spawn(self.split(absent)[1])
            missing = uncached(names)  # imports numba, reads the cache's index files
            if not missing:
                compile_declared(names)  # load them now, while the main thread waits for data
                return
            if self.proc is None:  # index files present, but stale
                self._spawn(self.split(missing)[1])
        except Exception:  # noqa: BLE001 - an optimisation only: the decoders compile on first use
            pass

    def _spawn(self, names: list[str]) -> None:
        import atexit
        import subprocess
        import sys

        if not names:
            return
        code = f"from bams3core.jit import compile_declared; compile_declared({names!r})"
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            return
        self.helper_part = list(names)
        atexit.register(self._stop)

    def _stop(self) -> None:
        """At exit: a helper still compiling kernels this process did not need is stopped."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __call__(self, columns) -> None:
        if self.done:
            return
        with self.lock:
            if self.done:
                return
            try:
                self._first(columns)
            finally:
                self.done = True

    def _first(self, columns) -> None:
        import subprocess

        from bams3core.codec import decode_kernels
        from bams3core.jit import compile_declared, uncached

        if self.thread is not None:
            self.thread.join()
        needed = decode_kernels(columns.frames)
        missing = uncached(needed)
        if not missing:  # (a helper may still be compiling what this block does not need)
            return
        if self.proc is None:  # not started early (or nothing was missing then)
            self._spawn(self.split(missing)[1])
        other = [n for n in needed if n in self.helper_part]
        own = [n for n in needed if n not in other]
        compile_declared(own)
        if other and self.proc is not None:
            try:
                self.proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self._stop()
        compile_declared(other)  # loaded from the cache the helper filled (else compiled here)
        self.last = {"own": own, "helper": other}


_PARALLEL: ParallelCompile | None = None


def install_parallel_compile(start: bool = False) -> ParallelCompile:
    """Set ``bams3core.codec.decode_hook`` (once per process); ``start``: begin now (a command
    about to decode blocks: a query that prints records)."""
    global _PARALLEL
    from bams3core import codec

    if _PARALLEL is None:
        _PARALLEL = ParallelCompile()
        codec.decode_hook = _PARALLEL
    if start and _PARALLEL.thread is None and not _PARALLEL.done:
        _PARALLEL.start()
    return _PARALLEL
