"""Lossless compressor for BAM quality scores (the ``qual`` stream).

``encode_quals(qual, lengths) -> bytes`` / ``decode_quals(data, lengths) -> ndarray``.
``qual`` is the concatenation of every read's quality bytes (uint8; BAM raw Phred 0..93,
and 0xFF throughout a read whose quality is '*'); ``lengths`` is each read's length.
Every byte value round-trips.

Format — the first byte is the method id:

* ``0`` zstd: ``[0][varint nreads][u16 lengths-hash][zstd frame of the raw bytes]``.
  Fallback for more than :data:`MAX_SYMBOLS` distinct values, or when method 1's output
  would exceed the raw size by more than 1/8.
* ``1`` context model + range coder (fqzcomp / CRAM 3.1 style):
  ``[1][preset][nsym][nsym distinct symbol bytes, most frequent first][varint total]
  [varint nreads][u16 lengths-hash][range-coder bytes]``.
* ``2`` constant: ``[2][symbol][varint total][varint nreads][u16 lengths-hash]``: every
  byte equals ``symbol`` (also empty input).

The lengths-hash is the low 16 bits of CRC-32 of the lengths as little-endian int64;
with the stored counts it makes decoding with the wrong ``lengths`` raise ValueError.

Method 1 model. Symbols are dense-ranked: ``rank`` = index among the block's sorted
distinct values (keeps the order of qualities; used for contexts), and each symbol is
coded by its index in the stored table ("coding order", most frequent first, so the
linear cumulative-frequency scan is short). A symbol's probability is the sum of two
adaptive frequency tables, a cheap form of model mixing that learns fast on small blocks
(a few hundred reads):

* table A (increment 32, halved above 2^16), context = (q1, q2', position bucket, bucket
  of a slow moving average of the read's ranks ``ema += (64*rank - ema) >> 4``),
* table B (increment 8, halved above 2^12), a lower-order context.

q1, q2, q3 are the previous ranks in the read (reset to 0 at each read start). The
layout depends on ``preset``, chosen from the alphabet size and stored in the header
(the decoder derives every table from ``preset`` and ``nsym``):

* preset 0, ≤ 12 symbols (binned qualities): A = (q1, max(q2, q3), pos/32 capped at 3,
  12 average buckets); B = (q1, q2, pos/64 capped at 1);
* preset 1, 13..64 symbols: A = (q1, q2 in 5 buckets, pos/32 capped at 3, 4 average
  buckets); B = (q1).

Fresh tables have every frequency 1, plus a head start of 4 for the symbol equal to q1.
Before each read of length ≥ 2 one adaptive bit (context = previous read's bit) says
whether the read is coded reversed: the encoder reverses reads whose qualities rise
along the read (reverse-strand reads are stored in reference orientation), so position
and history contexts run in sequencing order. The range coder is LZMA's (32-bit range,
64-bit low with carry propagation, byte-wise normalisation below 2^24); frequency totals
stay below 2^17, so precision loss is negligible.

The decoder is bounds-safe on corrupt input: bytes past the end read as 0, every decoded
rank is valid and loops are bounded by ``lengths``, so damage gives ValueError or wrong
qualities, never an out-of-bounds access or a hang.

Kernels are numba ``njit(cache=True, nogil=True)``: callers may encode/decode in parallel
threads. Compiled lazily on first use (a few seconds once; then loaded from numba's cache).
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np
import zstandard
from .jit import njit  # numba, with a cache directory that always works

__all__ = ["encode_quals", "decode_quals", "METHOD_ZSTD", "METHOD_CM", "METHOD_CONST", "MAX_SYMBOLS"]

METHOD_ZSTD = 0
METHOD_CM = 1
METHOD_CONST = 2

MAX_SYMBOLS = 64  # more distinct values than this -> zstd
ZSTD_LEVEL = 7
SMALL_ALPHABET = 12  # preset 0 up to this many symbols

# ---------------------------------------------------------------- model layout (presets)
# params vector indices
_P_NQ2, _P_NP, _P_NE, _P_INCA, _P_LIMA, _P_NQ2B, _P_NPB, _P_INCB, _P_LIMB, _P_BOOST, _P_Q2MAX = range(11)
_NPARAMS = 11
_POS_TAB = 1024  # positions >= this share the last bucket


@lru_cache(maxsize=256)
def _model_tables(preset: int, n: int):
    """(params, q2tab, ptab, etab, q2tabB, ptabB) for a preset and alphabet size (read-only)."""
    r = np.arange(n)
    pos = np.arange(_POS_TAB)
    if preset == 0:
        nq2 = n
        q2tab = r.copy()
        npos = 4
        ptab = np.minimum(pos >> 5, npos - 1)
        ne = 12
        nq2b = n
        q2tabB = r.copy()
        npb = 2
        ptabB = np.minimum(pos >> 6, npb - 1)
        inca, lima, incb, limb = 32, 1 << 16, 8, 1 << 12
    elif preset == 1:
        nq2 = 5
        q2tab = np.minimum(r * nq2 // n, nq2 - 1)
        npos = 4
        ptab = np.minimum(pos >> 5, npos - 1)
        ne = 4
        nq2b = 1
        q2tabB = np.zeros(n, np.int64)
        npb = 1
        ptabB = np.zeros(_POS_TAB, np.int64)
        inca, lima, incb, limb = 32, 1 << 16, 8, 1 << 12
    else:
        raise ValueError(f"unknown quality model preset {preset}")
    # ema is rank*64 smoothed; index etab by ema >> 4 (rank*4 resolution): 0 .. 4*(n-1)
    ei = np.arange(4 * n)
    etab = np.minimum(ei * ne // (4 * n), ne - 1) if ne > 1 else np.zeros(4 * n, np.int64)
    params = np.zeros(_NPARAMS, np.int64)
    params[_P_NQ2], params[_P_NP], params[_P_NE] = nq2, npos, ne
    params[_P_INCA], params[_P_LIMA] = inca, lima
    params[_P_NQ2B], params[_P_NPB], params[_P_INCB], params[_P_LIMB] = nq2b, npb, incb, limb
    params[_P_BOOST] = 4
    params[_P_Q2MAX] = 1 if preset == 0 else 0
    out = tuple(np.ascontiguousarray(a, dtype=np.int64) for a in (params, q2tab, ptab, etab, q2tabB, ptabB))
    for a in out:
        a.flags.writeable = False
    return out


# ---------------------------------------------------------------- numba kernels
_TOP = np.int64(1 << 24)
_MASK32 = np.int64(0xFFFFFFFF)


@njit(cache=True, nogil=True)
def _byte_counts(q):
    """np.bincount(q, minlength=256) for uint8 ``q`` (four sub-histograms: no store stalls)."""
    c = np.zeros((4, 256), np.int64)
    m = q.shape[0] & ~3
    for i in range(0, m, 4):
        c[0, q[i]] += 1
        c[1, q[i + 1]] += 1
        c[2, q[i + 2]] += 1
        c[3, q[i + 3]] += 1
    for i in range(m, q.shape[0]):
        c[0, q[i]] += 1
    return c[0] + c[1] + c[2] + c[3]


# Callees with a signature: typed once (calls with literal arguments would compile variants).
@njit("int64(int32[:, ::1], int64, int64)", cache=True, nogil=True)
def _rescale(f, row, n):
    t = 0
    for k in range(n):
        v = (f[row, k] + 1) >> 1
        f[row, k] = v
        t += v
    return t


@njit(cache=True, nogil=True)
def _shift_low(low, cache, csize, out, op):
    """LZMA rc ShiftLow: emit the top byte of ``low`` (with carry); op = -1 if ``out`` is full."""
    if low < 0xFF000000 or low > _MASK32:
        carry = low >> 32
        temp = cache
        while True:
            if op >= out.shape[0]:
                return low, cache, csize, -1
            out[op] = (temp + carry) & 0xFF
            op += 1
            temp = 0xFF
            csize -= 1
            if csize == 0:
                break
        cache = (low >> 24) & 0xFF
    csize += 1
    low = (low & 0x00FFFFFF) << 8
    return low, cache, csize, op


@njit(cache=True, nogil=True)
def _new_tables(n, params, cidx):
    """Fresh frequency tables; the symbol equal to q1 starts with a head start."""
    nq2 = params[0]; npos = params[1]; ne = params[2]
    nq2b = params[5]; npb = params[6]; boost = params[9]
    nca = n * nq2 * npos * ne
    ncb = n * nq2b * npb
    fa = np.ones((nca, n), np.int32)
    ta = np.full(nca, n, np.int32)
    fb = np.ones((ncb, n), np.int32)
    tb = np.full(ncb, n, np.int32)
    if boost > 0:
        per = nca // n
        for c in range(nca):
            fa[c, cidx[c // per]] += boost
            ta[c] += boost
        per = ncb // n
        for c in range(ncb):
            fb[c, cidx[c // per]] += boost
            tb[c] += boost
    return fa, ta, fb, tb


@njit(cache=True, nogil=True)
def _encode_kernel(qual, lengths, rank, cidx, n, params, q2tab, ptab, etab, q2tabB, ptabB, out):
    """Range-code ``qual`` into ``out``; returns the number of bytes, or -1 if ``out`` is full."""
    nq2 = params[0]; npos = params[1]; ne = params[2]; inca = params[3]; lima = params[4]
    nq2b = params[5]; npb = params[6]; incb = params[7]; limb = params[8]; q2max = params[10]
    fa, ta, fb, tb = _new_tables(n, params, cidx)
    fo = np.ones((2, 2), np.int32)
    to = np.full(2, 2, np.int32)
    # range coder state
    low = np.int64(0)
    rng = np.int64(0xFFFFFFFF)
    cache = np.int64(0)
    csize = np.int64(1)
    op = 0
    ptmax = ptab.shape[0] - 1
    off = 0
    prev_rev = 0
    for ri in range(lengths.shape[0]):
        L = lengths[ri]
        rev = 0
        if L >= 2:
            # orientation heuristic: qualities rising along the stored read -> reversed
            acc = np.int64(0)
            for j in range(L):
                acc += (2 * j - (L - 1)) * rank[qual[off + j]]
            rev = 1 if acc > 0 else 0
            # code the bit
            tot = to[prev_rev]
            cum = fo[prev_rev, 0] if rev else 0
            fr = fo[prev_rev, rev]
            r = np.int64(np.uint32(rng) // np.uint32(tot))  # 32-bit divide: both < 2^32
            low += r * cum
            rng = r * fr
            while rng < _TOP:
                rng <<= 8
                low, cache, csize, op = _shift_low(low, cache, csize, out, op)
                if op < 0:
                    return -1
            fo[prev_rev, rev] += 16
            to[prev_rev] += 16
            if to[prev_rev] > 1 << 12:
                to[prev_rev] = _rescale(fo, prev_rev, 2)
            prev_rev = rev
        q1 = 0
        q2 = 0
        q3 = 0
        ema = 0
        for j in range(L):
            if rev:
                s = rank[qual[off + L - 1 - j]]
            else:
                s = rank[qual[off + j]]
            pj = j if j < ptmax else ptmax
            ctxq = q1 * nq2 + q2tab[q2 if q3 <= q2 or q2max == 0 else q3]
            ca = (ctxq * npos + ptab[pj]) * ne + etab[ema >> 4]
            cb = (q1 * nq2b + q2tabB[q2]) * npb + ptabB[pj]
            ci = cidx[s]
            cum = 0
            if n > 12:  # branch-free (vectorised) sum of the entries before ci
                for k in range(n):
                    cum += (fa[ca, k] + fb[cb, k]) if k < ci else 0
            else:
                for k in range(ci):
                    cum += fa[ca, k] + fb[cb, k]
            fr = fa[ca, ci] + fb[cb, ci]
            tot = ta[ca] + tb[cb]
            r = np.int64(np.uint32(rng) // np.uint32(tot))  # 32-bit divide: both < 2^32
            low += r * cum
            rng = r * fr
            while rng < _TOP:
                rng <<= 8
                low, cache, csize, op = _shift_low(low, cache, csize, out, op)
                if op < 0:
                    return -1
            # update
            fa[ca, ci] += inca
            ta[ca] += inca
            if ta[ca] > lima:
                ta[ca] = _rescale(fa, ca, n)
            fb[cb, ci] += incb
            tb[cb] += incb
            if tb[cb] > limb:
                tb[cb] = _rescale(fb, cb, n)
            if j == 0:
                ema = s << 6
            else:
                ema += ((s << 6) - ema) >> 4
            q3 = q2
            q2 = q1
            q1 = s
        off += L
    # flush: 5 x shift_low
    for _ in range(5):
        low, cache, csize, op = _shift_low(low, cache, csize, out, op)
        if op < 0:
            return -1
    return op


def _fresh_tables(n: int, params: np.ndarray, cidx: np.ndarray):
    """:func:`_new_tables` in numpy, plus the orientation bit's tables (fo, to): the decoder
    takes them as arguments, so compiling it compiles no array allocation (a fresh install's
    first query compiles the decoder, never the encoder)."""
    nca = n * int(params[0]) * int(params[1]) * int(params[2])
    ncb = n * int(params[5]) * int(params[6])
    boost = int(params[9])
    tabs = []
    for nc in (nca, ncb):
        f = np.ones((nc, n), np.int32)
        t = np.full(nc, n, np.int32)
        if boost > 0:
            rows = np.arange(nc)
            f[rows, cidx[rows // (nc // n)]] += boost
            t += boost
        tabs += [f, t]
    return (*tabs, np.ones((2, 2), np.int32), np.full(2, 2, np.int32))


@njit(cache=True, nogil=True)
def _decode_kernel(data, start, lengths, ord_of_ci, n, params, q2tab, ptab, etab, q2tabB, ptabB, fa, ta, fb, tb,
                   fo, to, out_sym):
    """Decode ``sum(lengths)`` symbols (as ranks in ``out_sym``) from ``data[start:]``, with
    fresh tables ``fa, ta, fb, tb, fo, to`` (:func:`_fresh_tables`; updated in place).

    Bounds-safe for any input: bytes past the end read as 0, every decoded value is a
    valid rank, loops are bounded by ``lengths``. Returns the number of bytes consumed
    (can exceed the available bytes when the input is truncated).
    """
    nq2 = params[0]; npos = params[1]; ne = params[2]; inca = params[3]; lima = params[4]
    nq2b = params[5]; npb = params[6]; incb = params[7]; limb = params[8]; q2max = params[10]
    end = data.shape[0]
    ip = start
    rng = np.int64(0xFFFFFFFF)
    code = np.int64(0)
    for _ in range(5):
        b = data[ip] if ip < end else 0
        ip += 1
        code = ((code << 8) | b) & _MASK32
    ptmax = ptab.shape[0] - 1
    off = 0
    prev_rev = 0
    for ri in range(lengths.shape[0]):
        L = lengths[ri]
        rev = 0
        if L >= 2:
            tot = to[prev_rev]
            r = rng // tot
            v = code // r
            f0 = fo[prev_rev, 0]
            if v >= f0:
                rev = 1
                code -= r * f0
                rng = r * fo[prev_rev, 1]
            else:
                rng = r * f0
            while rng < _TOP:
                b = data[ip] if ip < end else 0
                ip += 1
                code = ((code << 8) | b) & _MASK32
                rng <<= 8
            fo[prev_rev, rev] += 16
            to[prev_rev] += 16
            if to[prev_rev] > 1 << 12:
                to[prev_rev] = _rescale(fo, prev_rev, 2)
            prev_rev = rev
        q1 = 0
        q2 = 0
        q3 = 0
        ema = 0
        for j in range(L):
            pj = j if j < ptmax else ptmax
            ctxq = q1 * nq2 + q2tab[q2 if q3 <= q2 or q2max == 0 else q3]
            ca = (ctxq * npos + ptab[pj]) * ne + etab[ema >> 4]
            cb = (q1 * nq2b + q2tabB[q2]) * npb + ptabB[pj]
            r = rng // (ta[ca] + tb[cb])
            # find the symbol whose interval [r*cum, r*(cum+freq)) holds code (no 2nd
            # division); the last symbol also takes the excess of corrupt input
            cum = 0
            ci = 0
            while True:
                fr = fa[ca, ci] + fb[cb, ci]
                if r * (cum + fr) > code or ci == n - 1:
                    break
                cum += fr
                ci += 1
            code -= r * cum
            rng = r * fr
            while rng < _TOP:
                b = data[ip] if ip < end else 0
                ip += 1
                code = ((code << 8) | b) & _MASK32
                rng <<= 8
            fa[ca, ci] += inca
            ta[ca] += inca
            if ta[ca] > lima:
                ta[ca] = _rescale(fa, ca, n)
            fb[cb, ci] += incb
            tb[cb] += incb
            if tb[cb] > limb:
                tb[cb] = _rescale(fb, cb, n)
            s = ord_of_ci[ci]
            if rev:
                out_sym[off + L - 1 - j] = s
            else:
                out_sym[off + j] = s
            if j == 0:
                ema = s << 6
            else:
                ema += ((s << 6) - ema) >> 4
            q3 = q2
            q2 = q1
            q1 = s
        off += L
    return ip - start


# ---------------------------------------------------------------- header helpers


def _put_varint(buf: bytearray, v: int) -> None:
    while v >= 0x80:
        buf.append((v & 0x7F) | 0x80)
        v >>= 7
    buf.append(v)


def _get_varint(data: bytes, pos: int) -> tuple[int, int]:
    v = 0
    shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("corrupt quality block (bad varint)")
        b = data[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        if b < 0x80:
            return v, pos
        shift += 7


def _lengths_hash(lengths: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(lengths, dtype="<i8").tobytes()) & 0xFFFF


def _as_lengths(lengths) -> np.ndarray:
    a = np.asarray(lengths)
    if a.size and a.dtype.kind not in "iu":
        raise ValueError("read lengths must be integers")
    a = np.ascontiguousarray(a, dtype=np.int64).reshape(-1)
    if not a.flags.writeable:  # one numba signature for all callers
        a = a.copy()
    if a.size and int(a.min()) < 0:
        raise ValueError("negative read length")
    return a


def _check_inputs(qual, lengths) -> tuple[np.ndarray, np.ndarray]:
    q = np.asarray(qual)
    if q.dtype != np.uint8:
        if q.size and (q.dtype.kind not in "iu" or int(q.min()) < 0 or int(q.max()) > 255):
            raise ValueError("qualities must be uint8 values")
        q = q.astype(np.uint8)
    q = np.ascontiguousarray(q).reshape(-1)
    if not q.flags.writeable:
        q = q.copy()
    lengths = _as_lengths(lengths)
    if int(lengths.sum()) != q.size:
        raise ValueError(f"lengths sum to {int(lengths.sum())} but there are {q.size} quality values")
    return q, lengths


def _tail(buf: bytearray, total: int, nreads: int, lhash: int) -> None:
    _put_varint(buf, total)
    _put_varint(buf, nreads)
    buf += lhash.to_bytes(2, "little")


# ---------------------------------------------------------------- public API


def encode_quals(qual: np.ndarray, lengths: np.ndarray) -> bytes:
    """Compress the concatenated qualities ``qual`` of reads of ``lengths``."""
    qual, lengths = _check_inputs(qual, lengths)
    total = qual.size
    nreads = lengths.size
    lhash = _lengths_hash(lengths)
    counts = _byte_counts(qual)
    syms = np.flatnonzero(counts)
    n = syms.size
    if n <= 1:
        buf = bytearray((METHOD_CONST, int(syms[0]) if n else 0))
        _tail(buf, total, nreads, lhash)
        return bytes(buf)
    if n <= MAX_SYMBOLS:
        preset = 0 if n <= SMALL_ALPHABET else 1
        rank = np.zeros(256, np.int64)
        rank[syms] = np.arange(n)
        # coding order: most frequent first (ties: lower value first)
        order = np.argsort(-counts[syms], kind="stable")  # order[ci] = rank
        cidx = np.empty(n, np.int64)
        cidx[order] = np.arange(n)
        tabs = _model_tables(preset, n)
        cap = total + (total >> 3) + 64
        out = np.empty(cap, np.uint8)
        nb = _encode_kernel(qual, lengths, rank, cidx, n, *tabs, out)
        if nb >= 0:
            buf = bytearray((METHOD_CM, preset, n))
            buf += syms[order].astype(np.uint8).tobytes()
            _tail(buf, total, nreads, lhash)
            buf += out[:nb].tobytes()
            return bytes(buf)
    buf = bytearray((METHOD_ZSTD,))
    _put_varint(buf, nreads)
    buf += lhash.to_bytes(2, "little")
    buf += zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(qual.tobytes())
    return bytes(buf)


def decode_quals(data: bytes, lengths: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_quals`; raises ValueError on mismatch or corrupt input."""
    lengths = _as_lengths(lengths)
    total = int(lengths.sum())
    nreads = lengths.size
    data = bytes(data)
    if not data:
        raise ValueError("empty quality block")
    method = data[0]
    if method == METHOD_ZSTD:
        nr, pos = _get_varint(data, 1)
        if pos + 2 > len(data):
            raise ValueError("corrupt quality block (truncated header)")
        lh = int.from_bytes(data[pos:pos + 2], "little")
        _check_counts(total, nreads, lh, None, nr, lengths)
        frame = data[pos + 2:]
        try:
            fcs = zstandard.frame_content_size(frame)
            if fcs not in (-1, total):
                raise ValueError(f"quality block holds {fcs} values, lengths sum to {total}")
            raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=max(total, 1))
        except zstandard.ZstdError as e:
            raise ValueError(f"corrupt quality block: {e}") from None
        if len(raw) != total:
            raise ValueError(f"quality block holds {len(raw)} values, lengths sum to {total}")
        return np.frombuffer(raw, dtype=np.uint8).copy()
    if method == METHOD_CONST:
        if len(data) < 2:
            raise ValueError("corrupt quality block (truncated header)")
        sym = data[1]
        tot, pos = _get_varint(data, 2)
        nr, pos = _get_varint(data, pos)
        if pos + 2 != len(data):
            raise ValueError("corrupt quality block (bad constant block)")
        lh = int.from_bytes(data[pos:pos + 2], "little")
        _check_counts(total, nreads, lh, tot, nr, lengths)
        return np.full(total, sym, dtype=np.uint8)
    if method == METHOD_CM:
        if len(data) < 3:
            raise ValueError("corrupt quality block (truncated header)")
        preset, n = data[1], data[2]
        if not 2 <= n <= MAX_SYMBOLS or preset not in (0, 1):
            raise ValueError("corrupt quality block (bad model header)")
        pos = 3 + n
        if pos > len(data):
            raise ValueError("corrupt quality block (truncated symbol table)")
        csyms = np.frombuffer(data, dtype=np.uint8, count=n, offset=3)  # coding order
        order = np.argsort(csyms, kind="stable")  # order[rank] = ci
        syms = csyms[order]  # ascending
        if np.any(syms[1:] == syms[:-1]):
            raise ValueError("corrupt quality block (bad symbol table)")
        ord_of_ci = np.empty(n, np.int64)
        ord_of_ci[order] = np.arange(n)
        tot, pos = _get_varint(data, pos)
        nr, pos = _get_varint(data, pos)
        if pos + 2 > len(data):
            raise ValueError("corrupt quality block (truncated header)")
        lh = int.from_bytes(data[pos:pos + 2], "little")
        _check_counts(total, nreads, lh, tot, nr, lengths)
        pos += 2
        tabs = _model_tables(preset, n)
        cidx = np.empty(n, np.int64)
        cidx[ord_of_ci] = np.arange(n)
        ranks = np.empty(total, np.uint8)
        arr = np.frombuffer(data, dtype=np.uint8)
        _decode_kernel(arr, pos, lengths, ord_of_ci, n, *tabs, *_fresh_tables(n, tabs[0], cidx), ranks)
        return syms[ranks]
    raise ValueError(f"unknown quality block method {method}")


def _check_counts(total, nreads, lh, tot, nr, lengths) -> None:
    if tot is not None and tot != total:
        raise ValueError(f"quality block holds {tot} values, lengths sum to {total}")
    if nr != nreads:
        raise ValueError(f"quality block holds {nr} reads, got {nreads} lengths")
    if lh != _lengths_hash(lengths):
        raise ValueError("read lengths do not match the quality block")
