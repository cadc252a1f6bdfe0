"""Leaving bams3: SAM, BAM or CRAM chosen by the output's extension, and SAM text for wide
records (format v1.1), which neither BAM nor CRAM 3 can hold.

Wide records are printed by htslib's own formatter like any other: each is fed to pysam as a
*proxy* BAM record (the same bytes with pos, next_pos and tlen set to 0; bin, flag, name,
CIGAR, sequence, qualities and tags untouched) and the three columns POS, PNEXT and TLEN of
the text are then replaced by the true 64-bit values. Nothing else in a SAM line depends on
them, so the text is what `samtools view` prints for the same data.
"""

from __future__ import annotations

import os
from collections import deque
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from bams3core.bam import BamHeader, RecordBatch, to_bam_layout

from .errors import InputError
from .output import iter_segments, write_bam, write_sam

EXPORT_FORMATS = {".sam": "sam", ".bam": "bam", ".cram": "cram"}


def export_format(path: str) -> str:
    """'sam', 'bam' or 'cram' from the output name ('-' is BAM, as before)."""
    if path == "-":
        return "bam"
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXPORT_FORMATS:
        raise InputError(f"{path}: unknown output format; name it .sam, .bam or .cram")
    return EXPORT_FORMATS[ext]


def refuse_wide(fmt: str) -> InputError:
    """The one-line refusal to write a v1.1 dataset (positions >= 2^31) as BAM or CRAM."""
    if fmt == "cram":
        return InputError("this dataset has positions or lengths beyond 2^31-1 (format v1.1), which CRAM 3.1 "
                          "cannot store either; export to a .sam file instead")
    return InputError("this dataset has positions or lengths beyond 2^31-1 (format v1.1), which BAM cannot "
                      "store; export to a .sam file instead")


# -- wide records as SAM ---------------------------------------------------------------------
def narrow_proxy(batch: RecordBatch) -> tuple[RecordBatch, np.ndarray, np.ndarray, np.ndarray]:
    """Stand-in BAM records for ``batch`` (:func:`bams3core.bam.to_bam_layout` with positions
    zeroed; a BAM-layout batch is its own stand-in) and the true pos, next_pos, tlen."""
    fx = batch.fixed()
    values = tuple(fx[k].astype(np.int64) for k in ("pos", "next_pos", "tlen"))
    return (to_bam_layout(batch, zero_positions=True),) + values


def _patch(line: str, pos: int, npos: int, tlen: int) -> str:
    f = line.split("\t", 9)
    f[3], f[7], f[8] = str(pos + 1), str(npos + 1), str(tlen)
    return "\t".join(f)


def iter_wide_sam(header: BamHeader, batches: Iterable[RecordBatch], *, with_header: bool,
                  pg_line: str | None = None) -> Iterator[tuple[str, int]]:
    """SAM text (header first if asked) of wide records, in pieces: (text, records in it)."""
    values: deque = deque()  # (pos, npos, tlen) per proxy batch, in feeding order

    def proxies():
        for b in batches:
            nb, pos, npos, tlen = narrow_proxy(b)
            values.append((pos.tolist(), npos.tolist(), tlen.tolist()))
            yield nb

    for af in iter_segments(header, proxies()):
        if with_header:
            yield str(af.header) + (pg_line + "\n" if pg_line else ""), 0
        cur, i, buf = ([], [], []), 0, []
        for rec in af:
            while i == len(cur[0]):
                cur, i = values.popleft(), 0
            buf.append(_patch(rec.to_string(), cur[0][i], cur[1][i], cur[2][i]))
            i += 1
            if len(buf) >= 4096:
                yield "\n".join(buf) + "\n", len(buf)
                buf = []
        if buf:
            yield "\n".join(buf) + "\n", len(buf)


def write_sam_any(header: BamHeader, batches: Iterable[RecordBatch], out: BinaryIO, *, wide: bool,
                  with_header: bool, pg_line: str | None = None) -> int:
    """`samtools view [-h]` text of the records, wide (v1.1) or not; returns the record count."""
    if not wide:
        return write_sam(header, batches, out, with_header=with_header, pg_line=pg_line)
    n = 0
    for piece, k in iter_wide_sam(header, batches, with_header=with_header, pg_line=pg_line):
        out.write(piece.encode("utf-8", errors="surrogateescape"))
        n += k
    return n


# -- export ----------------------------------------------------------------------------------
def write_cram(header: BamHeader, batches: Iterable[RecordBatch], path: str, *, reference: str | None,
               threads: int = 2, index: bool = True) -> int:
    """Write CRAM to ``path``: against ``reference`` (FASTA), or without one (sequences stored
    verbatim: ``no_ref``), so no reference is ever fetched over the network."""
    import pysam

    n = 0
    kw = {"reference_filename": reference} if reference else {"format_options": [b"no_ref=1"]}
    for af in iter_segments(header, batches):
        with pysam.AlignmentFile(path, "wc", header=af.header, threads=max(1, threads), **kw) as out:
            for rec in af:
                out.write(rec)
                n += 1
    if index and path != "-":
        pysam.index(path)
    return n


def export(ds, batches: Iterable[RecordBatch], path: str, *, reference: str | None = None, threads: int = 2,
           index: bool = True) -> int:
    """Write the records to ``path`` in the format its extension names (see :func:`export_format`)."""
    fmt = export_format(path)
    if ds.wide and fmt != "sam":
        raise refuse_wide(fmt)
    if reference and fmt != "cram":
        raise InputError("--reference only applies to a .cram output")
    header = ds.bam_header()
    if fmt == "sam":
        with open(path, "wb") as f:
            return write_sam_any(header, batches, f, wide=ds.wide, with_header=True)
    if fmt == "cram":
        return write_cram(header, batches, path, reference=reference, threads=threads, index=index)
    return write_bam(header, batches, path, threads=threads, index=index)
