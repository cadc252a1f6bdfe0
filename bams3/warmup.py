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

KERNEL_MODULES = ("bams3core.kernels", "bams3core.qualcodec")


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
