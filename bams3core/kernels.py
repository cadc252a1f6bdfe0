"""Compiled byte-moving kernels behind :mod:`bams3core.bam` (numba, ``nogil``).

Splitting a buffer into records, pulling the fixed fields out of every record and
gathering/scattering variable-length pieces run once per record or per byte; in numpy they
need index arrays and hold the GIL, here they are plain loops that release it, so encoder
threads scale. Every kernel checks its bounds and reports a violation to its Python wrapper
(which raises), so corrupt input gives an exception, never an out-of-bounds access.
"""

from __future__ import annotations

import numpy as np
from .jit import njit  # numba, with a cache directory that always works


@njit(cache=True, nogil=True)
def split_records_kernel(buf, start, min_size, offs):
    """Record boundaries in ``buf[start:]`` -> (n offsets written, end, bad position or -1)."""
    n = buf.shape[0]
    p = start
    k = 0
    offs[k] = p
    k += 1
    while p + 4 <= n:
        bs = np.int64(buf[p]) | (np.int64(buf[p + 1]) << 8) | (np.int64(buf[p + 2]) << 16) | (np.int64(buf[p + 3]) << 24)
        if bs >= 1 << 31:
            bs -= 1 << 32
        if bs < min_size:
            return k, p, p
        q = p + 4 + bs
        if q > n:
            break
        offs[k] = q
        k += 1
        p = q
    return k, p, -1


@njit(cache=True, nogil=True)
def gather_kernel(buf, starts, lens, out):
    """out = concat(buf[starts[i]:starts[i]+lens[i]]); returns the first bad piece or -1."""
    nb = buf.shape[0]
    o = 0
    for i in range(starts.shape[0]):
        a = starts[i]
        m = lens[i]
        if a < 0 or m < 0 or a + m > nb:
            return i
        for j in range(m):
            out[o + j] = buf[a + j]
        o += m
    return -1


@njit(cache=True, nogil=True)
def scatter_kernel(out, starts, lens, values):
    """out[starts[i]:starts[i]+lens[i]] = consecutive pieces of values; first bad piece or -1."""
    no = out.shape[0]
    nv = values.shape[0]
    v = 0
    for i in range(starts.shape[0]):
        a = starts[i]
        m = lens[i]
        if a < 0 or m < 0 or a + m > no or v + m > nv:
            return i
        for j in range(m):
            out[a + j] = values[v + j]
        v += m
    return -1


@njit(cache=True, nogil=True)
def rows_kernel(buf, starts, width, out):
    """out[i, :] = buf[starts[i]:starts[i]+width] (fixed-width rows); first bad row or -1."""
    nb = buf.shape[0]
    for i in range(starts.shape[0]):
        a = starts[i]
        if a < 0 or a + width > nb:
            return i
        for j in range(width):
            out[i, j] = buf[a + j]
    return -1


# BAM tag value sizes by type byte (0: variable or unknown)
_TAG_SIZE = np.zeros(256, np.int64)
for _t, _s in zip(b"AcCsSiIf", (1, 1, 1, 2, 2, 4, 4, 4)):
    _TAG_SIZE[_t] = _s
_B_SIZE = np.zeros(256, np.int64)
for _t, _s in zip(b"cCsSiIf", (1, 1, 2, 2, 4, 4, 4)):
    _B_SIZE[_t] = _s

TAG_OK, TAG_TRUNCATED, TAG_UNTERMINATED, TAG_B_TRUNCATED, TAG_B_SUBTYPE, TAG_UNKNOWN_TYPE, TAG_OVERRUN, \
    TAG_SLOTS = range(8)


@njit(cache=True, nogil=True)
def parse_tags_kernel(buf, starts, lens, size_lut, bsize_lut, keys, offs, sizes):
    """Parse tag areas ``buf[starts[i]:starts[i]+lens[i]]`` into per-slot arrays.

    ``keys[i, s]`` = key0 << 16 | key1 << 8 | type of record i's s-th tag (-1 past its last),
    ``offs``/``sizes`` = where its value starts and how long it is. Returns (status, slots
    used, record): status TAG_OK, TAG_SLOTS if a record has more tags than ``keys`` has
    columns, or the kind of malformation.
    """
    nslots = keys.shape[1]
    used = 0
    for i in range(starts.shape[0]):
        p = starts[i]
        end = p + lens[i]
        s = 0
        while p < end:
            if s >= nslots:
                return TAG_SLOTS, used, i
            if p + 3 > end:
                return TAG_TRUNCATED, used, i
            t = np.int64(buf[p + 2])
            v = p + 3
            size = size_lut[t]
            if size == 0:
                if t == 90 or t == 72:  # 'Z', 'H': NUL-terminated
                    q = v
                    while q < end and buf[q] != 0:
                        q += 1
                    if q >= end:
                        return TAG_UNTERMINATED, used, i
                    size = q - v + 1
                elif t == 66:  # 'B': subtype, u32 count, values
                    if v + 5 > end:
                        return TAG_B_TRUNCATED, used, i
                    esz = bsize_lut[np.int64(buf[v])]
                    if esz == 0:
                        return TAG_B_SUBTYPE, used, i
                    cnt = np.int64(buf[v + 1]) | (np.int64(buf[v + 2]) << 8) | (np.int64(buf[v + 3]) << 16) \
                        | (np.int64(buf[v + 4]) << 24)
                    size = 5 + cnt * esz
                else:
                    return TAG_UNKNOWN_TYPE, used, i
            if v + size > end:
                return TAG_OVERRUN, used, i
            keys[i, s] = (np.int64(buf[p]) << 16) | (np.int64(buf[p + 1]) << 8) | t
            offs[i, s] = v
            sizes[i, s] = size
            s += 1
            p = v + size
        for r in range(s, nslots):
            keys[i, r] = -1
            offs[i, r] = 0
            sizes[i, r] = 0
        if s > used:
            used = s
    return TAG_OK, used, -1


_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)


@njit(cache=True, nogil=True, inline="always")
def _mix(h, v):
    h = (h ^ np.uint64(v)) * _M1
    return h ^ (h >> np.uint64(29))


@njit(cache=True, nogil=True)
def _key_hash(name_hash, a, b, c, d, e):
    h = name_hash
    h = _mix(h, a)
    h = _mix(h, b)
    h = _mix(h, c)
    h = _mix(h, d)
    h = _mix(h, e)
    return h


@njit(cache=True, nogil=True)
def find_mates_kernel(refid, pos, nref, npos, tlen, names, l_name, max_distance, link):
    """For each record, the distance back to the nearest earlier record j whose
    (name, RNAME, POS, RNEXT, PNEXT, -TLEN) equals this record's (name, RNEXT, PNEXT, RNAME,
    POS, TLEN) — its mate, as the aligner wrote both — within ``max_distance``; 0 if none.
    A record whose target is itself linked is not linked (one-pass decoding)."""
    n = pos.shape[0]
    starts = np.empty(n, np.int64)
    nh = np.empty(n, np.uint64)
    o = 0
    for i in range(n):
        starts[i] = o
        h = _M2
        for k in range(l_name[i]):
            h = (h ^ np.uint64(names[o + k])) * _M1
        nh[i] = h ^ (h >> np.uint64(31))
        o += l_name[i]
    size = 1
    while size < 2 * n + 2:
        size *= 2
    mask = np.uint64(size - 1)
    tkey = np.zeros(size, np.uint64)
    tval = np.full(size, -1, np.int64)
    for i in range(n):
        link[i] = 0
        # look up this record's reverse key among earlier records' forward keys
        rk = _key_hash(nh[i], nref[i], npos[i], refid[i], pos[i], tlen[i])
        s = rk & mask
        j = -1
        while tval[s] >= 0:
            if tkey[s] == rk:
                j = tval[s]
                break
            s = (s + np.uint64(1)) & mask
        if j >= 0 and i - j <= max_distance and nref[i] == refid[j] and npos[i] == pos[j] \
                and nref[j] == refid[i] and npos[j] == pos[i] and tlen[i] == -tlen[j] and l_name[i] == l_name[j]:
            same = True
            a = starts[i]
            b = starts[j]
            for k in range(l_name[i]):
                if names[a + k] != names[b + k]:
                    same = False
                    break
            if same:
                link[i] = i - j
        # insert this record's forward key (the latest record wins)
        fk = _key_hash(nh[i], refid[i], pos[i], nref[i], npos[i], -tlen[i])
        s = fk & mask
        while tval[s] >= 0 and tkey[s] != fk:
            s = (s + np.uint64(1)) & mask
        tkey[s] = fk
        tval[s] = i
    # a linked record must not be a target: judged on the links as found
    drop = np.zeros(n, np.bool_)
    for i in range(n):
        if link[i] != 0 and link[i - link[i]] != 0:
            drop[i] = True
    for i in range(n):
        if drop[i]:
            link[i] = 0


@njit(cache=True, nogil=True)
def tag_column_order(keys, colkeys):
    """The distinct keys in column order: slot by slot, each slot's new keys ascending.
    Writes them to ``colkeys`` and returns how many there are."""
    n = keys.shape[0]
    nc = 0
    for s in range(keys.shape[1]):
        first = nc
        for i in range(n):
            k = keys[i, s]
            if k < 0:
                continue
            known = False
            for c in range(nc):
                if colkeys[c] == k:
                    known = True
                    break
            if not known:
                colkeys[nc] = k
                nc += 1
        colkeys[first:nc].sort()
    return nc


@njit(cache=True, nogil=True)
def tag_columns_kernel(buf, keys, offs, sizes, colkeys, widths, out, out_start):
    """Write every tag value into its column: column c (key ``colkeys[c]``) occupies
    ``out[out_start[c]:out_start[c+1]]`` (``out_start`` is filled here), values in record
    order; fixed-width columns (``widths[c]`` > 1) byte-shuffled (byte 0 of every value,
    then byte 1, ...). ``out`` must hold the sum of all ``sizes``."""
    nc = colkeys.shape[0]
    count = np.zeros(nc, np.int64)
    nbytes = np.zeros(nc, np.int64)
    n = keys.shape[0]
    slots = keys.shape[1]
    for i in range(n):
        for s in range(slots):
            k = keys[i, s]
            if k < 0:
                break
            c = 0
            while colkeys[c] != k:
                c += 1
            count[c] += 1
            nbytes[c] += sizes[i, s]
    out_start[0] = 0
    for c in range(nc):
        out_start[c + 1] = out_start[c] + nbytes[c]
    cur = np.zeros(nc, np.int64)  # values written (shuffled) or bytes written (plain)
    for i in range(n):
        for s in range(slots):
            k = keys[i, s]
            if k < 0:
                break
            c = 0
            while colkeys[c] != k:
                c += 1
            a = offs[i, s]
            m = sizes[i, s]
            w = widths[c]
            base = out_start[c]
            if w > 1:
                v = cur[c]
                for b in range(w):
                    out[base + b * count[c] + v] = buf[a + b]
                cur[c] = v + 1
            else:
                p = base + cur[c]
                for j in range(m):
                    out[p + j] = buf[a + j]
                cur[c] += m


@njit(cache=True, nogil=True)
def split_name_fields(names, l_name, max_colons, fstart, flen):
    """Split NUL-terminated names at ':' into ``fstart``/``flen`` (n x (max_colons+1)).
    Returns the number of colons, the same in every name, or -1 if they differ / exceed."""
    n = l_name.shape[0]
    o = 0
    k_all = -1
    for i in range(n):
        stop = o + l_name[i] - 1  # the NUL
        f = 0
        fs = o
        for j in range(o, stop):
            if names[j] == 58:  # ':'
                if f >= max_colons:
                    return -1
                fstart[i, f] = fs
                flen[i, f] = j - fs
                f += 1
                fs = j + 1
        fstart[i, f] = fs
        flen[i, f] = stop - fs
        if k_all < 0:
            k_all = f
        elif f != k_all:
            return -1
        o += l_name[i]
    return k_all


@njit(cache=True, nogil=True)
def name_field_kernel(names, fstart, flen, f, ints, strs):
    """Field ``f`` of every name: if every value is 1-9 decimal digits without a leading
    zero, its integers go to ``ints`` and 1 is returned; otherwise the NUL-terminated
    values go to ``strs`` and (0, their byte count) is returned."""
    n = fstart.shape[0]
    numeric = True
    for i in range(n):
        m = flen[i, f]
        a = fstart[i, f]
        if m <= 0 or m > 9 or (m > 1 and names[a] == 48):
            numeric = False
            break
        v = 0
        for j in range(m):
            d = np.int64(names[a + j]) - 48
            if d < 0 or d > 9:
                numeric = False
                break
            v = v * 10 + d
        if not numeric:
            break
        ints[i] = v
    if numeric:
        return 1, 4 * n
    p = 0
    for i in range(n):
        a = fstart[i, f]
        for j in range(flen[i, f]):
            strs[p] = names[a + j]
            p += 1
        strs[p] = 0
        p += 1
    return 0, p


@njit(cache=True, nogil=True)
def flagstat_kernel(flag, mapq, refid, next_refid, out):
    """Add one batch's `samtools flagstat` counts to ``out[2, 16]`` (row 0 QC-passed, row 1
    QC-failed; columns in :data:`bams3core.stats.FLAGSTAT_FIELDS` order; bam_stat.c rules).
    Flag bits: 0x1 paired, 0x2 proper, 0x4 unmapped, 0x8 mate unmapped, 0x40 read1,
    0x80 read2, 0x100 secondary, 0x200 QC fail, 0x400 duplicate, 0x800 supplementary."""
    for i in range(flag.shape[0]):
        f = np.int64(flag[i])
        row = 1 if f & 0x200 else 0
        mapped = (f & 0x4) == 0
        mmapped = (f & 0x8) == 0
        sec = (f & 0x100) != 0
        sup = (not sec) and (f & 0x800) != 0
        prim = (not sec) and (not sup)
        paired = prim and (f & 0x1) != 0
        dup = (f & 0x400) != 0
        both = paired and mapped and mmapped
        diff = both and next_refid[i] != refid[i]
        out[row, 0] += 1
        out[row, 1] += prim
        out[row, 2] += sec
        out[row, 3] += sup
        out[row, 4] += dup
        out[row, 5] += prim and dup
        out[row, 6] += mapped
        out[row, 7] += prim and mapped
        out[row, 8] += paired
        out[row, 9] += paired and (f & 0x40) != 0
        out[row, 10] += paired and (f & 0x80) != 0
        out[row, 11] += paired and (f & 0x2) != 0 and mapped
        out[row, 12] += both
        out[row, 13] += paired and (not mmapped) and mapped
        out[row, 14] += diff
        out[row, 15] += diff and mapq[i] >= 5


# -- derived tags (tags method 2): MD predicted from the block's consensus (NM and MC: bams3core.tags) --
_MD_BASES = np.frombuffer(b"=ACMGRSVTWYHKDBN", dtype=np.uint8)


@njit(cache=True, nogil=True)
def _put_int(out, p, v, digits):
    nd = 0
    while True:
        digits[nd] = 48 + v % 10
        nd += 1
        v //= 10
        if v == 0:
            break
    for d in range(nd):
        if out.shape[0]:
            out[p] = digits[nd - 1 - d]
        p += 1
    return p


@njit(cache=True, nogil=True)
def md_predict_kernel(nib, nib_start, l_seq, pos, cigar, cig_start, n_cig, cons, lo, chars, out, out_start, ok,
                      digits):
    """The MD text (NUL-terminated) each record would have against the block consensus
    ``cons`` (positions ``lo + k``; 255 = none) as the reference: aligned bases (M = X) that
    differ from it are mismatches, D bases are deleted reference bases; ok[k] = 0 where a
    needed consensus base is missing. ``out`` of length 0: only the sizes (out_start).
    ``digits``: scratch, 24 bytes."""
    span = cons.shape[0]
    p = np.int64(0)  # int64 variables, not literals: one signature of _put_int
    for k in range(nib_start.shape[0]):
        out_start[k] = p
        ok[k] = 1
        u = np.int64(0)
        q = 0
        r = pos[k]
        L = l_seq[k]
        for j in range(cig_start[k], cig_start[k] + n_cig[k]):
            ln = np.int64(cigar[j] >> 4)
            op = cigar[j] & 0xF
            if op == 0 or op == 7 or op == 8:
                for t in range(ln):
                    if r < lo or r >= lo + span or cons[r - lo] == 255 or q >= L:
                        ok[k] = 0
                        break
                    c = cons[r - lo]
                    b = nib[nib_start[k] + q]
                    if b == c:
                        u += 1
                    else:
                        p = _put_int(out, p, u, digits)
                        if out.shape[0]:
                            out[p] = chars[c]
                        p += 1
                        u = np.int64(0)
                    q += 1
                    r += 1
            elif op == 1 or op == 4:
                q += ln
            elif op == 2:
                p = _put_int(out, p, u, digits)
                if out.shape[0]:
                    out[p] = 94
                p += 1
                for t in range(ln):
                    if r < lo or r >= lo + span or cons[r - lo] == 255:
                        ok[k] = 0
                        break
                    if out.shape[0]:
                        out[p] = chars[cons[r - lo]]
                    p += 1
                    r += 1
                u = np.int64(0)
            elif op == 3:
                r += ln
            if ok[k] == 0:
                break
        p = _put_int(out, p, u, digits)
        if out.shape[0]:
            out[p] = 0
        p += 1
    out_start[nib_start.shape[0]] = p
    return p
