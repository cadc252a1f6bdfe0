"""`bams3 depth`: per-base read depth, exactly as `samtools depth` prints it.

samtools' rules (bam2depth.c, the 1.13+ rewrite), which this follows:

* records on no reference are skipped, then any with a flag in the exclude set (default
  UNMAP, SECONDARY, QCFAIL, DUP; ``-g`` removes flags from it, ``-G`` adds some), and those
  with MAPQ below ``-Q``;
* a record adds 1 at each reference base its CIGAR aligns (M, =, X) whose base quality is at
  least ``-q`` (bases past the end of SEQ always count); deletions count only with ``-J``
  (and then against the quality of the next base); N skips never;
* the positions printed are those inside some counted record's span (``pos`` to htslib's
  ``bam_endpos``), so a position inside a deletion or an N skip prints with depth 0; with a
  region, only positions in it. ``-a`` adds every other position of each reference that has
  a counted record (of the region, with ``-r``, even without one); ``-aa`` also of the
  references without any (whole-file runs only, as samtools).

Only the streams those rules need are read: positions, flags, MAPQ and CIGARs — and base
qualities only with ``-q`` (whose frames have no checksum of their own, so their blocks are
then read whole, FORMAT.md §7).
"""

from __future__ import annotations

import argparse
import sys

FLAG_NAMES = {"PAIRED": 0x1, "PROPER_PAIR": 0x2, "UNMAP": 0x4, "MUNMAP": 0x8, "REVERSE": 0x10, "MREVERSE": 0x20,
              "READ1": 0x40, "READ2": 0x80, "SECONDARY": 0x100, "QCFAIL": 0x200, "DUP": 0x400,
              "SUPPLEMENTARY": 0x800}
DEFAULT_EXCLUDE = 0x4 | 0x100 | 0x200 | 0x400
_PIECE = 1 << 20  # positions formatted at a time


def parse_flags(text: str) -> int:
    """htslib's ``bam_str2flag``: a number (decimal, 0x hex, 0 octal) or comma-separated names."""
    t = text.strip()
    if t and t[0].isdigit():
        try:
            if t.lower().startswith("0x"):
                return int(t, 16)
            return int(t, 8) if len(t) > 1 and t[0] == "0" else int(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid flags {text!r}") from None
    flag = 0
    for name in t.split(","):
        if name.upper() not in FLAG_NAMES:
            raise argparse.ArgumentTypeError(f"unknown flag {name!r} (known: {', '.join(FLAG_NAMES)})")
        flag |= FLAG_NAMES[name.upper()]
    return flag


class _RefDepth:
    """The depth of one reference, accumulated as difference arrays over a window that moves
    forward as records (sorted by position) come in; what is final is formatted and dropped."""

    def __init__(self, name: str, beg: int, end: int, all_lo: int, all_hi: int, emit, plot=None):
        import numpy as np

        self.np = np
        self.name = name
        self.beg, self.end = beg, end  # region (0-based, half-open); print nothing outside
        self.all_lo, self.all_hi = all_lo, all_hi  # -a: zeros printed over [all_lo, all_hi)
        self.emit = emit
        self.plot = plot
        self.lo = beg  # first position not yet printed; window arrays start here
        self.depth = np.zeros(0, dtype=np.int64)  # difference arrays over [lo, lo + len)
        self.cover = np.zeros(0, dtype=np.int64)
        self.d_carry = 0
        self.c_carry = 0

    def _grow(self, hi: int) -> None:
        n = hi - self.lo
        if n > len(self.depth):
            extra = max(n, 2 * len(self.depth)) - len(self.depth)
            self.depth = self.np.concatenate((self.depth, self.np.zeros(extra, dtype=self.np.int64)))
            self.cover = self.np.concatenate((self.cover, self.np.zeros(extra, dtype=self.np.int64)))

    def add(self, starts, ends, counts, span_starts, span_ends) -> None:
        """Add ``counts`` over [starts, ends) to the depth and mark [span_starts, span_ends)
        (the records' spans) as printable."""
        np = self.np
        lo = self.lo
        s = np.maximum(starts, lo)
        e = np.minimum(ends, self.end)
        k = e > s
        ss = np.maximum(span_starts, max(lo, self.beg))
        se = np.minimum(span_ends, self.end)
        kk = se > ss
        hi = max(int(e[k].max()) if k.any() else lo, int(se[kk].max()) if kk.any() else lo)
        self._grow(hi + 1)
        np.add.at(self.depth, s[k] - lo, counts[k])
        np.add.at(self.depth, e[k] - lo, -counts[k])
        np.add.at(self.cover, ss[kk] - lo, 1)
        np.add.at(self.cover, se[kk] - lo, -1)

    def flush(self, upto: int) -> None:
        """Print every position below ``upto`` (no record to come starts before it)."""
        np = self.np
        upto = min(upto, max(self.end, self.lo))
        while self.lo < upto:
            n = min(upto - self.lo, _PIECE)
            have = min(n, len(self.depth))
            if have:
                d = np.cumsum(self.depth[:have]) + self.d_carry
                c = np.cumsum(self.cover[:have]) + self.c_carry
                self.d_carry, self.c_carry = int(d[-1]), int(c[-1])
                pos = np.arange(self.lo, self.lo + have)
                show = (c > 0) | ((pos >= self.all_lo) & (pos < self.all_hi))
                self._print(pos[show], d[show])
                self.depth = self.depth[have:]
                self.cover = self.cover[have:]
                self.lo += have
            else:  # past every record: zeros, for -a
                a, b = max(self.lo, self.all_lo), min(self.lo + n, self.all_hi)
                if b > a:
                    self._print(np.arange(a, b), np.zeros(b - a, dtype=np.int64))
                self.lo += n

    def finish(self) -> None:
        self.flush(max(self.lo + len(self.depth), self.all_hi))

    def _print(self, pos, d) -> None:
        if not len(pos):
            return
        if self.plot is not None:
            self.plot.add(pos, d)
        name = self.name
        self.emit("".join(f"{name}\t{p}\t{x}\n" for p, x in zip((pos + 1).tolist(), d.tolist())))


def contributions(c, keep, *, min_bq: int, deletions: bool):
    """(starts, ends, counts) of the depth that the kept records of block columns ``c`` add."""
    import numpy as np

    from bams3core.bam import gather

    ncig = c.n_cigar
    cstart = np.zeros(len(ncig), dtype=np.int64)
    np.cumsum(ncig[:-1], out=cstart[1:])
    idx = np.flatnonzero(keep)
    n_k = ncig[idx]
    words = gather(c.cigar, cstart[idx], n_k).astype(np.int64)
    rec = np.repeat(np.arange(len(idx)), n_k)
    op = words & 0xF
    ln = words >> 4
    ref_adv = np.where(np.isin(op, (0, 2, 3, 7, 8)), ln, 0)
    first = np.zeros(len(idx), dtype=np.int64)
    np.cumsum(n_k[:-1], out=first[1:])
    excl = np.cumsum(ref_adv) - ref_adv
    rstart = c.pos[idx][rec] + excl - np.append(excl, 0)[first][rec]  # (records without ops: no rec)
    aligned = np.isin(op, (0, 7, 8))
    dele = (op == 2) & deletions
    if not min_bq:
        sel = aligned | dele
        return rstart[sel], rstart[sel] + ln[sel], np.ones(int(sel.sum()), dtype=np.int64)
    # base qualities: M/=/X per base; a deletion by the quality of the base after it
    q_adv = np.where(np.isin(op, (0, 1, 4, 7, 8)), ln, 0)
    qex = np.cumsum(q_adv) - q_adv
    qpos = qex - np.append(qex, 0)[first][rec]
    l_seq = c.l_seq[idx]
    qstart = np.zeros(len(c.l_seq), dtype=np.int64)
    np.cumsum(c.l_seq[:-1], out=qstart[1:])
    qbase = qstart[idx]
    qual = c.qual
    mi = np.flatnonzero(aligned)
    reps = ln[mi]
    base_rec = np.repeat(rec[mi], reps)
    off = np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps)
    bpos = np.repeat(rstart[mi], reps) + off
    bq = np.repeat(qpos[mi], reps) + off
    inseq = bq < l_seq[base_rec]
    ok = np.ones(len(bpos), dtype=bool)
    ok[inseq] = qual[qbase[base_rec[inseq]] + bq[inseq]] >= min_bq
    starts, ends, counts = [bpos[ok]], [bpos[ok] + 1], [np.ones(int(ok.sum()), dtype=np.int64)]
    di = np.flatnonzero(dele)
    if len(di):
        dr = rec[di]
        inseq = qpos[di] < l_seq[dr]
        okd = np.ones(len(di), dtype=bool)
        okd[inseq] = qual[qbase[dr[inseq]] + qpos[di][inseq]] >= min_bq
        starts.append(rstart[di][okd])
        ends.append(rstart[di][okd] + ln[di][okd])
        counts.append(np.ones(int(okd.sum()), dtype=np.int64))
    return np.concatenate(starts), np.concatenate(ends), np.concatenate(counts)


class _Plot:
    """Mean depth in up to ``bins`` bins over [lo, hi), fed as positions are printed."""

    def __init__(self, title: str, lo: int, hi: int, bins: int = 2000):
        import numpy as np

        self.title, self.lo, self.hi = title, lo, hi
        self.width = max(1, -(-(hi - lo) // bins))
        self.sums = np.zeros(-(-(hi - lo) // self.width) + 1, dtype=np.float64)

    def add(self, pos, d) -> None:
        import numpy as np

        k = (pos >= self.lo) & (pos < self.hi)
        np.add.at(self.sums, (pos[k] - self.lo) // self.width, d[k])

    def save(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        x = self.lo + np.arange(len(self.sums) - 1) * self.width + 1
        y = self.sums[:-1] / self.width
        fig, ax = plt.subplots(figsize=(10, 3))
        ax.fill_between(x, y, step="post", color="#4472c4", linewidth=0)
        ax.set_xlim(self.lo + 1, self.hi)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("position" + (f" (mean over {self.width} bp bins)" if self.width > 1 else ""))
        ax.set_ylabel("depth")
        ax.set_title(self.title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def run_depth(ds, region, emit, *, all_pos: int = 0, exclude: int = DEFAULT_EXCLUDE, min_mq: int = 0,
              min_bq: int = 0, deletions: bool = False, plot: _Plot | None = None) -> None:
    """Emit `samtools depth` text for dataset ``ds`` (a bams3.dataset.Dataset) over
    ``region`` (a Region, or None for every reference), in pieces through ``emit``."""
    from bams3core.regions import MAX_END, Region

    refs = ds.manifest.references
    fields = ("refid", "pos", "flag", "mapq", "cigar", "end") + (("l_seq", "qual") if min_bq else ())
    if region is not None:
        regions = [region]
    else:
        have = sorted(ix.ref_id for ix in ds.manifest.index if ix.ref_id >= 0)
        regions = [Region(i, 0, MAX_END) for i in have]

    cur: _RefDepth | None = None
    done = -1  # references before this one are printed (for -aa)

    def start(ref_id: int) -> _RefDepth:
        nonlocal done
        if region is None and all_pos > 1:
            for r in range(done + 1, ref_id):  # -aa: references without a counted record
                z = _RefDepth(refs[r]["name"], 0, MAX_END, 0, int(refs[r]["length"]), emit, None)
                z.finish()
        done = ref_id
        length = int(refs[ref_id]["length"])
        beg = region.beg if region is not None else 0
        end = region.end if region is not None else MAX_END
        lo, hi = (beg, min(end, length)) if all_pos else (0, 0)
        return _RefDepth(refs[ref_id]["name"], beg, end, lo, hi, emit, plot)

    cur_ref = None
    if region is not None and all_pos:
        cur, cur_ref = start(region.ref_id), region.ref_id  # -a over a region prints it even without a record
    for c, mask in ds.query_columns(regions, fields):
        keep = (c.refid >= 0) & ((c.flag & exclude) == 0) & (c.mapq >= min_mq)
        if mask is not None:
            keep &= mask
        if keep.any():
            ref_id = int(c.refid[keep][0])
            if (keep & (c.refid != ref_id)).any():
                raise ValueError("a block holds records of two references")  # FORMAT.md §6.2: never
            if cur_ref != ref_id:
                if cur is not None:
                    cur.finish()
                cur, cur_ref = start(ref_id), ref_id
            cur.flush(int(c.pos[keep][0]))  # nothing to come starts before this block's records
            starts, ends, counts = contributions(c, keep, min_bq=min_bq, deletions=deletions)
            cur.add(starts, ends, counts, c.pos[keep], c.end[keep])
        if cur is not None and cur_ref == c.ref_id:
            cur.flush(int(c.pos[-1]))
    if cur is not None:
        cur.finish()
    if region is None and all_pos > 1:
        for r in range(done + 1, len(refs)):
            _RefDepth(refs[r]["name"], 0, MAX_END, 0, int(refs[r]["length"]), emit, None).finish()


# -- the command ---------------------------------------------------------------------------
def add_depth_parser(sub, add_store_options, add_snapshot_option, epilog: str) -> None:
    """Register `bams3 depth` on the CLI's subparsers."""
    p = sub.add_parser("depth", help="per-base read depth, as samtools depth prints it",
                       description="Print the read depth at each position (chr, 1-based position, depth), exactly "
                                   "as `samtools depth` does for the source BAM, with its defaults: records with "
                                   "UNMAP, SECONDARY, QCFAIL or DUP are not counted, nor deletions. Reads only "
                                   "positions, flags, MAPQ and CIGARs (and base qualities with -q).",
                       epilog=epilog)
    p.add_argument("dataset")
    p.add_argument("-r", "--region", metavar="REG", help="only this region (chr, chr:from-to)")
    p.add_argument("-a", dest="all_pos", action="count", default=0,
                   help="print every position, zero depth included; -aa: also references without reads "
                        "(without -r)")
    p.add_argument("-Q", "--min-MQ", dest="min_mq", type=int, default=0, metavar="INT",
                   help="skip records with mapping quality below INT [0]")
    p.add_argument("-q", "--min-BQ", dest="min_bq", type=int, default=0, metavar="INT",
                   help="skip bases with base quality below INT [0] (reads the qualities too)")
    p.add_argument("-g", dest="include", type=parse_flags, action="append", default=[], metavar="FLAGS",
                   help="remove FLAGS from the default exclude set [UNMAP,SECONDARY,QCFAIL,DUP]")
    p.add_argument("-G", "--excl-flags", dest="exclude", type=parse_flags, action="append", default=[],
                   metavar="FLAGS", help="add FLAGS to the exclude set")
    p.add_argument("-J", dest="deletions", action="store_true", help="count deletions (D) in the depth")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the depth over the region (-r) as a PNG")
    p.add_argument("-@", "--threads", type=int, default=2)
    add_store_options(p, write=False)
    add_snapshot_option(p)
    p.set_defaults(func=cmd_depth)


def cmd_depth(args, argv) -> int:
    from bams3core.regions import MAX_END

    from .cli import _open_dataset, _open_output
    from .errors import InputError
    from .output import check_writable

    if args.plot and not args.region:
        raise InputError("--plot needs -r REGION (the region to draw)")
    for path in (args.output, args.plot):
        check_writable(path)
    exclude = DEFAULT_EXCLUDE
    for f in args.include:
        exclude &= ~f
    for f in args.exclude:
        exclude |= f
    ds = _open_dataset(args)
    region = ds.parse_region(args.region) if args.region else None
    if region is not None and region.ref_id < 0:
        raise InputError(f"cannot parse region \"{args.region}\" (depth needs a reference)")
    plot = None
    if args.plot:
        length = int(ds.manifest.references[region.ref_id]["length"])
        hi = min(region.end, length) if region.end != MAX_END else length
        plot = _Plot(args.region, region.beg, max(hi, region.beg + 1))
    out = _open_output(args.output, "w") if args.output and args.output != "-" else sys.stdout
    try:
        run_depth(ds, region, out.write, all_pos=args.all_pos, exclude=exclude, min_mq=args.min_mq,
                  min_bq=args.min_bq, deletions=args.deletions, plot=plot)
        out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    if plot is not None:
        plot.save(args.plot)
    return 0
