"""Deterministic simulator of a reference genome and Illumina-like paired-end reads.

Used by the README demo, the tests and the benchmark.  Everything is driven by a
seeded numpy RNG, so the same arguments always give the same bytes.

* :func:`make_reference` -- random genome (GC varies in blocks) with segmental
  copies (some reverse-complemented, 0-2% diverged), low-complexity runs
  (homopolymers, STRs; soft-masked lower case in the FASTA) and internal N gaps.
  Writes FASTA + ``.fai`` and a ``.repeats.tsv`` sidecar listing the copies.
* :func:`simulate_pairs` -- paired-end reads: insert ~N(350, 50), substitution
  errors rising along the read (0.1-1%, more in Q2 tails), N calls, small
  indels, soft clips, ~3% spliced pairs (``N`` op), long deletions, chimeras
  (-> supplementary records), mate-unmapped and fully unmapped pairs,
  duplicates, QC-fail pairs, multi-mappers (-> secondary records).  Qualities
  come from a per-read AR(1)/Markov model, Illumina-binned
  (2/12/23/32/37/41) or full resolution (2..41).
* :func:`write_fastq` -- R1/R2 FASTQ (plain or gzip) for a real aligner.
* :func:`write_truth_bam` -- the true alignments as a coordinate-sorted,
  indexed BAM with realistic flags, mate fields, TLEN, MAPQ, CIGARs and tags
  (NM MD MC AS XS RG SA), without running an aligner.
* :func:`make_sample` -- small reference + truth BAM for the README demo.

Command line::

    python -m bams3.sample OUTDIR [--pairs N] [--seed S] [--fastq]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pysam

__all__ = [
    "Reference",
    "Pairs",
    "make_reference",
    "load_reference",
    "simulate_pairs",
    "write_fastq",
    "write_truth_bam",
    "make_sample",
    "main",
]

_ACGT = np.frombuffer(b"ACGT", dtype=np.uint8)
_COMP = np.arange(256, dtype=np.uint8)
for _a, _b in zip(b"ACGTNacgtnRYKMSWBDHV", b"TGCANtgcanYRMKSWVHDB"):
    _COMP[_a] = _b
_IDX = np.full(256, 255, dtype=np.uint8)  # base -> 0..3 (255 = not ACGT)
for _i, _c in enumerate(b"ACGT"):
    _IDX[_c] = _i
_BINS = np.array([2, 12, 23, 32, 37, 41], dtype=np.uint8)
_BIN_EDGES = np.array([7.0, 17.5, 27.5, 34.0, 39.5])  # midpoints-ish between bins
# 256 equiprobable normal quantiles (cheap N(0,1) noise via a byte lookup)
_NORM256 = np.array(
    [__import__("statistics").NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], dtype=np.float32
)

PG_ID = "bams3.sample"
PG_VN = "0.1.0"


def _revcomp(a: np.ndarray) -> np.ndarray:
    return _COMP[a[::-1]]


# --------------------------------------------------------------------------- reference


@dataclass
class Reference:
    """An in-memory genome: all contigs concatenated (upper case) in ``seq``."""

    names: list[str]
    lengths: np.ndarray  # int64
    offsets: np.ndarray  # int64, start of each contig in ``seq``
    seq: np.ndarray  # uint8 ASCII, upper case
    path: str | None = None
    # segmental copies, global coords: columns src, dst, length, revcomp(0/1)
    repeats: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.int64))

    @property
    def total(self) -> int:
        return int(self.seq.size)

    def tid_of(self, gpos: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, gpos, side="right") - 1

    def fetch(self, tid: int, start: int, end: int) -> bytes:
        o = int(self.offsets[tid])
        return self.seq[o + start : o + end].tobytes()

    def md5(self, tid: int) -> str:
        o = int(self.offsets[tid])
        return hashlib.md5(self.seq[o : o + int(self.lengths[tid])].tobytes()).hexdigest()


def _insert_lowcomp(rng: np.random.Generator, seq: np.ndarray, mask: np.ndarray, lo: int, hi: int, frac: float) -> None:
    n = hi - lo
    k = int(n * frac / 60)
    if n < 500 or k == 0:
        return
    kinds = rng.integers(0, 4, k)
    starts = rng.integers(lo, hi - 400, k)
    lens = rng.integers(12, 200, k)
    units = rng.integers(0, 4, (k, 6))
    for kind, s, ln, u in zip(kinds.tolist(), starts.tolist(), lens.tolist(), units):
        if kind == 0:  # homopolymer
            ln = min(ln, 40)
            run = np.full(ln, _ACGT[u[0]], dtype=np.uint8)
        else:  # di-, tri-, tetra-nucleotide STR
            unit = _ACGT[u[: kind + 1]]
            run = np.resize(unit, ln)
        seq[s : s + ln] = run
        mask[s : s + ln] = True


def make_reference(
    path_fa: str | os.PathLike,
    contigs: list[tuple[str, int]] | None = None,
    seed: int = 0,
    *,
    repeat_frac: float = 0.06,
    lowcomp_frac: float = 0.02,
    soft_mask: bool = True,
    n_gaps: bool = True,
) -> Reference:
    """Write a random genome as FASTA (60 columns) + ``.fai`` + ``.repeats.tsv``.

    Repeats: low-complexity runs (homopolymers, 2-4 bp STRs; soft-masked
    lower case in the FASTA if ``soft_mask``) and non-overlapping segmental
    copies (300-5000 bp, 0-2% diverged, half reverse complemented) covering
    ~``repeat_frac`` of the genome twice (source + copy).  Contigs of >= 50 kb
    get one internal N gap of 100-2000 bp.  Returns the
    :class:`Reference` (upper case in memory).
    """
    if contigs is None:
        contigs = [("chr1", 400_000), ("chr2", 250_000), ("chr3", 120_000), ("chrM", 16_569)]
    rng = np.random.default_rng(seed)
    names = [c for c, _ in contigs]
    lengths = np.array([int(n) for _, n in contigs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    total = int(lengths.sum())

    # base composition: GC varies in 10 kb blocks
    nblk = total // 10_000 + 1
    gc = np.repeat(rng.uniform(0.33, 0.62, nblk), 10_000)[:total]
    r = rng.random(total)
    strong = r < gc
    which = rng.random(total) < 0.5
    seq = np.where(strong, np.where(which, ord("G"), ord("C")), np.where(which, ord("A"), ord("T"))).astype(np.uint8)
    mask = np.zeros(total, dtype=bool)

    # low-complexity runs and one internal N gap per large contig
    for t in range(len(contigs)):
        lo, hi = int(offsets[t]), int(offsets[t] + lengths[t])
        _insert_lowcomp(rng, seq, mask, lo, hi, lowcomp_frac)
        if n_gaps and lengths[t] >= 50_000:
            gl = int(rng.integers(100, 2000))
            gs = int(lo + rng.integers(lengths[t] // 4, lengths[t] // 2))
            seq[gs : gs + gl] = ord("N")
            mask[gs : gs + gl] = False

    # segmental copies (any contig to any contig); sources and copies never overlap
    # each other or an N gap, so every listed pair really is 0-2% diverged
    reps = []
    used = seq == ord("N")
    if repeat_frac > 0:
        k = int(total * repeat_frac / 2600)
        for _ in range(20 * k):
            if len(reps) >= k:
                break
            ln = int(rng.integers(300, 5000))
            okc = np.nonzero(lengths > ln * 2 + 10)[0]
            if okc.size == 0:
                break
            ts, td = rng.choice(okc), rng.choice(okc)
            src = int(offsets[ts] + rng.integers(0, lengths[ts] - ln))
            dst = int(offsets[td] + rng.integers(0, lengths[td] - ln))
            if abs(src - dst) < ln or used[src : src + ln].any() or used[dst : dst + ln].any():
                continue
            used[src : src + ln] = True
            used[dst : dst + ln] = True
            seg = seq[src : src + ln].copy()
            mseg = mask[src : src + ln].copy()
            rc = int(rng.random() < 0.5)
            if rc:
                seg, mseg = _revcomp(seg), mseg[::-1]
            div = rng.uniform(0, 0.02)
            mm = np.nonzero(rng.random(ln) < div)[0]
            seg[mm] = _ACGT[(_IDX[seg[mm]] + rng.integers(1, 4, mm.size)) % 4]
            seq[dst : dst + ln] = seg
            mask[dst : dst + ln] = mseg
            reps.append((src, dst, ln, rc))

    out = seq.copy()
    if soft_mask:
        out[mask] += 32  # lower case
    path_fa = str(path_fa)
    Path(path_fa).parent.mkdir(parents=True, exist_ok=True)
    with open(path_fa, "wb") as fh:
        for t, name in enumerate(names):
            fh.write(b">" + name.encode() + b"\n")
            s = out[offsets[t] : offsets[t] + lengths[t]].tobytes()
            fh.write(b"\n".join(s[i : i + 60] for i in range(0, len(s), 60)))
            fh.write(b"\n")
    for ext in (".fai",):
        if os.path.exists(path_fa + ext):
            os.remove(path_fa + ext)
    pysam.faidx(path_fa)
    rep = np.array(reps, dtype=np.int64).reshape(-1, 4)
    with open(path_fa + ".repeats.tsv", "w") as fh:
        fh.write("#src_global\tdst_global\tlength\trevcomp\n")
        for row in rep.tolist():
            fh.write("\t".join(map(str, row)) + "\n")
    return Reference(names, lengths, offsets, seq, path_fa, rep)


def load_reference(path_fa: str | os.PathLike) -> Reference:
    """Read a FASTA (upper-cased in memory) and its ``.repeats.tsv`` sidecar if present."""
    path_fa = str(path_fa)
    names, chunks = [], []
    with open(path_fa, "rb") as fh:
        data = fh.read()
    for rec in data.split(b">")[1:]:
        head, _, body = rec.partition(b"\n")
        names.append(head.split()[0].decode())
        chunks.append(body.replace(b"\n", b"").replace(b"\r", b"").upper())
    lengths = np.array([len(c) for c in chunks], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    seq = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    rep = np.zeros((0, 4), dtype=np.int64)
    if os.path.exists(path_fa + ".repeats.tsv"):
        rep = np.loadtxt(path_fa + ".repeats.tsv", dtype=np.int64, comments="#", ndmin=2).reshape(-1, 4)
    return Reference(names, lengths, offsets, seq, path_fa, rep)


def _as_reference(ref) -> Reference:
    return ref if isinstance(ref, Reference) else load_reference(ref)


# --------------------------------------------------------------------------- reads


@dataclass
class Pairs:
    """Simulated read pairs.  Per-read arrays have shape (n, 2) ([:, 0] = read 1).

    Sequences/qualities are stored as the BAM record would hold them (reference
    orientation: reverse-complemented if ``rev``).  ``qual`` is raw phred.
    """

    ref: Reference
    read_len: int
    seed: int
    params: dict
    lane: np.ndarray  # (n,) 1/2 ; read group index = lane - 1
    tile: np.ndarray
    x: np.ndarray
    y: np.ndarray
    category: np.ndarray  # (n,) 0 normal, 1 one mate unmapped, 2 both unmapped (unplaced)
    mapped: np.ndarray  # (n,2) bool
    tid: np.ndarray  # (n,2) int32, -1 unplaced
    pos: np.ndarray  # (n,2) int64 0-based leftmost aligned position (mate's for placed unmapped)
    rev: np.ndarray  # (n,2) bool
    plain: np.ndarray  # (n,2) bool: mapped with CIGAR "<L>M"
    ops: dict  # flat read index (2*i+r) -> list[(op, len)] for non-plain mapped reads
    seq: np.ndarray  # (n,2,L) uint8 ASCII
    qual: np.ndarray  # (n,2,L) uint8 phred
    mapq: np.ndarray  # (n,2) uint8
    xs_frac: np.ndarray  # (n,2) float32, XS = round(xs_frac * AS)
    chim_len: np.ndarray  # (n,2) int32, bases of the 3' end aligned elsewhere (0 = none)
    chim_tid: np.ndarray
    chim_pos: np.ndarray
    chim_rev: np.ndarray
    chim_mapq: np.ndarray
    sec: np.ndarray  # (n,2) bool: emit a secondary record
    sec_tid: np.ndarray
    sec_pos: np.ndarray
    sec_rev: np.ndarray
    sec_nostar: np.ndarray  # (n,2) bool: secondary keeps SEQ/QUAL (else '*')
    dup: np.ndarray  # (n,) bool
    qcfail: np.ndarray  # (n,) bool

    @property
    def n(self) -> int:
        return int(self.category.size)

    def name(self, i: int) -> str:
        return f"SIM:1:FCX123:{self.lane[i]}:{self.tile[i]}:{self.x[i]}:{self.y[i]}"

    def names(self, lo: int = 0, hi: int | None = None) -> list[str]:
        hi = self.n if hi is None else hi
        return [
            f"SIM:1:FCX123:{a}:{b}:{c}:{d}"
            for a, b, c, d in zip(
                self.lane[lo:hi].tolist(), self.tile[lo:hi].tolist(), self.x[lo:hi].tolist(), self.y[lo:hi].tolist()
            )
        ]

    def cigar(self, k: int) -> str:
        """CIGAR of flat read ``k`` (= 2*pair + read)."""
        i, r = divmod(k, 2)
        if not self.mapped[i, r]:
            return "*"
        if self.plain[i, r]:
            return f"{self.read_len}M"
        return "".join(f"{n}{op}" for op, n in self.ops[k])


def _illumina_names(rng, n, lane):
    """Unique (tile, x, y) per pair; y increases within a tile like a real run."""
    tiles_all = np.array([s * 1000 + sw * 100 + t for s in (1, 2) for sw in (1, 2) for t in range(1, 13)])
    tile = np.empty(n, dtype=np.int64)
    y = np.empty(n, dtype=np.int64)
    for ln in (1, 2):
        idx = np.nonzero(lane == ln)[0]
        m = idx.size
        if m == 0:
            continue
        per_tile = max(1, -(-m // tiles_all.size))
        t_i = np.arange(m) // per_tile
        inc = rng.integers(1, 40, m)
        cs = np.cumsum(inc)
        first = np.r_[0, np.nonzero(np.diff(t_i))[0] + 1]
        base = np.repeat(cs[first] - inc[first], np.diff(np.r_[first, m]))
        tile[idx] = tiles_all[t_i % tiles_all.size] + (t_i // tiles_all.size) * 10_000
        y[idx] = 1000 + cs - base
    x = rng.integers(1000, 32000, n)
    return tile, x, y


def _qual_lut(mode: str) -> np.ndarray:
    """Map floor(4*q) (0..255) to an output phred value."""
    q = np.arange(256, dtype=np.float64) / 4 + 0.125
    if mode == "binned":
        return _BINS[np.digitize(q, _BIN_EDGES)]
    return np.clip(np.rint(q), 2, 41).astype(np.uint8)


def _quals_errors(rng, r2: np.ndarray, junk: np.ndarray, L: int, mode: str):
    """Phred qualities and substitution / N masks, (L, R) layout, in sequencing order.

    Works internally in (L, R) layout so the per-cycle AR(1) recursion runs on
    contiguous rows.
    """
    R = r2.size
    c = np.arange(L, dtype=np.float32)[:, None]
    frac = c / max(L - 1, 1)
    r2f = r2.astype(np.float32)[None, :]
    junk = junk[None, :]
    # Q2 ('#') tails
    has_tail = rng.random(R) < np.where(r2, 0.05, 0.025) + 0.3 * junk[0]
    t0 = np.where(has_tail, rng.integers(L // 2, L, R), L)[None, :]
    in_tail = c >= t0
    # substitution errors: 0.1% -> ~1% along the read, per-read factor, 20% in tails
    fac = rng.lognormal(0.0, 0.5, R).astype(np.float32)[None, :] * (1.0 + 0.4 * r2f)
    p = (0.001 + 0.008 * frac**2) * fac
    p[in_tail] = 0.2
    p *= 65536
    # one uniform 16-bit draw decides substitution (low end), N call (high end)
    # and quality dips (just above p); raw bytes are much cheaper than rng.random
    u = np.frombuffer(rng.bytes(L * R * 2), dtype=np.uint16).reshape(L, R)
    err = u < p
    nmask = u >= np.where(in_tail, np.uint16(64225), np.uint16(65523))  # 2% / 0.02%
    # quality: per-read level + decline + AR(1) wander (noise from a 256-quantile normal table)
    s0 = rng.normal(37.2, 0.9, R).astype(np.float32)[None, :] - 1.3 * r2f - 8.0 * junk
    d = rng.uniform(1.0, 5.0, R).astype(np.float32)[None, :] + 2.5 * r2f
    rho = np.float32(0.8)
    sig = np.float32(1.1 if mode == "binned" else 1.4)
    e = (_NORM256 * sig)[np.frombuffer(rng.bytes(L * R), dtype=np.uint8).reshape(L, R)]
    e[0] *= 1 / np.sqrt(1 - rho * rho)
    for j in range(1, L):
        e[j] += rho * e[j - 1]
    q = e
    q += s0
    q -= d * frac**1.6 + 2.5 * np.exp(-c / 1.5)
    if mode != "binned":  # base-to-base jitter
        q += (_NORM256 * np.float32(1.5))[np.frombuffer(rng.bytes(L * R), dtype=np.uint8).reshape(L, R)]
    dips = (u >= p) & (u < p + np.float32(0.003 * 65536))
    q[dips] -= rng.uniform(8, 22, int(dips.sum())).astype(np.float32)
    edip = err & (u < p * np.float32(0.65))  # 65% of errors get a low quality
    q[edip] = rng.uniform(4, 25, int(edip.sum())).astype(np.float32)
    q *= 4
    np.clip(q, 0, 255, out=q)
    qq = _qual_lut(mode)[q.astype(np.uint8)]
    qq[in_tail] = 2
    qq[nmask] = 2
    return qq, err & ~nmask, nmask


def _partition(rnd: random.Random, total: int, parts: int, minimum: int) -> list[int]:
    rem = total - minimum * parts
    cuts = sorted(rnd.randint(0, rem) for _ in range(parts - 1))
    b = [0] + cuts + [rem]
    return [minimum + b[i + 1] - b[i] for i in range(parts)]


def _make_ops(rnd: random.Random, L, lc, rc, ins, dl, ldel, intron) -> list[tuple[str, int]]:
    events = []
    if ins:
        events.append(("I", ins))
    if dl:
        events.append(("D", dl))
    if ldel:
        events.append(("D", ldel))
    if intron:
        events.append(("N", intron))
    rnd.shuffle(events)
    m_total = L - lc - rc - ins
    runs = _partition(rnd, m_total, len(events) + 1, 8)
    ops = [("S", lc)] if lc else []
    for j, ev in enumerate(events):
        ops.append(("M", runs[j]))
        ops.append(ev)
    ops.append(("M", runs[-1]))
    if rc:
        ops.append(("S", rc))
    return ops


def simulate_pairs(
    ref,
    n_pairs: int,
    seed: int = 0,
    read_len: int = 150,
    *,
    insert_mean: float = 350.0,
    insert_sd: float = 50.0,
    qual_mode: str = "binned",
    clip_frac: float = 0.06,
    indel_frac: float = 0.04,
    splice_frac: float = 0.03,
    long_del_frac: float = 0.005,
    chimera_frac: float = 0.01,
    secondary_frac: float = 0.01,
    mate_unmapped_frac: float = 0.01,
    unplaced_frac: float = 0.003,
    dup_frac: float = 0.01,
    qcfail_frac: float = 0.003,
    chunk: int = 8192,
) -> Pairs:
    """Simulate ``n_pairs`` Illumina-like read pairs from ``ref`` (a :class:`Reference` or FASTA path).

    ``qual_mode``: ``"binned"`` (values 2, 12, 23, 32, 37, 41) or ``"full"`` (any 2..41).
    Fractions are per pair (splice, mate_unmapped, unplaced, dup, qcfail) or per
    mapped read (clip, indel, long_del, chimera, secondary).
    """
    if qual_mode not in ("binned", "full"):
        raise ValueError("qual_mode must be 'binned' or 'full'")
    ref = _as_reference(ref)
    L = int(read_len)
    n = int(n_pairs)
    rng = np.random.default_rng(seed)
    rnd = random.Random(int(rng.integers(2**62)))
    params = dict(
        n_pairs=n, seed=seed, read_len=L, insert_mean=insert_mean, insert_sd=insert_sd, qual_mode=qual_mode
    )

    # ---- pair-level categories
    u = rng.random(n)
    category = np.zeros(n, dtype=np.int8)
    category[u < mate_unmapped_frac + unplaced_frac] = 1
    category[u < unplaced_frac] = 2
    normal = category == 0
    lane = rng.integers(1, 3, n).astype(np.int8)
    tile, x, y = _illumina_names(rng, n, lane)
    mapped = np.ones((n, 2), dtype=bool)
    which_unm = rng.integers(0, 2, n)
    mapped[category == 1, which_unm[category == 1]] = False
    mapped[category == 2] = False

    # ---- orientation: o=0 -> read1 forward (leftmost), read2 reverse
    o = rng.integers(0, 2, n).astype(bool)
    rev = np.stack([o, ~o], axis=1)

    # ---- read features (only for mapped reads of normal pairs)
    feat_ok = mapped & normal[:, None]
    R = (n, 2)
    chim = feat_ok & (rng.random(R) < chimera_frac)
    chim_len = np.where(chim, rng.integers(25, max(26, L // 2), R), 0).astype(np.int32)
    clip = feat_ok & ~chim & (rng.random(R) < clip_frac)
    clen = np.minimum(5 + rng.geometric(0.08, R), 40)
    three = rng.random(R) < 0.7  # clip on the 3' end (left in reference orientation if reverse)
    right = three ^ rev
    rclip = np.where(clip & right, clen, 0)
    lclip = np.where(clip & ~right, clen, 0)
    # 3' chimeric part: right clip if forward, left clip if reverse
    rclip = np.where(chim & ~rev, chim_len, rclip)
    lclip = np.where(chim & rev, chim_len, lclip)
    indel = feat_ok & (rng.random(R) < indel_frac)
    is_ins = rng.random(R) < 0.45
    ilen = np.minimum(rng.geometric(0.5, R), 8)
    ins = np.where(indel & is_ins, ilen, 0)
    dl = np.where(indel & ~is_ins, ilen, 0)
    ldel = np.where(feat_ok & (rng.random(R) < long_del_frac), rng.integers(50, 501, R), 0)
    spl_pair = normal & (rng.random(n) < splice_frac)
    spl_which = rng.integers(0, 3, n)  # 0: read1, 1: read2, 2: both
    spl = np.zeros(R, dtype=bool)
    spl[:, 0] = spl_pair & (spl_which != 1)
    spl[:, 1] = spl_pair & (spl_which != 0)
    intron = np.where(spl, np.exp(rng.uniform(np.log(100), np.log(5000), R)).astype(np.int64), 0)
    plain = mapped & ~((lclip + rclip + ins + dl + ldel + intron) > 0)

    frag = np.maximum(np.rint(rng.normal(insert_mean, insert_sd, n)).astype(np.int64), L)

    # ---- duplicates: copy the fragment + read structure of an earlier normal pair
    nidx = np.nonzero(normal)[0]
    dup = np.zeros(n, dtype=bool)
    src_of = np.full(n, -1, dtype=np.int64)
    if nidx.size > 10 and dup_frac > 0:
        cand = nidx[1:]
        dsel = cand[rng.random(cand.size) < dup_frac]
        pos_in = np.searchsorted(nidx, dsel)
        src = nidx[(rng.random(dsel.size) * pos_in).astype(np.int64)]
        # chains resolve to a non-duplicate source
        dup[dsel] = True
        keep = ~dup[src]
        dsel, src = dsel[keep], src[keep]
        dup[:] = False
        dup[dsel] = True
        src_of[dsel] = src
        for a in (o, frag, rev, chim, chim_len, lclip, rclip, ins, dl, ldel, intron, plain):
            a[dsel] = a[src]

    span = (L - lclip - rclip - ins + dl + ldel + intron).astype(np.int64)  # reference span when mapped

    # ---- fragment placement (rejection sampling: inside a contig, no N)
    ncum = np.concatenate([[0], np.cumsum(ref.seq == ord("N"), dtype=np.int64)])
    span_f = np.where(o, span[:, 1], span[:, 0])  # forward read's span
    span_r = np.where(o, span[:, 0], span[:, 1])
    extent = np.maximum(frag + (span_f - L) + (span_r - L), np.maximum(span_f, span_r))
    extent = np.where(category == 2, 0, extent)
    extent = np.where(category == 1, np.where(mapped[:, 0], span[:, 0], span[:, 1]), extent)
    weights = ref.lengths / ref.lengths.sum()
    tid_p = np.zeros(n, dtype=np.int64)
    start = np.zeros(n, dtype=np.int64)
    todo = np.nonzero(category != 2)[0]
    for _ in range(200):
        if todo.size == 0:
            break
        t = rng.choice(len(ref.names), size=todo.size, p=weights)
        room = ref.lengths[t] - extent[todo]
        s = (rng.random(todo.size) * np.maximum(room + 1, 1)).astype(np.int64)
        g = ref.offsets[t] + s
        ok = (room >= 0) & (ncum[np.minimum(g + extent[todo], ref.total)] - ncum[g] == 0)
        tid_p[todo[ok]] = t[ok]
        start[todo[ok]] = s[ok]
        todo = todo[~ok]
    if todo.size:
        raise ValueError("reference too small / too many N for the requested fragments")
    if dup.any():
        d = np.nonzero(dup)[0]
        tid_p[d] = tid_p[src_of[d]]
        start[d] = start[src_of[d]]
    tid = np.where(category == 2, -1, tid_p)[:, None].repeat(2, axis=1).astype(np.int32)
    pos = np.zeros(R, dtype=np.int64)
    fwd_pos = start
    rev_pos = start + extent - span_r
    pos[:, 0] = np.where(o, rev_pos, fwd_pos)
    pos[:, 1] = np.where(o, fwd_pos, rev_pos)
    c1 = category == 1
    pos[c1, :] = start[c1, None]  # mapped read at start; unmapped mate placed at it
    pos[category == 2] = -1
    rev[~mapped] = False

    # ---- chimeric loci
    chim_tid = np.full(R, -1, dtype=np.int32)
    chim_pos = np.full(R, -1, dtype=np.int64)
    chim_rev = rng.random(R) < 0.5
    ci = np.argwhere(chim)
    todo = np.arange(len(ci))
    for _ in range(200):
        if todo.size == 0:
            break
        t = rng.choice(len(ref.names), size=todo.size, p=weights)
        b = chim_len[ci[todo, 0], ci[todo, 1]]
        room = ref.lengths[t] - b
        s = (rng.random(todo.size) * np.maximum(room + 1, 1)).astype(np.int64)
        g = ref.offsets[t] + s
        ok = (room >= 0) & (ncum[np.minimum(g + b, ref.total)] - ncum[g] == 0)
        chim_tid[ci[todo[ok], 0], ci[todo[ok], 1]] = t[ok]
        chim_pos[ci[todo[ok], 0], ci[todo[ok], 1]] = s[ok]
        todo = todo[~ok]
    if dup.any():
        d = np.nonzero(dup)[0]
        for a in (chim_tid, chim_pos, chim_rev):
            a[d] = a[src_of[d]]
    chim_mapq = rng.integers(0, 61, R).astype(np.uint8)

    # ---- MAPQ / XS
    mq = np.where(rng.random(R) < 0.88, 60, rng.integers(0, 60, R)).astype(np.uint8)
    xs_frac = np.where(mq == 60, np.where(rng.random(R) < 0.5, 0.0, rng.uniform(0, 0.6, R)), rng.uniform(0.7, 1.0, R))
    xs_frac = np.where(mq == 0, 1.0, xs_frac).astype(np.float32)
    mq[~mapped] = 0

    # ---- secondary alignments: counterparts in segmental copies, else random loci
    sec = np.zeros(R, dtype=bool)
    sec_tid = np.full(R, -1, dtype=np.int32)
    sec_pos = np.full(R, -1, dtype=np.int64)
    sec_rev = np.zeros(R, dtype=bool)
    cand = np.argwhere(plain & normal[:, None] & ~dup[:, None])
    target = int(round(secondary_frac * 2 * n))
    if target and cand.size:
        g0 = ref.offsets[tid[cand[:, 0], cand[:, 1]]] + pos[cand[:, 0], cand[:, 1]]
        picked = []
        if ref.repeats.size:
            rp = ref.repeats
            ist = np.concatenate([rp[:, 0], rp[:, 1]])
            oth = np.concatenate([rp[:, 1], rp[:, 0]])
            iln = np.concatenate([rp[:, 2], rp[:, 2]])
            irc = np.concatenate([rp[:, 3], rp[:, 3]]).astype(bool)
            order = np.argsort(ist, kind="stable")
            ist, oth, iln, irc = ist[order], oth[order], iln[order], irc[order]
            j = np.searchsorted(ist, g0, side="right") - 1
            jj = np.maximum(j, 0)
            inside = (j >= 0) & (g0 + L <= ist[jj] + iln[jj])
            inrep = np.nonzero(inside)[0]
            if inrep.size:
                pk = rng.permutation(inrep)[:target]
                jj = jj[pk]
                g2 = np.where(irc[jj], oth[jj] + (ist[jj] + iln[jj] - (g0[pk] + L)), oth[jj] + (g0[pk] - ist[jj]))
                rr, cc = cand[pk, 0], cand[pk, 1]
                t2 = ref.tid_of(g2)
                sec[rr, cc] = True
                sec_tid[rr, cc] = t2
                sec_pos[rr, cc] = g2 - ref.offsets[t2]
                sec_rev[rr, cc] = rev[rr, cc] ^ irc[jj]
                mq[rr, cc] = rng.choice(np.array([0, 0, 1, 3], dtype=np.uint8), pk.size)
                xs_frac[rr, cc] = rng.uniform(0.9, 1.0, pk.size)
                picked = pk
        rest = target - len(picked)
        if rest > 0:
            pool = np.setdiff1d(np.arange(len(cand)), picked)
            pk = rng.permutation(pool)[:rest]
            rr, cc = cand[pk, 0], cand[pk, 1]
            t2 = rng.choice(len(ref.names), size=pk.size, p=weights)
            p2 = (rng.random(pk.size) * np.maximum(ref.lengths[t2] - L, 1)).astype(np.int64)
            okl = ref.lengths[t2] >= L
            rr, cc, t2, p2 = rr[okl], cc[okl], t2[okl], p2[okl]
            sec[rr, cc] = True
            sec_tid[rr, cc] = t2
            sec_pos[rr, cc] = p2
            sec_rev[rr, cc] = rng.random(rr.size) < 0.5
            mq[rr, cc] = rng.integers(0, 30, rr.size)
    sec_nostar = rng.random(R) < 0.5

    # ---- structure of non-plain mapped reads (duplicates copy their source's ops)
    ops: dict[int, list] = {}
    flat = np.nonzero((mapped & ~plain).ravel())[0]
    dupflat = dup.repeat(2)
    for k in flat.tolist():
        if dupflat[k]:
            continue
        i, r = divmod(k, 2)
        ops[k] = _make_ops(
            rnd, L, int(lclip[i, r]), int(rclip[i, r]), int(ins[i, r]), int(dl[i, r]), int(ldel[i, r]), int(intron[i, r])
        )
    for k in flat.tolist():
        if dupflat[k]:
            i, r = divmod(k, 2)
            ops[k] = ops[2 * int(src_of[i]) + r]

    # ---- sequences (reference orientation)
    seq = np.empty((n, 2, L), dtype=np.uint8)
    sflat = seq.reshape(2 * n, L)
    pflat = np.nonzero(plain.ravel())[0]
    ar = np.arange(L, dtype=np.int64)
    gpos = (ref.offsets[np.maximum(tid, 0)] + pos).ravel()
    for a in range(0, pflat.size, 8192):  # small blocks: big temporaries page-fault slowly
        kk = pflat[a : a + 8192]
        sflat[kk] = ref.seq[gpos[kk, None] + ar[None, :]]
    rbuf = _ACGT[rng.integers(0, 4, 1 << 20)]
    rb = 0
    for k, kops in ops.items():
        i, r = divmod(k, 2)
        g = int(gpos[k])
        parts = []
        for op, ln in kops:
            if op == "M":
                parts.append(ref.seq[g : g + ln])
                g += ln
            elif op in "DN":
                g += ln
            else:  # I, S: random (overwritten below for chimeric clips)
                if rb + ln > rbuf.size:
                    rb = 0
                parts.append(rbuf[rb : rb + ln])
                rb += ln
        s = np.concatenate(parts)
        b = int(chim_len[i, r])
        if b:
            ct = int(chim_tid[i, r])
            cg = int(ref.offsets[ct] + chim_pos[i, r])
            bseq = ref.seq[cg : cg + b]  # sequencing orientation of the 3' part
            if chim_rev[i, r]:
                bseq = _revcomp(bseq)
            if rev[i, r]:
                s[:b] = _revcomp(bseq)
            else:
                s[L - b :] = bseq
        sflat[k] = s
    # unmapped reads: random junk, poly-G (2-colour chemistry), or adapter dimers
    uflat = np.nonzero(~mapped.ravel())[0]
    if uflat.size:
        kind = rng.integers(0, 3, uflat.size)
        junk = _ACGT[rng.integers(0, 4, (uflat.size, L))]
        polyg_from = rng.integers(0, L // 2, uflat.size)
        polyg = (ar[None, :] >= polyg_from[:, None]) & (kind == 1)[:, None]
        junk[polyg] = ord("G")
        adapter = np.frombuffer(b"AGATCGGAAGAGCACACGTCTGAACTCCAGTCAC", dtype=np.uint8)
        ad = np.resize(adapter, L)
        junk[kind == 2] = ad
        sflat[uflat] = junk

    # ---- qualities + errors in sequencing orientation, then flip for reverse reads
    qual = np.empty((n, 2, L), dtype=np.uint8)
    qflat = qual.reshape(2 * n, L)
    revflat = rev.ravel()
    junkflat = (~mapped).ravel().astype(np.float32)
    r2flat = np.tile(np.array([False, True]), n)
    for a in range(0, 2 * n, 2 * chunk):
        b = min(2 * n, a + 2 * chunk)
        q, err, nm = _quals_errors(rng, r2flat[a:b], junkflat[a:b], L, qual_mode)  # (L, R) layout
        rv = revflat[a:b]
        qb = qflat[a:b]
        qb[...] = q.T
        qb[rv] = qb[rv, ::-1]
        blk = sflat[a:b]
        cyc, rd = np.nonzero(err)  # sparse: map sequencing cycle -> record column
        col = np.where(rv[rd], L - 1 - cyc, cyc)
        idx = _IDX[blk[rd, col]]
        good = idx < 4
        sub = _ACGT[(idx[good].astype(np.int64) + rng.integers(1, 4, int(good.sum()))) % 4]
        blk[rd[good], col[good]] = sub
        cyc, rd = np.nonzero(nm)
        blk[rd, np.where(rv[rd], L - 1 - cyc, cyc)] = ord("N")

    qcfail = rng.random(n) < qcfail_frac
    return Pairs(
        ref=ref,
        read_len=L,
        seed=seed,
        params=params,
        lane=lane,
        tile=tile,
        x=x,
        y=y,
        category=category,
        mapped=mapped,
        tid=tid,
        pos=pos,
        rev=rev,
        plain=plain,
        ops=ops,
        seq=seq,
        qual=qual,
        mapq=mq,
        xs_frac=xs_frac,
        chim_len=chim_len,
        chim_tid=chim_tid,
        chim_pos=chim_pos,
        chim_rev=chim_rev,
        chim_mapq=chim_mapq,
        sec=sec,
        sec_tid=sec_tid,
        sec_pos=sec_pos,
        sec_rev=sec_rev,
        sec_nostar=sec_nostar,
        dup=dup,
        qcfail=qcfail,
    )


# --------------------------------------------------------------------------- FASTQ

_BARCODES = {1: "ATCACGAT+GTTCTCGT", 2: "CGATGTTC+AGGTTACG"}


def _open_out(path: str):
    if str(path).endswith(".gz"):
        raw = open(path, "wb")
        # mtime=0 and no filename -> byte-identical output for identical input
        return gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0), raw
    return open(path, "wb"), None


def write_fastq(pairs: Pairs, r1_path, r2_path, chunk: int = 100_000) -> None:
    """Write R1/R2 FASTQ in sequencing orientation (gzip if the name ends in .gz).

    Headers: ``@SIM:1:FCX123:<lane>:<tile>:<x>:<y> <1|2>:<Y|N>:0:<barcode>``.
    """
    L = pairs.read_len
    outs = [_open_out(str(r1_path)), _open_out(str(r2_path))]
    try:
        for a in range(0, pairs.n, chunk):
            b = min(pairs.n, a + chunk)
            names = pairs.names(a, b)
            filt = ["Y" if f else "N" for f in pairs.qcfail[a:b].tolist()]
            bc = [_BARCODES[int(v)] for v in pairs.lane[a:b].tolist()]
            for r in (0, 1):
                s = pairs.seq[a:b, r].copy()
                q = pairs.qual[a:b, r].copy()
                rv = pairs.rev[a:b, r]
                s[rv] = _COMP[s[rv, ::-1]]
                q[rv] = q[rv, ::-1]
                ss = s.tobytes().decode("ascii")
                qs = (q + 33).tobytes().decode("ascii")
                lines = [
                    f"@{nm} {r + 1}:{fl}:0:{bcd}\n{ss[j * L:(j + 1) * L]}\n+\n{qs[j * L:(j + 1) * L]}\n"
                    for j, (nm, fl, bcd) in enumerate(zip(names, filt, bc))
                ]
                outs[r][0].write("".join(lines).encode("ascii"))
    finally:
        for fh, raw in outs:
            fh.close()
            if raw is not None:
                raw.close()


# --------------------------------------------------------------------------- truth BAM


def header_text(pairs: Pairs, sort_order: str = "coordinate") -> str:
    ref = pairs.ref
    lines = [f"@HD\tVN:1.6\tSO:{sort_order}"]
    for t, name in enumerate(ref.names):
        lines.append(f"@SQ\tSN:{name}\tLN:{int(ref.lengths[t])}\tM5:{ref.md5(t)}\tAS:bams3sim")
    for ln in (1, 2):
        lines.append(
            f"@RG\tID:SIM.{ln}\tSM:SAMPLE1\tLB:LIB1\tPL:ILLUMINA\tPU:FCX123.{ln}.{_BARCODES[ln]}"
            f"\tBC:{_BARCODES[ln].replace('+', '-')}\tCN:bams3\tDT:2024-01-15T00:00:00+00:00"
        )
    cl = " ".join(f"{k}={v}" for k, v in pairs.params.items())
    lines.append(f"@PG\tID:{PG_ID}\tPN:{PG_ID}\tVN:{PG_VN}\tCL:bams3.sample.simulate_pairs {cl}")
    lines.append("@CO\tTruth alignments simulated by bams3.sample (no aligner was run); tags follow bwa-mem conventions.")
    return "\n".join(lines) + "\n"


def _md_nm(refseq: np.ndarray, g: int, ops, s: np.ndarray) -> tuple[str, int, int]:
    """MD string, NM and a bwa-like alignment score for read bases ``s`` aligned at global ``g``."""
    md = []
    run = 0
    nm = 0
    score = 0
    q = 0
    for op, ln in ops:
        if op == "M":
            rr = refseq[g : g + ln]
            ss = s[q : q + ln]
            mm = np.nonzero((rr != ss) | (rr == 78))[0]
            last = 0
            rtxt = rr.tobytes().decode("ascii")
            for j in mm.tolist():
                md.append(str(run + j - last))
                md.append(rtxt[j])
                last = j + 1
                run = 0
            run += ln - last
            nm += mm.size
            score += ln - 5 * mm.size
            g += ln
            q += ln
        elif op == "I":
            nm += ln
            score -= 6 + ln
            q += ln
        elif op == "D":
            md.append(str(run))
            md.append("^" + refseq[g : g + ln].tobytes().decode("ascii"))
            run = 0
            nm += ln
            score -= 6 + ln
            g += ln
        elif op == "N":
            g += ln
        elif op == "S":
            q += ln
        # H, P: nothing
    md.append(str(run))
    return "".join(md), nm, score


def _sa_cigar(ops) -> str:
    return "".join(f"{n}{'S' if op == 'H' else op}" for op, n in ops)


def _supplementary(pairs: Pairs, k: int, tn, rname, pn, mate_rev, mate_mapped, dupf, qcf, mc, rg, qn, pcig, pmapq, pnm):
    """(SA tag for the primary, supplementary SAM line) for chimeric flat read ``k``."""
    ref = pairs.ref
    L = pairs.read_len
    i, r = divmod(k, 2)
    b_ = int(pairs.chim_len[i, r])
    srev = bool(pairs.chim_rev[i, r])
    st = int(pairs.chim_tid[i, r])
    sp = int(pairs.chim_pos[i, r])
    prev = bool(pairs.rev[i, r])
    rs_, rq_ = pairs.seq[i, r], pairs.qual[i, r]
    if prev:  # back to sequencing orientation
        rs_, rq_ = _revcomp(rs_), rq_[::-1]
    bs, bq = rs_[L - b_ :], rq_[L - b_ :]
    if srev:
        bs, bq = _revcomp(bs), bq[::-1]
        sops = [("M", b_), ("H", L - b_)]
    else:
        sops = [("H", L - b_), ("M", b_)]
    smd, snm, ssc = _md_nm(ref.seq, int(ref.offsets[st] + sp), sops, bs)
    smq = int(pairs.chim_mapq[i, r])
    sa = f"\tSA:Z:{tn[st]},{sp + 1},{'-' if srev else '+'},{_sa_cigar(sops)},{smq},{snm};"
    sflag = (
        0x801
        | (0x40 if r == 0 else 0x80)
        | (0x10 if srev else 0)
        | (0x20 if mate_rev else 0)
        | (0x8 if not mate_mapped else 0)
        | (0x400 if dupf else 0)
        | (0x200 if qcf else 0)
    )
    ssa = f"{rname},{pairs.pos[i, r] + 1},{'-' if prev else '+'},{pcig},{pmapq},{pnm};"
    line = (
        f"{qn}\t{sflag}\t{tn[st]}\t{sp + 1}\t{smq}\t{''.join(f'{n}{op}' for op, n in sops)}\t"
        f"{rname if tn[st] != rname else '='}\t{pn}\t0\t{bs.tobytes().decode()}\t"
        f"{(bq + 33).tobytes().decode()}\tNM:i:{snm}\tMD:Z:{smd}{mc}\tAS:i:{ssc}\tXS:i:0\t{rg}\tSA:Z:{ssa}\n"
    )
    return sa, line


def _secondary(pairs: Pairs, k: int, tn, rname, pn, mate_rev, mate_mapped, dupf, qcf, rg, qn):
    ref = pairs.ref
    L = pairs.read_len
    i, r = divmod(k, 2)
    st = int(pairs.sec_tid[i, r])
    sp = int(pairs.sec_pos[i, r])
    srev = bool(pairs.sec_rev[i, r])
    bs, bq = pairs.seq[i, r], pairs.qual[i, r]
    if srev != bool(pairs.rev[i, r]):
        bs, bq = _revcomp(bs), bq[::-1]
    smd, snm, ssc = _md_nm(ref.seq, int(ref.offsets[st] + sp), [("M", L)], bs)
    if pairs.sec_nostar[i, r]:
        s_sq, s_ql = bs.tobytes().decode(), (bq + 33).tobytes().decode()
    else:
        s_sq = s_ql = "*"
    sflag = (
        0x101
        | (0x40 if r == 0 else 0x80)
        | (0x10 if srev else 0)
        | (0x20 if mate_rev else 0)
        | (0x8 if not mate_mapped else 0)
        | (0x400 if dupf else 0)
        | (0x200 if qcf else 0)
    )
    return (
        f"{qn}\t{sflag}\t{tn[st]}\t{sp + 1}\t0\t{L}M\t{rname if tn[st] != rname else '='}\t{pn}\t0\t"
        f"{s_sq}\t{s_ql}\tNM:i:{snm}\tMD:Z:{smd}\tAS:i:{ssc}\t{rg}\n"
    )


def _records(pairs: Pairs, a: int, b: int, extras: bool) -> list[str]:
    """SAM lines (unsorted, pair order) for pairs ``a..b``."""
    ref = pairs.ref
    L = pairs.read_len
    C = b - a
    names = pairs.names(a, b)
    tn = ref.names
    seqc = pairs.seq[a:b]
    sstr = seqc.tobytes().decode("ascii")
    qstr = (pairs.qual[a:b] + 33).tobytes().decode("ascii")
    mapped = pairs.mapped[a:b]
    tid = pairs.tid[a:b]
    pos = pairs.pos[a:b]
    rev = pairs.rev[a:b]
    plain = pairs.plain[a:b]
    dup = pairs.dup[a:b] & extras
    qcf = pairs.qcfail[a:b] & extras
    gpos = ref.offsets[np.maximum(tid, 0)] + np.maximum(pos, 0)

    # MD / NM / AS: plain reads with vectorised mismatch detection, others via _md_nm
    mdL = [None] * (2 * C)
    nm = np.zeros(2 * C, dtype=np.int64)
    sc = np.zeros(2 * C, dtype=np.int64)
    pk = np.nonzero(plain.ravel())[0]
    if pk.size:
        rs = ref.seq[gpos.ravel()[pk, None] + np.arange(L)[None, :]]
        mmat = (rs != seqc.reshape(2 * C, L)[pk]) | (rs == 78)
        cnt = mmat.sum(axis=1)
        nm[pk] = cnt
        sc[pk] = L - 5 * cnt
        rows, cols = np.nonzero(mmat)
        refb = rs[rows, cols].tobytes().decode("ascii")
        colsl = cols.tolist()
        full = str(L)
        m = 0
        for k, c in zip(pk.tolist(), cnt.tolist()):
            if c == 0:
                mdL[k] = full
                continue
            parts = []
            last = 0
            for mm in range(m, m + c):
                cc = colsl[mm]
                parts.append(str(cc - last))
                parts.append(refb[mm])
                last = cc + 1
            parts.append(str(L - last))
            mdL[k] = "".join(parts)
            m += c
    cigL = ["*"] * (2 * C)
    endv = pos.ravel() + np.where(mapped.ravel(), L, 1)
    plainc = f"{L}M"
    for k in pk.tolist():
        cigL[k] = plainc
    for k in np.nonzero((mapped & ~plain).ravel())[0].tolist():
        kops = pairs.ops[2 * a + k]
        cigL[k] = "".join(f"{n}{op}" for op, n in kops)
        endv[k] = pos.ravel()[k] + sum(n for op, n in kops if op in "MDN=X")
        mdL[k], nm[k], sc[k] = _md_nm(ref.seq, int(gpos.ravel()[k]), kops, seqc.reshape(2 * C, L)[k])
    xs = np.rint(pairs.xs_frac[a:b].ravel() * np.maximum(sc, 0)).astype(np.int64)
    end = endv.reshape(C, 2)

    # flags, TLEN
    both = mapped[:, 0] & mapped[:, 1]
    left1 = (pos[:, 0] < pos[:, 1]) | ((pos[:, 0] == pos[:, 1]) & ~rev[:, 0])
    tl = np.maximum(end[:, 0], end[:, 1]) - np.minimum(pos[:, 0], pos[:, 1])
    tlen = np.zeros((C, 2), dtype=np.int64)
    tlen[:, 0] = np.where(both, np.where(left1, tl, -tl), 0)
    tlen[:, 1] = -tlen[:, 0]
    proper = both & (rev[:, 0] != rev[:, 1]) & (tl < 1000)
    flag = np.zeros((C, 2), dtype=np.int64)
    flag[:, 0] = 0x41
    flag[:, 1] = 0x81
    flag |= np.where(proper, 0x2, 0)[:, None]
    flag |= np.where(~mapped, 0x4, 0)
    flag |= np.where(~mapped[:, ::-1], 0x8, 0)
    flag |= np.where(rev, 0x10, 0)
    flag |= np.where(rev[:, ::-1], 0x20, 0)
    flag |= np.where(dup, 0x400, 0)[:, None]
    flag |= np.where(qcf, 0x200, 0)[:, None]

    placed = (pairs.category[a:b] != 2).tolist()
    p1L = (pos + 1).ravel().tolist()
    pnL = (pos[:, ::-1] + 1).ravel().tolist()
    flagL = flag.ravel().tolist()
    tlenL = tlen.ravel().tolist()
    mapqL = pairs.mapq[a:b].ravel().tolist()
    mappedL = mapped.ravel().tolist()
    nmL, scL, xsL = nm.tolist(), sc.tolist(), xs.tolist()
    rnameL = [tn[t] for t in tid[:, 0].tolist()]
    rgL = [f"RG:Z:SIM.{v}" for v in pairs.lane[a:b].tolist()]
    special = (pairs.chim_len[a:b] > 0) | pairs.sec[a:b] if extras else np.zeros((C, 2), dtype=bool)
    specialL = special.ravel().tolist()
    revL = rev.ravel().tolist()
    dupL, qcfL = dup.tolist(), qcf.tolist()

    out = []
    app = out.append
    for i in range(C):
        qn = names[i]
        rg = rgL[i]
        if placed[i]:
            rname, rnext = rnameL[i], "="
        else:
            rname, rnext = "*", "*"
        for k in (2 * i, 2 * i + 1):
            km = k ^ 1
            if placed[i]:
                p1, pn = p1L[k], pnL[k]
            else:
                p1 = pn = 0
            mc = f"\tMC:Z:{cigL[km]}" if mappedL[km] else ""
            sq = sstr[k * L : (k + 1) * L]
            ql = qstr[k * L : (k + 1) * L]
            if not mappedL[k]:
                app(f"{qn}\t{flagL[k]}\t{rname}\t{p1}\t0\t*\t{rnext}\t{pn}\t0\t{sq}\t{ql}{mc}\tAS:i:0\tXS:i:0\t{rg}\n")
                continue
            if not specialL[k]:
                app(
                    f"{qn}\t{flagL[k]}\t{rname}\t{p1}\t{mapqL[k]}\t{cigL[k]}\t=\t{pn}\t{tlenL[k]}\t{sq}\t{ql}"
                    f"\tNM:i:{nmL[k]}\tMD:Z:{mdL[k]}{mc}\tAS:i:{scL[k]}\tXS:i:{xsL[k]}\t{rg}\n"
                )
                continue
            sa = supp = ""
            K = 2 * a + k
            if pairs.chim_len.ravel()[K]:
                sa, supp = _supplementary(
                    pairs, K, tn, rname, pn, revL[km], mappedL[km], dupL[i], qcfL[i], mc, rg, qn,
                    cigL[k], mapqL[k], nmL[k],
                )
            app(
                f"{qn}\t{flagL[k]}\t{rname}\t{p1}\t{mapqL[k]}\t{cigL[k]}\t=\t{pn}\t{tlenL[k]}\t{sq}\t{ql}"
                f"\tNM:i:{nmL[k]}\tMD:Z:{mdL[k]}{mc}\tAS:i:{scL[k]}\tXS:i:{xsL[k]}\t{rg}{sa}\n"
            )
            if supp:
                app(supp)
            if pairs.sec.ravel()[K]:
                app(_secondary(pairs, K, tn, rname, pn, revL[km], mappedL[km], dupL[i], qcfL[i], rg, qn))
    return out


def write_truth_bam(
    ref,
    pairs: Pairs,
    out_bam,
    *,
    sort: bool = True,
    extras: bool = True,
    threads: int = 2,
    chunk: int = 50_000,
) -> str:
    """Write the true alignments of ``pairs`` as BAM (coordinate-sorted + ``.bai`` if ``sort``).

    ``extras=False`` drops secondary/supplementary records, SA tags and the
    duplicate/QC-fail flags.  Unsorted output is in pair order (SO:unsorted,
    GO:query).  Records are built as SAM text and converted/sorted by
    ``pysam.samtools`` with ``--no-PG``, so no samtools @PG line is added.
    """
    if isinstance(ref, Reference):
        names = ref.names
    elif ref is not None and os.path.exists(str(ref) + ".fai"):
        with open(str(ref) + ".fai") as fh:
            names = [ln.split("\t")[0] for ln in fh if ln.strip()]
    else:
        names = pairs.ref.names if ref is None else load_reference(ref).names
    if names != pairs.ref.names:
        raise ValueError("reference does not match the one the pairs were simulated from")
    out_bam = str(out_bam)
    Path(out_bam).parent.mkdir(parents=True, exist_ok=True)
    tmp_sam = out_bam + ".tmp.sam"
    with open(tmp_sam, "w", encoding="ascii") as fh:
        fh.write(header_text(pairs, "unsorted\tGO:query" if not sort else "unsorted"))
        for a in range(0, pairs.n, chunk):
            fh.write("".join(_records(pairs, a, min(pairs.n, a + chunk), extras)))
    try:
        if sort:
            pysam.samtools.sort(
                "-@", str(threads), "--no-PG", "-m", "512M", "-T", out_bam + ".sorttmp", "-o", out_bam, tmp_sam,
                catch_stdout=False,
            )
            if os.path.exists(out_bam + ".bai"):
                os.remove(out_bam + ".bai")
            pysam.samtools.index("-@", str(threads), out_bam)
        else:
            pysam.samtools.view("-b", "-@", str(threads), "--no-PG", "-o", out_bam, tmp_sam, catch_stdout=False)
    finally:
        os.remove(tmp_sam)
    return out_bam


# --------------------------------------------------------------------------- demo


def _default_contigs(n_pairs: int) -> list[tuple[str, int]]:
    scale = max(1.0, n_pairs * 30 / 800_000)  # ~10x coverage, at least 0.8 Mb
    return [
        ("chr1", int(400_000 * scale)),
        ("chr2", int(250_000 * scale)),
        ("chr3", int(120_000 * scale)),
        ("chrM", 16_569),
        ("HLA-A*01:01:01:01", 3_503),
        ("chrUn_KI270302v1", 2_274),
    ]


def make_sample(outdir, n_pairs: int = 20000, seed: int = 1, *, fastq: bool = False, qual_mode: str = "binned") -> dict:
    """Reference + simulated pairs + truth BAM (+ .bai) (+ FASTQ) in ``outdir``.

    Returns paths: ``reference``, ``fai``, ``bam``, ``bai`` and, with
    ``fastq=True``, ``r1``/``r2``.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    fa = outdir / "ref.fa"
    ref = make_reference(fa, _default_contigs(n_pairs), seed=seed)
    pairs = simulate_pairs(ref, n_pairs, seed=seed, qual_mode=qual_mode)
    bam = outdir / "sample.bam"
    write_truth_bam(ref, pairs, bam)
    paths = {"reference": str(fa), "fai": str(fa) + ".fai", "bam": str(bam), "bai": str(bam) + ".bai"}
    if fastq:
        r1, r2 = outdir / "sample_R1.fastq.gz", outdir / "sample_R2.fastq.gz"
        write_fastq(pairs, r1, r2)
        paths.update(r1=str(r1), r2=str(r2))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bams3.sample", description=__doc__.split("\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fastq", action="store_true", help="also write gzipped R1/R2 FASTQ")
    ap.add_argument("--qual-mode", choices=("binned", "full"), default="binned")
    args = ap.parse_args(argv)
    t = time.time()
    paths = make_sample(args.outdir, args.pairs, args.seed, fastq=args.fastq, qual_mode=args.qual_mode)
    for k, v in paths.items():
        print(f"{k}\t{v}")
    print(f"# {args.pairs} pairs in {time.time() - t:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
