"""The vectorised (numpy) helpers of derived tags and the block span, against plain Python
walks of the same rules (they replaced numba kernels; the corpus tests cover them end to end)."""

from __future__ import annotations

import numpy as np

from bams3core.seqcodec import _span
from bams3core.tags import _cigar_texts, _nm_from_md

OPS = "MIDNSHP=X"


def _cigar_ref(words) -> bytes:
    if not len(words):
        return b"*\0"
    return "".join(f"{int(w) >> 4}{OPS[int(w) & 0xF] if int(w) & 0xF < 9 else '?'}" for w in words).encode() + b"\0"


def _nm_ref(md: bytes, words) -> int:
    n, in_del = 0, False
    for c in md:
        if 48 <= c <= 57:
            in_del = False
        elif c == 94:
            in_del = True
        elif 65 <= c <= 90 or 97 <= c <= 122:
            n += not in_del
        else:
            return -1
    return n + sum(int(w) >> 4 for w in words if int(w) & 0xF in (1, 2))


def _span_ref(l_seq, pos, words_per_rec):
    lo, hi = 1 << 62, -(1 << 62)
    for L, r, words in zip(l_seq, pos, words_per_rec):
        q, r = 0, int(r)
        for w in words:
            ln, op = int(w) >> 4, int(w) & 0xF
            if op in (0, 7, 8):
                take = ln if q + ln <= L else L - q
                if take > 0:
                    lo, hi = min(lo, r), max(hi, r + take)
                    q += take
                    r += take
            elif op in (1, 4):
                q += ln
            elif op in (2, 3):
                r += ln
            if q >= L:
                break
    return lo, hi


def _random_block(rng):
    n = int(rng.integers(0, 12))
    nc = rng.integers(0, 5, n).astype(np.int64)
    m = int(nc.sum())
    ops = rng.integers(0, 16, m).astype(np.uint32)
    lens = np.where(rng.random(m) < 0.1, rng.integers(0, 1 << 28, m), rng.integers(0, 60, m)).astype(np.uint32)
    cigar = (lens << 4) | ops
    starts = (np.cumsum(nc) - nc).astype(np.int64)
    return n, nc, cigar, starts


def test_cigar_texts_and_nm_and_span_match_the_plain_walks():
    rng = np.random.default_rng(14)
    alphabet = b"0123456789^ACGTNacgt*Z"
    for _ in range(400):
        n, nc, cigar, starts = _random_block(rng)
        words = [cigar[s:s + k] for s, k in zip(starts, nc)]
        recs = rng.integers(0, max(n, 1), int(rng.integers(0, 8))) if n else np.zeros(0, np.int64)
        txt, st = _cigar_texts(cigar, starts, nc, recs)
        assert [txt[st[i]:st[i + 1]].tobytes() for i in range(len(recs))] == [_cigar_ref(words[r]) for r in recs]
        mds = [bytes(rng.choice(list(alphabet), int(rng.integers(0, 9)))) for _ in range(n)]
        buf = np.frombuffer(b"".join(s + b"\0" for s in mds), np.uint8)
        ml = np.array([len(s) for s in mds], np.int64)
        ms = np.cumsum(ml + 1) - ml - 1
        order = rng.permutation(n)
        got = _nm_from_md(buf, ms[order], ml[order], cigar, starts[order], nc[order])
        assert got.tolist() == [_nm_ref(mds[k], words[k]) for k in order]
        l_seq = rng.integers(0, 90, n).astype(np.int64)
        pos = rng.integers(0, 5000, n).astype(np.int64)
        assert _span(l_seq, pos, cigar, nc) == _span_ref(l_seq, pos, words)
