"""Read-name tokenisation: Illumina-style names split at ':' into typed columns.

Encoded form: method byte 0 = zstd of the NUL-terminated names; method byte 1 =
tokenised: ``u8 n_fields``, then per field ``u8 kind`` (0 string, 1 integer) and
``u32 size`` of its zstd payload, then the payloads. Integer fields are decimal numbers
without leading zeros (< 10**9) stored as byte-shuffled u32; string fields are
NUL-terminated. Names that don't all have the same number of fields use method 0.
"""

from __future__ import annotations

import struct

import numpy as np
import zstandard

from .shuffle import shuffle, unshuffle

_MAX_COLONS = 30  # names with more ':' use method 0


def encode_names(names: np.ndarray, l_name: np.ndarray, cctx: zstandard.ZstdCompressor) -> bytes:
    """``names``: concatenated NUL-terminated names (uint8); ``l_name``: lengths incl. NUL."""
    n = len(l_name)
    tok = _tokenised(names, l_name, cctx)
    if tok is not None and len(tok) * _SURE_WIN < len(names):
        return tok  # plain zstd does not come near this: skip computing it
    plain = b"\x00" + cctx.compress(names.tobytes())
    return tok if tok is not None and len(tok) < len(plain) else plain


_SURE_WIN = 4  # a tokenised form under 1/4 of the raw names is kept without trying plain zstd


def _tokenised(names: np.ndarray, l_name: np.ndarray, cctx: zstandard.ZstdCompressor) -> bytes | None:
    """Method 1 (without the comparison against method 0), or None if the names don't fit it."""
    n = len(l_name)
    if n < 8 or (l_name < 2).any() or int(np.count_nonzero(names == 0)) != n:
        return None  # (names with extra NULs only round-trip in the plain form)
    l_name = np.ascontiguousarray(l_name, dtype=np.int64)
    if (names[np.cumsum(l_name) - 1] != 0).any():
        return None  # a name without its NUL (and so another with two): plain form too
    names = np.ascontiguousarray(names, dtype=np.uint8)
    from .kernels import name_field_kernel, split_name_fields  # numba: imported by encoders only

    fstart = np.empty((n, _MAX_COLONS + 1), dtype=np.int64)
    flen = np.empty((n, _MAX_COLONS + 1), dtype=np.int64)
    k = split_name_fields(names, l_name, _MAX_COLONS, fstart, flen)
    if k <= 0:
        return None
    parts = [b"\x01", struct.pack("<B", k + 1)]
    payloads = []
    ints = np.empty(n, dtype="<u4")
    strs = np.empty(len(names), dtype=np.uint8)
    for f in range(k + 1):
        kind, size = name_field_kernel(names, fstart, flen, f, ints, strs)
        if kind == 1:
            payload = cctx.compress(shuffle(ints))
        else:
            payload = cctx.compress(strs[:size].tobytes())
        parts.append(struct.pack("<BI", kind, len(payload)))
        payloads.append(payload)
    return b"".join(parts) + b"".join(payloads)


def decode_names(data: bytes, n: int, dctx: zstandard.ZstdDecompressor):
    """Returns (names, l_name) for ``n`` names; l_name is None for the plain form."""
    if not data:
        raise ValueError("empty names stream")
    if data[0] == 0:  # plain: the caller splits by l_read_name
        return np.frombuffer(dctx.decompress(data[1:]), dtype=np.uint8), None
    if data[0] != 1:
        raise ValueError("unknown names encoding")
    nf = data[1]
    p = 2
    heads = []
    for _ in range(nf):
        kind, size = struct.unpack_from("<BI", data, p)
        heads.append((kind, size))
        p += 5
    cols = []
    for kind, size in heads:
        raw = dctx.decompress(data[p:p + size])
        p += size
        if kind == 1:
            u8 = np.frombuffer(raw, dtype=np.uint8)
            if len(u8) != 4 * n:
                raise ValueError("name field size mismatch")
            ints = unshuffle(u8, 4, "<u4")
            cols.append([str(v) for v in ints.tolist()])
        else:
            vals = raw.split(b"\0")
            if len(vals) != n + 1 or vals[n]:
                raise ValueError("name field count mismatch")
            cols.append([v.decode("latin-1") for v in vals[:n]])
    joined = "\0".join(":".join(t) for t in zip(*cols)) + "\0"
    names = np.frombuffer(joined.encode("latin-1"), dtype=np.uint8)
    ends = np.flatnonzero(names == 0)
    return names, np.diff(np.concatenate([[-1], ends]))
