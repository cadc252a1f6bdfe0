"""Columnar tags: split each record's BAM tag area into per-tag columns, and back.

The tag area of a BAM record is a sequence of ``key(2) type(1) value``. Records are grouped
by their *layout* (the ordered list of key+type pairs, e.g. ``NMcMDZASCRGZ``); the layout of
each record is dictionary-coded and each key+type has its own column of values, compressed
separately. Tag order and types are kept exactly, so the bytes round-trip.

Encoded form (all little-endian)::

    u32 n_layouts, then per layout: u16 n_tags, n_tags x 3 bytes (key, type)
    u32 n_columns, then per column: 3 bytes (key, type), u32 compressed size
    zstd(layout id per record, u16 shuffled)
    column payloads, each zstd(values concatenated in record order)

Values of fixed-size types are stored byte-shuffled; Z/H strings keep their NUL; B arrays
keep their subtype and count. Vectorised over records; Python loops only run over tag slots
and distinct layouts.
"""

from __future__ import annotations

import struct

import numpy as np
import zstandard

from .bam import gather, scatter
from .shuffle import shuffle, unshuffle

_FIXED = {ord("A"): 1, ord("c"): 1, ord("C"): 1, ord("s"): 2, ord("S"): 2, ord("i"): 4, ord("I"): 4, ord("f"): 4}
_BSIZE = {ord("c"): 1, ord("C"): 1, ord("s"): 2, ord("S"): 2, ord("i"): 4, ord("I"): 4, ord("f"): 4}
_SIZE_LUT = np.zeros(256, dtype=np.int64)
for _t, _s in _FIXED.items():
    _SIZE_LUT[_t] = _s
_WIDTH_LUT = np.ones(256, dtype=np.int64)  # byte-shuffle width of a column by tag type
for _t, _s in _FIXED.items():
    _WIDTH_LUT[_t] = _s
_BSIZE_LUT = np.zeros(256, dtype=np.int64)
for _t, _s in _BSIZE.items():
    _BSIZE_LUT[_t] = _s


class TagError(ValueError):
    pass




def split_tags(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray):
    """Parse tag areas ``buf[starts[i]:starts[i]+lens[i]]``.

    Returns (layout_ids, layouts, columns): ``layouts`` a list of tuples of 3-byte keys,
    ``columns`` a dict key -> the column's bytes (its values in record order, fixed-width
    types byte-shuffled), in column order.
    Raises TagError on malformed tags.
    """
    # numba: imported by encoders only, not with the codec
    from .kernels import (TAG_B_SUBTYPE, TAG_B_TRUNCATED, TAG_OK, TAG_OVERRUN, TAG_SLOTS, TAG_TRUNCATED,
                          TAG_UNKNOWN_TYPE, TAG_UNTERMINATED, parse_tags_kernel, tag_column_order,
                          tag_columns_kernel)

    parse_errors = {TAG_TRUNCATED: "truncated tag", TAG_UNTERMINATED: "unterminated string tag",
                    TAG_B_TRUNCATED: "truncated B array", TAG_B_SUBTYPE: "bad B array subtype",
                    TAG_UNKNOWN_TYPE: "unknown tag type", TAG_OVERRUN: "tag value overruns the record"}
    n = len(starts)
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    lens = np.ascontiguousarray(lens, dtype=np.int64)
    slots = 16
    while True:
        K = np.empty((n, slots), dtype=np.int64)
        O = np.empty((n, slots), dtype=np.int64)
        L = np.empty((n, slots), dtype=np.int64)
        status, used, rec = parse_tags_kernel(buf, starts, lens, _SIZE_LUT, _BSIZE_LUT, K, O, L)
        if status != TAG_SLOTS:
            break
        slots *= 4
    if status != TAG_OK:
        raise TagError(f"{parse_errors.get(status, 'malformed tags')} (record {rec} of the block)")
    if used == 0:
        return np.zeros(n, dtype=np.int64), [()], {}
    K, O, L = K[:, :used], O[:, :used], L[:, :used]
    if K.shape[1] > 1:
        srt = np.sort(K, axis=1)
        if ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any():
            raise TagError("a record repeats a tag key")  # columns need unique keys: store raw
    layouts_arr, layout_ids = _unique_rows(K)
    layouts = [tuple(int(k) for k in row if k >= 0) for row in layouts_arr]
    K, O, L = np.ascontiguousarray(K), np.ascontiguousarray(O), np.ascontiguousarray(L)
    # columns in order of first appearance by slot (each slot's new keys in ascending order)
    keys_arr = np.empty(K.shape[0] * K.shape[1] + 1, dtype=np.int64)
    keys_arr = keys_arr[:tag_column_order(K, keys_arr)].copy()
    colkeys = keys_arr.tolist()
    widths = _WIDTH_LUT[keys_arr & 0xFF]
    out_start = np.zeros(len(colkeys) + 1, dtype=np.int64)
    out = np.empty(int(L.sum()), dtype=np.uint8)
    tag_columns_kernel(buf, K, O, L, keys_arr, widths, out, out_start)
    cols = {k: out[out_start[c]:out_start[c + 1]] for c, k in enumerate(colkeys)}
    return layout_ids.reshape(-1).astype(np.int64), layouts, cols


def _unique_rows(K: np.ndarray):
    """np.unique(K, axis=0, return_inverse=True), via a row hash (much faster); exact."""
    with np.errstate(over="ignore"):
        h = np.zeros(len(K), dtype=np.uint64)
        for s in range(K.shape[1]):
            h = h * np.uint64(0x100000001B3) + (K[:, s].astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    _, first, inv = np.unique(h, return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    if (K[first[inv]] == K).all():
        return K[first], inv
    rows, inv = np.unique(K, axis=0, return_inverse=True)  # hash collision: exact fallback
    return rows, inv.reshape(-1)


def _kbytes(key: int) -> bytes:
    return bytes([(key >> 16) & 0xFF, (key >> 8) & 0xFF, key & 0xFF])


def encode_tags(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray, cctx: zstandard.ZstdCompressor) -> bytes:
    """Columnar encoding of the tag areas; falls back to raw bytes if they do not parse."""
    buf = gather(buf, starts, lens)  # work on this block's tag bytes only
    starts = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    try:
        layout_ids, layouts, cols = split_tags(buf, starts, lens)
    except TagError:
        return b"\x00" + cctx.compress(gather(buf, starts, lens).tobytes())
    if len(layouts) > 0xFFFF:
        return b"\x00" + cctx.compress(gather(buf, starts, lens).tobytes())
    head = [b"\x01", struct.pack("<I", len(layouts))]
    for lay in layouts:
        head.append(struct.pack("<H", len(lay)))
        head.extend(_kbytes(k) for k in lay)
    ids = layout_ids.astype("<u2")
    payloads = [cctx.compress(shuffle(ids))]
    head.append(struct.pack("<I", len(cols)))
    for key, vals in cols.items():
        payload = cctx.compress(vals.tobytes())
        head.append(_kbytes(key) + struct.pack("<I", len(payload)))
        payloads.append(payload)
    return b"".join(head) + struct.pack("<I", len(payloads[0])) + b"".join(payloads)


def decode_tags(data: bytes, l_tags: np.ndarray, dctx: zstandard.ZstdDecompressor) -> np.ndarray:
    """Inverse of :func:`encode_tags`: the concatenated tag areas (uint8)."""
    if not data:
        raise TagError("empty tags stream")
    if data[0] == 0:
        return np.frombuffer(dctx.decompress(data[1:]), dtype=np.uint8)
    if data[0] != 1:
        raise TagError("unknown tags encoding")
    p = 1
    (nlay,) = struct.unpack_from("<I", data, p)
    p += 4
    layouts = []
    for _ in range(nlay):
        (nt,) = struct.unpack_from("<H", data, p)
        p += 2
        layouts.append([(data[p + 3 * i] << 16) | (data[p + 3 * i + 1] << 8) | data[p + 3 * i + 2] for i in range(nt)])
        p += 3 * nt
    (ncol,) = struct.unpack_from("<I", data, p)
    p += 4
    colkeys, colsizes = [], []
    for _ in range(ncol):
        colkeys.append((data[p] << 16) | (data[p + 1] << 8) | data[p + 2])
        colsizes.append(struct.unpack_from("<I", data, p + 3)[0])
        p += 7
    (idsize,) = struct.unpack_from("<I", data, p)
    p += 4
    n = len(l_tags)
    raw_ids = np.frombuffer(dctx.decompress(data[p:p + idsize]), dtype=np.uint8)
    p += idsize
    if len(raw_ids) != 2 * n:
        raise TagError("tag layout count mismatch")
    ids = unshuffle(raw_ids, 2, "<u2").astype(np.int64)
    if n and ids.max() >= nlay:
        raise TagError("bad tag layout id")
    colvals = {}
    for key, size in zip(colkeys, colsizes):
        colvals[key] = np.frombuffer(dctx.decompress(data[p:p + size]), dtype=np.uint8)
        p += size
    # value lengths per record per slot: recompute from the values themselves
    out = np.empty(int(l_tags.sum()), dtype=np.uint8)
    rec_start = np.zeros(n, dtype=np.int64)
    np.cumsum(l_tags[:-1], out=rec_start[1:])
    cursor = rec_start.copy()
    colpos = {k: 0 for k in colkeys}
    maxslots = max((len(l) for l in layouts), default=0)
    lay_arr = np.full((max(nlay, 1), maxslots), -1, dtype=np.int64)
    for i, l in enumerate(layouts):
        lay_arr[i, :len(l)] = l
    K = lay_arr[ids] if n else np.zeros((0, maxslots), dtype=np.int64)
    # per column: record rows in record order, and per-row value sizes
    col_rows: dict[int, list] = {}
    for s in range(maxslots):
        ks = K[:, s]
        for key in np.unique(ks[ks >= 0]):
            col_rows.setdefault(int(key), []).append((s, np.flatnonzero(ks == key)))
    # value sizes per (row, slot)
    sizes = np.zeros((n, maxslots), dtype=np.int64)
    for key, lst in col_rows.items():
        rows = np.sort(np.concatenate([r for _, r in lst]))
        vals = colvals.get(key)
        if vals is None:
            raise TagError("missing tag column")
        t = key & 0xFF
        if t in _FIXED:
            w = _FIXED[t]
            if len(vals) != w * len(rows):
                raise TagError("tag column size mismatch")
            if w > 1:
                vals = unshuffle(vals, w)
            lens = np.full(len(rows), w, dtype=np.int64)
        elif t in (ord("Z"), ord("H")):
            z = np.flatnonzero(vals == 0)
            if len(z) != len(rows):
                raise TagError("tag column size mismatch")
            lens = np.diff(np.concatenate([[-1], z]))
        elif t == ord("B"):
            lens = np.zeros(len(rows), dtype=np.int64)
            q = 0
            # B arrays: subtype + count header per value (sequential, small counts of rows)
            hdr_sub = []
            for r in range(len(rows)):
                if q + 5 > len(vals):
                    raise TagError("truncated B array column")
                esz = _BSIZE.get(int(vals[q]))
                if esz is None:
                    raise TagError("bad B array subtype")
                cnt = int(np.frombuffer(vals[q + 1:q + 5].tobytes(), dtype="<u4")[0])
                lens[r] = 5 + cnt * esz
                q += lens[r]
            if q != len(vals):
                raise TagError("tag column size mismatch")
        else:
            raise TagError("unknown tag type")
        colvals[key] = (rows, vals, lens)
    # write slot by slot
    for s in range(maxslots):
        ks = K[:, s]
        for key in np.unique(ks[ks >= 0]):
            rows_s = np.flatnonzero(ks == key)
            rows, vals, lens = colvals[int(key)]
            # positions of rows_s within the column's record-ordered rows
            idx = np.searchsorted(rows, rows_s)
            vstart = np.concatenate([[0], np.cumsum(lens)])[idx]
            vlen = lens[idx]
            hdr = np.frombuffer(_kbytes(int(key)), dtype=np.uint8)
            for b in range(3):
                out[cursor[rows_s] + b] = hdr[b]
            cursor[rows_s] += 3
            scatter(out, cursor[rows_s], vlen, gather(vals, vstart, vlen))
            cursor[rows_s] += vlen
    if (cursor != rec_start + l_tags).any():
        raise TagError("tag areas do not add up")
    return out
