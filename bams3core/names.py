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

from .bam import gather

_COLON = ord(":")
_POW10 = 10 ** np.arange(10, dtype=np.int64)


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
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(l_name[:-1], out=starts[1:])
    is_colon = names == _COLON
    counts = np.add.reduceat(is_colon.astype(np.int64), starts)
    k = int(counts[0])
    if k == 0 or k > 30 or (counts != k).any():
        return None
    colons = np.flatnonzero(is_colon).reshape(n, k)
    fstart = np.concatenate([starts[:, None], colons + 1], axis=1)
    fend = np.concatenate([colons, (starts + l_name - 1)[:, None]], axis=1)  # exclusive (':' or NUL)
    flen = fend - fstart
    parts = [b"\x01", struct.pack("<B", k + 1)]
    payloads = []
    for f in range(k + 1):
        s, ln = fstart[:, f], flen[:, f]
        vals = gather(names, s, ln)
        numeric = (ln > 0).all() and (ln <= 9).all() and ((vals >= 48) & (vals <= 57)).all() \
            and not ((ln > 1) & (names[s] == 48)).any()
        if numeric:
            pos_in = np.arange(len(vals)) - np.repeat(np.cumsum(ln) - ln, ln)
            digits = (vals.astype(np.int64) - 48) * _POW10[np.repeat(ln, ln) - 1 - pos_in]
            ints = np.add.reduceat(digits, np.cumsum(ln) - ln).astype("<u4")
            payload = cctx.compress(ints.view(np.uint8).reshape(-1, 4).T.tobytes())
            kind = 1
        else:
            buf = np.empty(len(vals) + n, dtype=np.uint8)
            ends = np.cumsum(ln + 1)
            keep = np.ones(len(buf), dtype=bool)
            keep[ends - 1] = False
            buf[keep] = vals
            buf[~keep] = 0
            payload = cctx.compress(buf.tobytes())
            kind = 0
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
            ints = np.ascontiguousarray(u8.reshape(4, -1).T).reshape(-1).view("<u4")
            cols.append([str(v) for v in ints.tolist()])
        else:
            vals = raw.split(b"\0")
            if len(vals) != n + 1:
                raise ValueError("name field count mismatch")
            cols.append([v.decode("latin-1") for v in vals[:n]])
    joined = "\0".join(":".join(t) for t in zip(*cols)) + "\0"
    names = np.frombuffer(joined.encode("latin-1"), dtype=np.uint8)
    ends = np.flatnonzero(names == 0)
    return names, np.diff(np.concatenate([[-1], ends]))
