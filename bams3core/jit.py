"""numba's ``njit`` for bams3's kernels, with an on-disk cache that always has a place to go.

Kernels are ``njit(cache=True)``. numba stores compiled code in ``$NUMBA_CACHE_DIR``, else in
``__pycache__`` next to the source if writable, else in ``$XDG_CACHE_HOME/numba`` (default
``~/.cache/numba``), and uses a directory only if it can write to it; when none is writable
(a read-only install run by a user without a writable home, as in some containers) numba
refuses to define a cached function at all. Then, and only then, this module points
``NUMBA_CACHE_DIR`` at ``$TMPDIR/bams3-numba-<uid>`` before numba is imported, so the kernels
still compile and later processes of that user reuse them. Importing this module does not
import numba: ``njit`` (``from .jit import njit``) and the functions that compile or load kernels
do, and :func:`likely_uncached` tells from the cache's file names alone which kernels a fresh
install still lacks (so a first query can start compiling in a helper process before numba is
even imported here).
"""

from __future__ import annotations

import os
import sys
import tempfile


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def numba_cache_candidates() -> list[str]:
    """The directories numba would try for bams3core's kernels, in its order."""
    out = []
    if os.environ.get("NUMBA_CACHE_DIR"):
        out.append(os.environ["NUMBA_CACHE_DIR"])
    out.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__"))
    out.append(os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "numba"))
    return out


def fallback_cache_dir() -> str | None:
    """Where to put numba's cache when none of numba's own places is writable (else None)."""
    if any(_writable(d) for d in numba_cache_candidates()):
        return None
    d = os.path.join(tempfile.gettempdir(), f"bams3-numba-{os.getuid() if hasattr(os, 'getuid') else 0}")
    return d if _writable(d) else None


def _import_numba():
    """Import numba, first pointing NUMBA_CACHE_DIR at the fallback if numba has no writable place."""
    if "numba" not in sys.modules:  # numba reads NUMBA_CACHE_DIR when it is imported
        fallback = fallback_cache_dir()
        if fallback is not None:
            os.environ["NUMBA_CACHE_DIR"] = fallback
    import numba

    return numba


def __getattr__(name: str):
    # ``from .jit import njit`` (the kernel modules) imports numba here, not importing this module
    if name == "njit":
        njit = _import_numba().njit
        globals()["njit"] = njit
        return njit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["njit", "fallback_cache_dir", "numba_cache_candidates", "DECODE_GROUPS", "declared_signatures", "uncached",
           "likely_uncached", "compile_declared"]


# -- the decoders' kernels, by declared signature -----------------------------------------------
# A query compiles (fresh install) or loads (numba's cache) the kernels decoding its blocks need.
# Their argument types are fixed by the Python wrappers (contiguous arrays; arrays a kernel only
# reads passed read-only where the wrapper makes them so), and declared here, so that these
# kernels can be compiled before the first call, by signature, also in another process
# (bams3.warmup.ParallelCompile: the two halves of a first query's compile run on two cores).
# tests/test_startup.py checks that a query compiles exactly these signatures.

DECODE_GROUPS = {
    # every block: the records' assembly (bams3core.bam.gather / scatter, RecordBatch.fixed)
    "records": ("bams3core.kernels.gather_kernel", "bams3core.kernels.scatter_kernel",
                "bams3core.kernels.rows_kernel"),
    # qual frames of method 1 (context model)
    "qual-cm": ("bams3core.qualcodec._decode_kernel",),
    # seq frames of method 1, and the block consensus a derived MD column needs (FORMAT.md §12.2)
    "seq-cm": ("bams3core.seqcodec._decode_kernel",),
    "consensus": ("bams3core.seqcodec._consensus_kernel",),
    # tags frames of method 2 with derived columns (MD: §12.3; NM and MC are numpy: bams3core.tags)
    "tags-derived": ("bams3core.kernels.md_predict_kernel",),
}

# Relative compile cost (CPU seconds on the 2-core benchmark machine, numba 0.68), to split them.
COMPILE_COST = {
    "bams3core.kernels.gather_kernel": 0.15, "bams3core.kernels.scatter_kernel": 0.15,
    "bams3core.kernels.rows_kernel": 0.15, "bams3core.qualcodec._decode_kernel": 1.0,
    "bams3core.seqcodec._decode_kernel": 0.9, "bams3core.seqcodec._consensus_kernel": 0.28,
    "bams3core.kernels.md_predict_kernel": 0.65,
}


def _index_file_names(name: str) -> tuple[str, str]:
    """(source file, glob of numba's cache index file name) of kernel ``module.function``,
    found without importing the module (numba names the index
    ``<file stem>.<function>-<line>.py<major><minor><abiflags>.nbi``)."""
    import importlib.util

    mod, _, fn = name.rpartition(".")
    spec = importlib.util.find_spec(mod)
    src = spec.origin if spec is not None and spec.origin else ""
    stem = os.path.splitext(os.path.basename(src))[0]
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}{getattr(sys, 'abiflags', '')}"
    return src, f"{stem}.{fn}-*.{tag}.nbi"


def likely_uncached(names) -> list[str]:
    """The kernels among ``names`` that have no index file in the cache directory numba will use
    (file names only: imports neither numba nor the kernels' modules). A kernel listed here is
    certainly not cached; one not listed may still be (a stale entry): :func:`uncached` is
    exact but imports numba."""
    import glob
    import hashlib

    out, where = [], {}
    for name in names:
        try:
            src, pattern = _index_file_names(name)
        except (ImportError, ValueError):
            out.append(name)
            continue
        srcdir = os.path.dirname(os.path.abspath(src))
        if srcdir in where:
            place = where[srcdir]
            if place is None or not glob.glob(os.path.join(glob.escape(place), pattern)):
                out.append(name)
            continue
        # numba's order: $NUMBA_CACHE_DIR, __pycache__ next to the source, its user-wide cache (the
        # first it can write to; the two cache roots get <parent>_<sha1 of the source's directory>)
        sub = f"{os.path.basename(srcdir)}_{hashlib.sha1(srcdir.encode()).hexdigest()}"
        env_dir = os.environ.get("NUMBA_CACHE_DIR")
        places = [os.path.join(env_dir, sub)] if env_dir else []
        places.append(os.path.join(srcdir, "__pycache__"))
        places.append(os.path.join(numba_cache_candidates()[-1], sub))
        place = next((p for p in places if _writable(p)), None)
        if place is None:
            fallback = fallback_cache_dir()
            place = os.path.join(fallback, sub) if fallback else None
        where[srcdir] = place
        if place is None or not glob.glob(os.path.join(glob.escape(place), pattern)):
            out.append(name)
    return out


def declared_signatures() -> dict:
    """{kernel name: tuple of numba argument types} of every kernel of :data:`DECODE_GROUPS`."""
    from numba import types as t

    def R(dt, nd=1):  # noqa: N802 - read-only input
        return t.Array(dt, nd, "C", readonly=True)

    def W(dt, nd=1):  # noqa: N802 - writable
        return t.Array(dt, nd, "C")

    u8, u32, i32, i64 = t.uint8, t.uint32, t.int32, t.int64
    return {
        "bams3core.kernels.gather_kernel": (R(u8), R(i64), R(i64), W(u8)),
        "bams3core.kernels.scatter_kernel": (W(u8), R(i64), R(i64), R(u8)),
        "bams3core.kernels.rows_kernel": (R(u8), R(i64), i64, W(u8, 2)),
        "bams3core.qualcodec._decode_kernel": (R(u8), i64, W(i64), W(i64), i64, *(R(i64),) * 6,
                                               W(i32, 2), W(i32), W(i32, 2), W(i32), W(i32, 2), W(i32), W(u8)),
        "bams3core.seqcodec._decode_kernel": (R(u8), i64, W(i64), W(i64), W(u32), W(i64), i64, i64,
                                              W(i32, 2), W(i32), W(u8), W(u8), W(i64), W(u8)),
        "bams3core.seqcodec._consensus_kernel": (W(u8), W(i64), W(i64), W(u32), W(i64), i64, i64, W(u8), W(u8),
                                                 W(i64)),
        "bams3core.kernels.md_predict_kernel": (W(u8), W(i64), W(i64), W(i64), W(u32), W(i64), W(i64), W(u8), i64,
                                                R(u8), W(u8), W(i64), W(u8), W(u8)),
    }


def dispatcher(name: str):
    """The numba dispatcher ``module.function``."""
    import importlib

    mod, _, fn = name.rpartition(".")
    return getattr(importlib.import_module(mod), fn)


def uncached(names) -> list[str]:
    """The kernels among ``names`` whose declared signature is neither compiled in this process
    nor in numba's on-disk cache (read from the cache's index files only: nothing is loaded)."""
    _import_numba()
    sigs = declared_signatures()
    out = []
    for name in names:
        disp, sig = dispatcher(name), sigs[name]
        if sig in disp.overloads:
            continue
        try:
            index = disp._cache._cache_file._load_index()  # numba's cache index: {(sig, magic, hashes): file}
            if any(k[0] == sig for k in index):
                continue
        except Exception:  # noqa: BLE001 - numba internals changed: count it as not cached
            pass
        out.append(name)
    return out


def compile_declared(names) -> None:
    """Compile (or load from numba's cache) the declared signature of each kernel of ``names``."""
    _import_numba()
    sigs = declared_signatures()
    for name in names:
        dispatcher(name).compile(sigs[name])
