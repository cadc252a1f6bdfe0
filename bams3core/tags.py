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

Method 2 (format v1.2, docs/FORMAT.md §12.3) adds a model byte per column: NM, MC and MD
columns store a flag per record (0: the block reproduces the value — NM from MD + CIGAR, MC
from the mate's CIGAR, MD from the block's consensus — 1: stored) and only the stored values;
each derivation is checked at encode time, so the bytes still round-trip exactly.
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


def _key3(s: bytes) -> int:
    return (s[0] << 16) | (s[1] << 8) | s[2]


MODEL_PLAIN = 0  # the column's values (as method 1)
MODEL_NM = 1     # NM (integer types) from the record's MD:Z and CIGAR
MODEL_MC = 2     # MC:Z = the CIGAR of the record's mate in the block
MODEL_MD = 3     # MD:Z = the record against the block's consensus (§12.2) as the reference
_KEY_MD = _key3(b"MDZ")
_KEY_MC = _key3(b"MCZ")
_INT_DTYPES = {ord("c"): "i1", ord("C"): "u1", ord("s"): "<i2", ord("S"): "<u2", ord("i"): "<i4", ord("I"): "<u4"}


def _model_of(key: int, keys, md_ref=None) -> int:
    if key == _KEY_MD and md_ref is not None:
        return MODEL_MD
    if key >> 8 == (ord("N") << 8 | ord("M")) and (key & 0xFF) in _INT_DTYPES and _KEY_MD in keys:
        return MODEL_NM
    if key == _KEY_MC:
        return MODEL_MC
    return MODEL_PLAIN


def _rows_with(layout_ids: np.ndarray, layouts, key: int) -> np.ndarray:
    """The records (in order) whose layout holds ``key``."""
    has = np.array([key in lay for lay in layouts], dtype=bool)
    return np.flatnonzero(has[layout_ids])


def _z_split(vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length without the NUL) of each NUL-terminated string of a Z column."""
    z = np.flatnonzero(vals == 0)
    start = np.concatenate([[0], z[:-1] + 1]).astype(np.int64) if len(z) else np.zeros(0, np.int64)
    return start, z.astype(np.int64) - start


def mate_index(link: np.ndarray) -> np.ndarray:
    """The mate of each record in the block from the codec's mate links (§6.6), -1 if none:
    a linked record's mate is its target, and a target's mate is the last record linked to it."""
    link = np.asarray(link, dtype=np.int64)
    n = len(link)
    mate = np.full(n, -1, dtype=np.int64)
    src = np.flatnonzero(link > 0)
    mate[src] = src - link[src]
    mate[src - link[src]] = src  # fancy assignment: the last of repeated targets wins
    return mate


def _cigar_starts(n_cigar: np.ndarray) -> np.ndarray:
    n_cigar = np.asarray(n_cigar, dtype=np.int64)
    st = np.zeros(len(n_cigar), dtype=np.int64)
    np.cumsum(n_cigar[:-1], out=st[1:])
    return st


def _derived_nm(md_vals, md_rows, rows, cigar, cig_start, n_cig) -> np.ndarray:
    """NM implied by MD + CIGAR for each of ``rows`` (-1 where the record has no MD)."""
    out = np.full(len(rows), -1, dtype=np.int64)
    if not len(md_rows) or not len(rows):
        return out
    ms, ml = _z_split(md_vals)
    idx = np.minimum(np.searchsorted(md_rows, rows), len(md_rows) - 1)
    ok = md_rows[idx] == rows
    if ok.any():
        r = rows[ok]
        out[ok] = _nm_from_md(np.asarray(md_vals, dtype=np.uint8), ms[idx[ok]], ml[idx[ok]], cigar,
                              np.asarray(cig_start)[r], np.asarray(n_cig)[r])
    return out


def _segment_sums(vals: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Sums of consecutive pieces of ``vals`` (int64) of lengths ``lens``."""
    c = np.zeros(len(vals) + 1, dtype=np.int64)
    np.cumsum(vals, out=c[1:])
    end = np.cumsum(lens)
    return c[end] - c[end - lens]


def _pieces(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The indices ``starts[k] .. starts[k] + lens[k] - 1`` of every piece, concatenated."""
    total = int(lens.sum())
    return np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(total, dtype=np.int64)


def _nm_from_md(md, md_start, md_len, cigar, cig_start, n_cig) -> np.ndarray:
    """NM implied by each MD string ``md[md_start[k]:+md_len[k]]`` (its NUL excluded) and the
    record's CIGAR ``cigar[cig_start[k]:+n_cig[k]]``: the mismatch letters of MD (letters after
    ``^`` up to the next digit are deleted bases, not counted) plus the lengths of the I and D
    operations; -1 if a byte of MD is neither a digit, a letter nor ``^``. Vectorised (numpy)."""
    md_start, md_len = np.asarray(md_start, np.int64), np.asarray(md_len, np.int64)
    cig_start, n_cig = np.asarray(cig_start, np.int64), np.asarray(n_cig, np.int64)
    c = md[_pieces(md_start, md_len)]
    digit = (c >= 48) & (c <= 57)
    caret = c == 94
    letter = ((c >= 65) & (c <= 90)) | ((c >= 97) & (c <= 122))
    at = np.arange(len(c), dtype=np.int64)
    # a letter is a deleted base iff the last non-letter before it in its string is '^'
    last = np.maximum.accumulate(np.where(letter, -1, at)) if len(c) else at
    own = last >= np.repeat(np.cumsum(md_len) - md_len, md_len)
    deleted = own & caret[np.maximum(last, 0)] if len(c) else own
    nm = _segment_sums((letter & ~deleted).astype(np.int64), md_len)
    bad = _segment_sums((~(digit | caret | letter)).astype(np.int64), md_len) > 0
    w = np.asarray(cigar, dtype=np.uint32)[_pieces(cig_start, n_cig)]
    op = w & 0xF
    nm += _segment_sums(np.where((op == 1) | (op == 2), (w >> 4).astype(np.int64), 0), n_cig)
    nm[bad] = -1
    return nm


_CIGAR_CHARS = np.frombuffer(b"MIDNSHP=X" + b"?" * 7, dtype=np.uint8)  # '?': no such operation
_POW10 = 10 ** np.arange(10, dtype=np.int64)


def _cigar_texts(cigar, cig_start, n_cig, recs) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, starts): the NUL-terminated SAM CIGAR text of each record in ``recs`` (``*`` if it
    has no CIGAR); record k's text is ``bytes[starts[k]:starts[k+1]]``. Vectorised (numpy)."""
    cs = np.asarray(cig_start, dtype=np.int64)[recs]
    nc = np.asarray(n_cig, dtype=np.int64)[recs]
    w = np.asarray(cigar, dtype=np.uint32)[_pieces(cs, nc)]
    ln = (w >> 4).astype(np.int64)
    nd = 1 + (ln[:, None] >= _POW10[1:]).sum(axis=1)  # decimal digits of each length
    width = nd + 1  # digits and the operation's letter
    per_rec = _segment_sums(width, nc) + 1 + (nc == 0)  # ... NUL, and '*' for no CIGAR
    st = np.zeros(len(nc) + 1, dtype=np.int64)
    np.cumsum(per_rec, out=st[1:])
    out = np.empty(int(st[-1]), dtype=np.uint8)
    out[st[1:] - 1] = 0
    out[st[:-1][nc == 0]] = 42
    if len(w):
        rec = np.repeat(np.arange(len(nc)), nc)
        ex = np.cumsum(width) - width
        at = st[:-1][rec] + ex - ex[(np.cumsum(nc) - nc)[rec]]  # where each operation's text starts
        out[at + nd] = _CIGAR_CHARS[w & 0xF]
        for e in range(int(nd.max())):  # the e-th digit from the right
            has = nd > e
            out[(at + nd - 1 - e)[has]] = 48 + (ln[has] // _POW10[e]) % 10
    return out, st


def _writable(a, dtype):
    """``a`` contiguous and writable (copied only if it is not): the kernels' declared
    signatures (bams3core.jit) take these arrays writable, wherever the caller's came from."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.writeable else a.copy()


def _cigar_args(cigar, n_cigar):
    cigar = _writable(cigar, np.uint32)
    n_cig = _writable(n_cigar, np.int64)
    return cigar, n_cig, _cigar_starts(n_cig)


def _md_texts(md_ref, cigar, cig_start, n_cig, recs):
    """(bytes, starts, ok): the MD text of each record in ``recs`` against the block consensus."""
    from .kernels import _MD_BASES, md_predict_kernel  # numba: imported where used

    nib, l_seq, pos, cons, lo = md_ref
    l_seq = np.asarray(l_seq, dtype=np.int64)
    nst = np.zeros(len(l_seq), dtype=np.int64)
    np.cumsum((l_seq + (l_seq & 1))[:-1], out=nst[1:])
    args = (_writable(nib, np.uint8), np.ascontiguousarray(nst[recs]),
            np.ascontiguousarray(l_seq[recs]), np.ascontiguousarray(np.asarray(pos, dtype=np.int64)[recs]),
            cigar, np.ascontiguousarray(cig_start[recs], dtype=np.int64),
            np.ascontiguousarray(n_cig[recs], dtype=np.int64), cons, int(lo), _MD_BASES)
    st = np.zeros(len(recs) + 1, dtype=np.int64)
    ok = np.zeros(len(recs), dtype=np.uint8)
    digits = np.empty(24, np.uint8)
    total = md_predict_kernel(*args, np.empty(0, np.uint8), st, ok, digits)
    out = np.empty(total, np.uint8)
    md_predict_kernel(*args, out, st, ok, digits)
    return out, st, ok.astype(bool)


def _encode_derived(model, key, vals, rows, cols, layout_ids, layouts, cigar, n_cig, cig_start, mate, md_ref=None):
    """(flags, explicit values) of a derived column: flag 0 = the derivation gives the value."""
    t = key & 0xFF
    if model == MODEL_NM:
        w = _FIXED[t]
        v = (unshuffle(vals, w, _INT_DTYPES[t]) if w > 1 else vals.view(_INT_DTYPES[t])).astype(np.int64)
        d = _derived_nm(cols[_KEY_MD], _rows_with(layout_ids, layouts, _KEY_MD), rows, cigar, cig_start, n_cig)
        miss = d != v
        ex = v[miss].astype(_INT_DTYPES[t])
        return miss.astype(np.uint8), np.frombuffer(shuffle(ex, w), dtype=np.uint8)
    ms, ml = _z_split(vals)
    if model == MODEL_MD:
        txt, st, good = _md_texts(md_ref, cigar, cig_start, n_cig, rows)
        tl = np.diff(st) - 1
        miss = ~good | (tl != ml)
    else:  # MODEL_MC
        m = mate[rows]
        txt, st = _cigar_texts(cigar, cig_start, n_cig, np.where(m >= 0, m, rows))
        tl = np.diff(st) - 1
        miss = (m < 0) | (tl != ml)
    same = np.flatnonzero(~miss)
    if len(same):
        a = gather(txt, st[:-1][same], tl[same])
        b = gather(vals, ms[same], ml[same])
        cs = np.concatenate([[0], np.cumsum(a != b)])
        ends = np.cumsum(tl[same])
        bad = cs[ends] - cs[ends - tl[same]]
        miss[same[bad > 0]] = True
    mi = np.flatnonzero(miss)
    return miss.astype(np.uint8), gather(vals, ms[mi], ml[mi] + 1)


def encode_tags(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray, cctx: zstandard.ZstdCompressor, *,
                cigar: np.ndarray | None = None, n_cigar: np.ndarray | None = None,
                mate: np.ndarray | None = None, md_ref=None) -> bytes:
    """Columnar encoding of the tag areas; falls back to raw bytes if they do not parse.

    With the block's CIGARs (``cigar`` words, ``n_cigar`` per record) and mates (``mate``:
    record index or -1, :func:`mate_index`) the frame is method 2: NM and MC values the
    block's own data reproduce are not stored (§12.3); with ``md_ref`` = (nibbles, l_seq,
    pos, consensus, lo) (:func:`bams3core.seqcodec.block_consensus`) MD values neither."""
    buf = gather(buf, starts, lens)  # work on this block's tag bytes only
    starts = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    try:
        layout_ids, layouts, cols = split_tags(buf, starts, lens)
    except TagError:
        return b"\x00" + cctx.compress(gather(buf, starts, lens).tobytes())
    if len(layouts) > 0xFFFF:
        return b"\x00" + cctx.compress(gather(buf, starts, lens).tobytes())
    v2 = cigar is not None
    head = [b"\x02" if v2 else b"\x01", struct.pack("<I", len(layouts))]
    for lay in layouts:
        head.append(struct.pack("<H", len(lay)))
        head.extend(_kbytes(k) for k in lay)
    ids = layout_ids.astype("<u2")
    payloads = [cctx.compress(shuffle(ids))]
    head.append(struct.pack("<I", len(cols)))
    if v2:
        cigar, n_cig, cig_start = _cigar_args(cigar, n_cigar)
        mate = np.asarray(mate, dtype=np.int64)
    for key, vals in cols.items():
        model = _model_of(key, cols, md_ref) if v2 else MODEL_PLAIN
        if model == MODEL_PLAIN:
            payload = cctx.compress(vals.tobytes())
        else:
            rows = _rows_with(layout_ids, layouts, key)
            flags, explicit = _encode_derived(model, key, vals, rows, cols, layout_ids, layouts,
                                              cigar, n_cig, cig_start, mate, md_ref)
            f = cctx.compress(flags.tobytes())
            payload = struct.pack("<I", len(f)) + f + cctx.compress(explicit.tobytes())
        head.append(_kbytes(key) + (bytes((model,)) if v2 else b"") + struct.pack("<I", len(payload)))
        payloads.append(payload)
    return b"".join(head) + struct.pack("<I", len(payloads[0])) + b"".join(payloads)


def tags_method(frame: bytes) -> int:
    """The method byte of a tags frame (2: the record's tag-area lengths come from the frame)."""
    if not frame:
        raise TagError("empty tags stream")
    return frame[0]


def decode_tags(data: bytes, l_tags: np.ndarray, dctx: zstandard.ZstdDecompressor, *,
                cigar: np.ndarray | None = None, n_cigar: np.ndarray | None = None,
                mate: np.ndarray | None = None, md_ref=None) -> np.ndarray:
    """Inverse of :func:`encode_tags`: the concatenated tag areas (uint8)."""
    return decode_tag_areas(data, len(l_tags), dctx, l_tags=l_tags, cigar=cigar, n_cigar=n_cigar, mate=mate,
                            md_ref=md_ref)[0]


def decode_tag_areas(data: bytes, n: int, dctx: zstandard.ZstdDecompressor, *, l_tags: np.ndarray | None = None,
                     cigar=None, n_cigar=None, mate=None, md_ref=None) -> tuple[np.ndarray, np.ndarray]:
    """(areas, l_tags) of ``n`` records. ``l_tags`` may be None for a method-2 frame (whose
    values give each area's length); method 2 also needs the block's ``cigar``, ``n_cigar``
    and ``mate`` (:func:`mate_index`) when it has derived columns, and ``md_ref`` (as for
    :func:`encode_tags`, or a function returning it) for a derived MD column."""
    if not data:
        raise TagError("empty tags stream")
    if data[0] == 0:
        if l_tags is None:
            raise TagError("a raw tags frame needs the tag-area lengths")
        return np.frombuffer(dctx.decompress(data[1:]), dtype=np.uint8), np.asarray(l_tags, dtype=np.int64)
    if data[0] not in (1, 2):
        raise TagError("unknown tags encoding")
    v2 = data[0] == 2
    if l_tags is None and not v2:
        raise TagError("a method-1 tags frame needs the tag-area lengths")
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
    colkeys, colsizes, models = [], [], []
    for _ in range(ncol):
        colkeys.append((data[p] << 16) | (data[p + 1] << 8) | data[p + 2])
        p += 3
        models.append(data[p] if v2 else MODEL_PLAIN)
        p += 1 if v2 else 0
        colsizes.append(struct.unpack_from("<I", data, p)[0])
        p += 4
    (idsize,) = struct.unpack_from("<I", data, p)
    p += 4
    raw_ids = np.frombuffer(dctx.decompress(data[p:p + idsize]), dtype=np.uint8)
    p += idsize
    if len(raw_ids) != 2 * n:
        raise TagError("tag layout count mismatch")
    ids = unshuffle(raw_ids, 2, "<u2").astype(np.int64)
    if n and ids.max() >= nlay:
        raise TagError("bad tag layout id")
    if len(set(colkeys)) != len(colkeys):
        raise TagError("a tag column is repeated")
    colvals = {}
    derived = {}
    for key, size, model in zip(colkeys, colsizes, models):
        body = data[p:p + size]
        p += size
        if model == MODEL_PLAIN:
            colvals[key] = np.frombuffer(dctx.decompress(body), dtype=np.uint8)
        elif model in (MODEL_NM, MODEL_MC, MODEL_MD):
            if (model == MODEL_NM) != (_model_of(key, colkeys) == MODEL_NM) or \
                    (model == MODEL_MC and key != _KEY_MC) or (model == MODEL_MD and key != _KEY_MD):
                raise TagError("bad derived tag column")
            (fs,) = struct.unpack_from("<I", body, 0)
            flags = np.frombuffer(dctx.decompress(body[4:4 + fs]), dtype=np.uint8)
            explicit = np.frombuffer(dctx.decompress(body[4 + fs:]), dtype=np.uint8)
            derived[key] = (model, flags, explicit)
        else:
            raise TagError("unknown tag column model")
    maxslots = max((len(l) for l in layouts), default=0)
    lay_arr = np.full((max(nlay, 1), maxslots), -1, dtype=np.int64)
    for i, l in enumerate(layouts):
        lay_arr[i, :len(l)] = l
    K = lay_arr[ids] if n else np.zeros((0, maxslots), dtype=np.int64)
    # per column: record rows in record order
    col_rows: dict[int, list] = {}
    for s in range(maxslots):
        ks = K[:, s]
        for key in np.unique(ks[ks >= 0]):
            col_rows.setdefault(int(key), []).append((s, np.flatnonzero(ks == key)))
    rows_of = {key: np.sort(np.concatenate([r for _, r in lst])) for key, lst in col_rows.items()}
    if derived:
        if cigar is None or n_cigar is None or mate is None:
            raise TagError("derived tag columns need the block's CIGARs and mates")
        cig, n_cig, cig_start = _cigar_args(cigar, n_cigar)
        mate = np.asarray(mate, dtype=np.int64)
        if any(m == MODEL_MD for m, _, _ in derived.values()):
            if callable(md_ref):
                md_ref = md_ref()
            if md_ref is None:
                raise TagError("a derived MD column needs the block's consensus")
        # plain columns are all decoded here; MD before NM, which derives from it
        for key, (model, flags, explicit) in sorted(derived.items(), key=lambda kv: kv[1][0] != MODEL_MD):
            rows = rows_of.get(key, np.zeros(0, np.int64))
            if len(flags) != len(rows) or (flags > 1).any():
                raise TagError("tag column size mismatch")
            colvals[key] = _decode_derived(model, key, rows, flags, explicit, colvals, rows_of, cig, n_cig,
                                           cig_start, mate, md_ref)
    rec_len = np.zeros(n, dtype=np.int64)
    for key, rows in rows_of.items():
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
        rec_len[rows] += 3 + lens
    if l_tags is None:
        l_tags = rec_len
    else:
        l_tags = np.asarray(l_tags, dtype=np.int64)
    out = np.empty(int(l_tags.sum()), dtype=np.uint8)
    rec_start = np.zeros(n, dtype=np.int64)
    np.cumsum(l_tags[:-1], out=rec_start[1:])
    cursor = rec_start.copy()
    if (rec_len != l_tags).any():
        raise TagError("tag areas do not add up")
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
    return out, l_tags


def _decode_derived(model, key, rows, flags, explicit, colvals, rows_of, cigar, n_cig, cig_start, mate, md_ref):
    """The full column (as method 1 stores it) of a derived column."""
    t = key & 0xFF
    use = np.flatnonzero(flags == 0)
    if model == MODEL_NM:
        w = _FIXED[t]
        dt = np.dtype(_INT_DTYPES[t])
        nex = int(len(rows) - len(use))
        if len(explicit) != w * nex:
            raise TagError("tag column size mismatch")
        ex = unshuffle(explicit, w, dt) if w > 1 else explicit.view(dt)
        md = colvals.get(_KEY_MD)
        if md is None:
            raise TagError("missing tag column")
        d = _derived_nm(md, rows_of.get(_KEY_MD, np.zeros(0, np.int64)), rows[use], cigar, cig_start, n_cig)
        info = np.iinfo(dt)
        if ((d < info.min) | (d > info.max)).any():
            raise TagError("a derived NM does not fit its type")
        v = np.empty(len(rows), dtype=dt)
        v[use] = d
        v[flags == 1] = ex
        return np.frombuffer(shuffle(v, w), dtype=np.uint8)
    if model == MODEL_MD:
        txt, st, good = _md_texts(md_ref, cigar, cig_start, n_cig, rows[use])
        if not good.all():
            raise TagError("a derived MD without a consensus")
    else:  # MODEL_MC
        m = mate[rows[use]]
        if (m < 0).any() or (m >= len(n_cig)).any():
            raise TagError("a derived MC without a mate")
        txt, st = _cigar_texts(cigar, cig_start, n_cig, m)
    es, el = _z_split(explicit)
    miss = np.flatnonzero(flags == 1)
    if len(es) != len(miss) or (len(explicit) and explicit[-1] != 0):
        raise TagError("tag column size mismatch")
    lens = np.zeros(len(rows), dtype=np.int64)
    lens[use] = np.diff(st)
    lens[miss] = el + 1
    starts = np.zeros(len(rows), dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    out = np.empty(int(lens.sum()), dtype=np.uint8)
    scatter(out, starts[use], lens[use], txt)
    scatter(out, starts[miss], lens[miss], gather(explicit, es, el + 1))
    return out
