"""The ``seq`` stream's coders: zstd of the base nibbles (v1), or a context model that
predicts each aligned base from the bases earlier records of the same block put at that
reference position (the block's own consensus; no reference needed).

``encode_seq(nibbles, l_seq, pos, cigar, n_cigar) -> bytes`` /
``decode_seq(frame, l_seq, pos, cigar, n_cigar, dctx) -> ndarray``. ``nibbles`` is the
stream's content of §6.4: one byte per 4-bit base code, ``2*((l_seq+1)//2)`` per record
(the pad nibble of odd lengths included).

Frame formats (docs/FORMAT.md §6.4.1):

* a zstd frame of the nibbles (it starts with the zstd magic ``28 b5 2f fd``): v1;
* method ``01``: ``[01][varint span][varint zz(lo)][varint total][range-coder bytes]``.

Method 1 model. A consensus array covers the reference positions ``[lo, lo + span)``;
each entry holds a base code (or "none") and a vote count. For each record in block
order, its CIGAR is walked from POS: the bases of ``M``/``=``/``X`` operations (up to
``l_seq``) are aligned to a reference position, ``I``/``S`` bases and bases past the
CIGAR are not, other operations advance the reference position (``D``/``N``) or nothing.
A base aligned to a position whose consensus is set is coded in the context
(consensus base, min(votes, 3), whether the read's previous base differed from its
prediction); any other base in the context of the read's two previous nibbles (0 at the
read start); the pad nibble of an odd-length read in a context of its own. In the
consensus contexts the symbol coded is the nibble XOR the consensus base. After each
base the position's vote is updated (Boyer-Moore majority: same base +1, other base -1,
at 0 the base replaces the consensus with 1 vote). Frequencies are adaptive (all 1 at
the start, +24 per symbol, halved above 2^16); the range coder is the quality coder's
(§6.9.3).
"""

from __future__ import annotations

import numpy as np
import zstandard
from .jit import njit  # numba, with a cache directory that always works

from .qualcodec import _get_varint, _put_varint, _rescale, _shift_low

METHOD_CM = 1
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_SPAN = 1 << 24  # the most reference positions a decoder accepts (§12.2)
WRITE_MAX_SPAN = 1 << 22  # the writer codes blocks spanning more with zstd (2 x 4 MiB of model state)
ZSTD_LEVEL = 7

_NSYM = 16
_NPRED = 16 * 4 * 2            # (consensus base, votes bucket, previous base mispredicted)
_CTX_NOPRED = _NPRED           # + 16 * p1 + p2
_CTX_PAD = _NPRED + 256
_NCTX = _CTX_PAD + 1
_INC = 24
_LIMIT = 1 << 16
_TOP = np.int64(1 << 24)
_MASK32 = np.int64(0xFFFFFFFF)


@njit(cache=True, nogil=True)
def _align(pos, cigar, c0, nc, L, lo, span, kpos):
    """kpos[j] = the consensus index (reference position - lo) of read base j, or -1 when the
    base is not aligned or falls outside the span."""
    for j in range(L):
        kpos[j] = -1
    q = 0
    r = pos
    for k in range(c0, c0 + nc):
        w = cigar[k]
        ln = np.int64(w >> 4)
        op = w & 0xF
        if op == 0 or op == 7 or op == 8:
            for t in range(ln):
                if q >= L:
                    break
                if r >= lo and r < lo + span:
                    kpos[q] = r - lo
                q += 1
                r += 1
        elif op == 1 or op == 4:
            q += ln
        elif op == 2 or op == 3:
            r += ln
        if q >= L:
            break


# The per-base steps below are written out in each kernel: numba does not reliably inline
# small functions taking arrays, and a call per base (with its reference counting) costs
# ten times the work.

@njit(cache=True, nogil=True)
def _encode_kernel(nib, l_seq, pos, cigar, n_cig, lo, span, out):
    """Range-code the nibbles; returns the byte count, or -1 if ``out`` is too small."""
    f = np.ones((_NCTX, _NSYM), np.int32)
    tot = np.full(_NCTX, _NSYM, np.int32)
    cons = np.full(max(span, 1), 255, np.uint8)
    votes = np.zeros(max(span, 1), np.uint8)
    maxl = 1
    for i in range(l_seq.shape[0]):
        if l_seq[i] > maxl:
            maxl = l_seq[i]
    kpos = np.empty(maxl, np.int64)
    low = np.int64(0)
    rng = np.int64(0xFFFFFFFF)
    cache = np.int64(0)
    csize = np.int64(1)
    op = 0
    off = 0
    c0 = np.int64(0)
    for i in range(l_seq.shape[0]):
        L = l_seq[i]
        nc = n_cig[i]
        _align(pos[i], cigar, c0, nc, L, lo, span, kpos)
        c0 += nc
        p1 = np.int64(0)
        p2 = np.int64(0)
        miss = np.int64(0)
        nn = L + (L & 1)
        for j in range(nn):
            b = np.int64(nib[off + j])
            k = np.int64(-1)
            c = np.int64(-1)
            if j < L:
                k = kpos[j]
                if k >= 0:
                    c = np.int64(cons[k])
                    if c == 255:
                        c = -1
                if c >= 0:
                    v = np.int64(votes[k])
                    ctx = (c * 4 + (v if v < 3 else 3)) * 2 + miss
                else:
                    ctx = _CTX_NOPRED + p1 * 16 + p2
            else:
                ctx = _CTX_PAD
            sym = b ^ c if c >= 0 else b  # the consensus base is symbol 0: the shortest scan
            cum = 0
            for t in range(sym):
                cum += f[ctx, t]
            fr = f[ctx, sym]
            r = np.int64(np.uint32(rng) // np.uint32(tot[ctx]))
            low += r * cum
            rng = r * fr
            while rng < _TOP:
                rng <<= 8
                low, cache, csize, op = _shift_low(low, cache, csize, out, op)
                if op < 0:
                    return -1
            f[ctx, sym] += _INC
            tot[ctx] += _INC
            if tot[ctx] > _LIMIT:
                tot[ctx] = _rescale(f, ctx, _NSYM)
            if j < L:
                if c >= 0:
                    miss = 1 if c != b else 0
                if k >= 0:  # vote (§12.2)
                    cc = np.int64(cons[k])
                    v = np.int64(votes[k])
                    if cc == 255:
                        cons[k] = b
                        votes[k] = 1
                    elif cc == b:
                        if v < 255:
                            votes[k] = v + 1
                    elif v == 1:
                        cons[k] = b
                    else:
                        votes[k] = v - 1
                p2 = p1
                p1 = b
        off += nn
    for _ in range(5):
        low, cache, csize, op = _shift_low(low, cache, csize, out, op)
        if op < 0:
            return -1
    return op


def _work_arrays(l_seq, span: int):
    """The decoders' fresh state, allocated here (compiling a decoder then compiles no array
    allocation): frequencies and totals, consensus and votes over ``span``, and a read's
    reference positions."""
    n = max(span, 1)
    return (np.ones((_NCTX, _NSYM), np.int32), np.full(_NCTX, _NSYM, np.int32), np.full(n, 255, np.uint8),
            np.zeros(n, np.uint8), np.empty(max(int(l_seq.max()) if len(l_seq) else 1, 1), np.int64))


@njit(cache=True, nogil=True)
def _decode_kernel(data, start, l_seq, pos, cigar, n_cig, lo, span, f, tot, cons, votes, kpos, out):
    """Inverse of :func:`_encode_kernel`, with the fresh state of :func:`_work_arrays`;
    bounds-safe (bytes past the end read as 0)."""
    end = data.shape[0]
    ip = start
    rng = np.int64(0xFFFFFFFF)
    code = np.int64(0)
    for _ in range(5):
        x = data[ip] if ip < end else 0
        ip += 1
        code = ((code << 8) | x) & _MASK32
    off = 0
    c0 = np.int64(0)
    for i in range(l_seq.shape[0]):
        L = l_seq[i]
        nc = n_cig[i]
        _align(pos[i], cigar, c0, nc, L, lo, span, kpos)
        c0 += nc
        p1 = np.int64(0)
        p2 = np.int64(0)
        miss = np.int64(0)
        nn = L + (L & 1)
        for j in range(nn):
            k = np.int64(-1)
            c = np.int64(-1)
            if j < L:
                k = kpos[j]
                if k >= 0:
                    c = np.int64(cons[k])
                    if c == 255:
                        c = -1
                if c >= 0:
                    v = np.int64(votes[k])
                    ctx = (c * 4 + (v if v < 3 else 3)) * 2 + miss
                else:
                    ctx = _CTX_NOPRED + p1 * 16 + p2
            else:
                ctx = _CTX_PAD
            r = rng // tot[ctx]
            cum = 0
            b = np.int64(0)
            while True:
                fr = f[ctx, b]
                if r * (cum + fr) > code or b == _NSYM - 1:
                    break
                cum += fr
                b += 1
            code -= r * cum
            rng = r * fr
            while rng < _TOP:
                x = data[ip] if ip < end else 0
                ip += 1
                code = ((code << 8) | x) & _MASK32
                rng <<= 8
            f[ctx, b] += _INC
            tot[ctx] += _INC
            if tot[ctx] > _LIMIT:
                tot[ctx] = _rescale(f, ctx, _NSYM)
            if c >= 0:
                b ^= c
            out[off + j] = b
            if j < L:
                if c >= 0:
                    miss = 1 if c != b else 0
                if k >= 0:  # vote (§12.2)
                    cc = np.int64(cons[k])
                    v = np.int64(votes[k])
                    if cc == 255:
                        cons[k] = b
                        votes[k] = 1
                    elif cc == b:
                        if v < 255:
                            votes[k] = v + 1
                    elif v == 1:
                        cons[k] = b
                    else:
                        votes[k] = v - 1
                p2 = p1
                p1 = b
        off += nn
    return ip - start


_BASE_OPS = np.zeros(16, bool)  # M = X: a base aligned to a reference position
_BASE_OPS[[0, 7, 8]] = True
_QUERY_OPS = _BASE_OPS.copy()  # ... and I, S: consume read bases
_QUERY_OPS[[1, 4]] = True
_REF_OPS = _BASE_OPS.copy()  # ... and D, N: consume reference
_REF_OPS[[2, 3]] = True


def _span(l_seq, pos, cigar, n_cig) -> tuple[int, int]:
    """(lo, hi): the smallest and one past the largest reference position a base aligns to
    (lo > hi if none). Each record's CIGAR is walked from ``pos``; a run of aligned bases is cut
    at the read's length, and the walk ends once the read's bases are used up. Vectorised
    (numpy): no compiled kernel."""
    nc = np.asarray(n_cig, dtype=np.int64)
    m = int(nc.sum())
    lo, hi = 1 << 62, -(1 << 62)
    if m == 0:
        return lo, hi
    if len(cigar) < m:
        raise ValueError("CIGAR stream shorter than the records' n_cigar")
    w = np.asarray(cigar[:m], dtype=np.uint32)
    ln = (w >> 4).astype(np.int64)
    op = w & 0xF
    rec = np.repeat(np.arange(len(nc)), nc)
    first = np.cumsum(nc) - nc
    ql = np.where(_QUERY_OPS[op], ln, 0)
    rl = np.where(_REF_OPS[op], ln, 0)
    q0 = np.cumsum(ql) - ql  # read bases before each operation (from the block's start)
    r0 = np.cumsum(rl) - rl
    has = nc > 0
    q0 -= np.repeat(q0[first[has]], nc[has])  # ... from the record's start
    r0 += np.repeat(np.asarray(pos, dtype=np.int64)[has] - r0[first[has]], nc[has])
    L = np.repeat(np.asarray(l_seq, dtype=np.int64), nc)
    take = np.minimum(ln, L - q0)
    use = _BASE_OPS[op] & (q0 < L) & (take > 0)  # the walk has not ended before this operation
    if use.any():
        lo = int(r0[use].min())
        hi = int((r0[use] + take[use]).max())
    return lo, hi


def _writable(a, dtype):
    """``a`` as a contiguous, writable array of ``dtype`` (copied only if it is not one): the
    kernels' declared signatures (bams3core.jit) take these arrays writable, whatever the
    caller's came from (a read-only buffer or not)."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.writeable else a.copy()


def _prep(l_seq, pos, cigar, n_cigar):
    return (_writable(l_seq, np.int64), _writable(pos, np.int64), _writable(cigar, np.uint32),
            _writable(n_cigar, np.int64))


def encode_seq(nibbles: np.ndarray, l_seq, pos, cigar, n_cigar, cctx: zstandard.ZstdCompressor) -> bytes:
    """The ``seq`` frame: method 1 when the block's aligned span is at most WRITE_MAX_SPAN, else zstd."""
    l_seq, pos, cigar, n_cigar = _prep(l_seq, pos, cigar, n_cigar)
    nib = np.ascontiguousarray(nibbles, dtype=np.uint8)
    if len(nib) != int((l_seq + (l_seq & 1)).sum()) or (nib > 15).any():
        return cctx.compress(nib.tobytes())
    lo, hi = _span(l_seq, pos, cigar, n_cigar)
    span = int(hi - lo) if hi > lo else 0
    if span > WRITE_MAX_SPAN:
        return cctx.compress(nib.tobytes())
    lo = int(lo) if span else 0
    out = np.empty(len(nib) // 2 + len(nib) // 8 + 64, np.uint8)
    nb = _encode_kernel(nib, l_seq, pos, cigar, n_cigar, lo, span, out)
    if nb < 0:
        return cctx.compress(nib.tobytes())
    head = bytearray((METHOD_CM,))
    _put_varint(head, span)
    _put_varint(head, (lo << 1) ^ (lo >> 63))  # zigzag
    _put_varint(head, len(nib))
    return bytes(head) + out[:nb].tobytes()


def decode_seq(frame: bytes, l_seq, pos, cigar, n_cigar, dctx: zstandard.ZstdDecompressor) -> np.ndarray:
    """The nibbles of a ``seq`` frame (either form); raises ValueError on corrupt input."""
    if frame[:4] == ZSTD_MAGIC:
        try:
            return np.frombuffer(dctx.decompress(frame), dtype=np.uint8)
        except zstandard.ZstdError as e:
            raise ValueError(f"corrupt seq stream ({e})") from None
    if not frame or frame[0] != METHOD_CM:
        raise ValueError("unknown seq stream method")
    l_seq, pos, cigar, n_cigar = _prep(l_seq, pos, cigar, n_cigar)
    span, p = _get_varint(frame, 1)
    zlo, p = _get_varint(frame, p)
    total, p = _get_varint(frame, p)
    lo = (zlo >> 1) ^ -(zlo & 1)
    if span > MAX_SPAN:
        raise ValueError("corrupt seq stream (span too large)")
    if total != int((l_seq + (l_seq & 1)).sum()):
        raise ValueError("seq stream holds a different number of bases than the records")
    out = np.empty(total, np.uint8)
    _decode_kernel(np.frombuffer(frame, dtype=np.uint8), p, l_seq, pos, cigar, n_cigar, lo, span,
                   *_work_arrays(l_seq, span), out)
    return out


@njit(cache=True, nogil=True)
def _consensus_kernel(nib, l_seq, pos, cigar, n_cig, lo, span, cons, votes, kpos):
    """The consensus of §12.2 after every record of the block has voted (cons 255: none);
    ``kpos`` holds at least the longest read."""
    off = 0
    c0 = np.int64(0)
    for i in range(l_seq.shape[0]):
        L = l_seq[i]
        nc = n_cig[i]
        _align(pos[i], cigar, c0, nc, L, lo, span, kpos)
        c0 += nc
        for j in range(L):
            k = kpos[j]
            if k >= 0:
                b = np.int64(nib[off + j])
                cc = np.int64(cons[k])
                v = np.int64(votes[k])
                if cc == 255:
                    cons[k] = b
                    votes[k] = 1
                elif cc == b:
                    if v < 255:
                        votes[k] = v + 1
                elif v == 1:
                    cons[k] = b
                else:
                    votes[k] = v - 1
        off += L + (L & 1)


def block_consensus(nibbles, l_seq, pos, cigar, n_cigar, max_span: int = MAX_SPAN):
    """(cons, lo): the block's consensus base code per reference position ``lo + k`` (255 where
    no base aligns), after all records voted as in §12.2; None if the span exceeds ``max_span``
    (a decoder: MAX_SPAN; the writer derives MD only up to WRITE_MAX_SPAN)."""
    l_seq, pos, cigar, n_cigar = _prep(l_seq, pos, cigar, n_cigar)
    lo, hi = _span(l_seq, pos, cigar, n_cigar)
    span = int(hi - lo) if hi > lo else 0
    if span > max_span:
        return None
    lo = int(lo) if span else 0
    _f, _tot, cons, votes, kpos = _work_arrays(l_seq, span)
    _consensus_kernel(np.ascontiguousarray(nibbles, dtype=np.uint8), l_seq, pos, cigar, n_cigar, lo, span,
                      cons, votes, kpos)
    return cons[:span], lo
