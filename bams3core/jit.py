"""numba's ``njit`` for bams3's kernels, with an on-disk cache that always has a place to go.

Kernels are ``njit(cache=True)``. numba stores compiled code in ``$NUMBA_CACHE_DIR``, else in
``__pycache__`` next to the source if writable, else in ``$XDG_CACHE_HOME/numba`` (default
``~/.cache/numba``), and uses a directory only if it can write to it; when none is writable
(a read-only install run by a user without a writable home, as in some containers) numba
refuses to define a cached function at all. Then, and only then, this module points
``NUMBA_CACHE_DIR`` at ``$TMPDIR/bams3-numba-<uid>`` before numba is imported, so the kernels
still compile and later processes of that user reuse them. Importing this module imports numba.
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


if "numba" not in sys.modules:  # numba reads NUMBA_CACHE_DIR when it is imported
    _fallback = fallback_cache_dir()
    if _fallback is not None:
        os.environ["NUMBA_CACHE_DIR"] = _fallback

from numba import njit  # noqa: E402

__all__ = ["njit", "fallback_cache_dir", "numba_cache_candidates"]
