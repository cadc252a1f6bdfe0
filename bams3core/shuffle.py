"""The byte shuffle (docs/FORMAT.md §0.1): the one implementation every stream, tag column,
name field and index column uses.

``N`` values of ``w`` bytes are stored as ``w`` byte planes: plane ``k`` holds byte ``k``
(little-endian) of every value, in value order; shuffled byte ``k*N + i`` is byte ``k`` of
value ``i``. Width 1 is the identity.

One place writes the planes without this module: the compiled
:func:`bams3core.kernels.tag_columns_kernel` shuffles tag values while it gathers them into
their columns (fused, to avoid a copy per column); the spec's tag vectors check that its
bytes are these (docs/FORMAT.md §6.8, tests/test_spec_vectors.py).
"""

from __future__ import annotations

import numpy as np


def shuffle(values: np.ndarray, width: int | None = None) -> bytes:
    """The byte planes of ``values`` (any fixed-width dtype, read in C order) as bytes.

    ``width`` defaults to the element size; a 2-D array is shuffled as the flat sequence of
    its elements (row after row)."""
    a = np.ascontiguousarray(values)
    w = a.dtype.itemsize if width is None else width
    if w == 1:
        return a.tobytes()
    return a.view(np.uint8).reshape(-1, w).T.tobytes()


def unshuffle(buf, width: int, dtype=np.uint8) -> np.ndarray:
    """Inverse of :func:`shuffle`: the values of ``width``-byte byte planes ``buf``, viewed as
    ``dtype`` (``np.uint8``: the unshuffled bytes). Raises ValueError if ``len(buf)`` is not a
    multiple of ``width``."""
    u8 = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.view(np.uint8).reshape(-1)
    if width == 1:
        return u8.view(dtype)
    if len(u8) % width:
        raise ValueError(f"{len(u8)} shuffled bytes are not a multiple of the element width {width}")
    return np.ascontiguousarray(u8.reshape(width, -1).T).reshape(-1).view(dtype)
