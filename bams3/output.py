"""Render records as samtools would: SAM text via htslib's own formatter, or BAM (+ .bai).

Raw records are streamed as an uncompressed BAM through a pipe into pysam, so the text is
produced by ``sam_format1`` — the code `samtools view` runs — and matches it byte for byte.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
from typing import BinaryIO, Iterable, Iterator

from bams3core.bam import BamHeader, RecordBatch

_F_SETPIPE_SZ = 1031


class _Feeder:
    """Writes header + records into a pipe from a thread; pysam reads the other end."""

    def __init__(self, header: BamHeader, batches: Iterable[RecordBatch]):
        self.r, self.w = os.pipe()
        try:
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass
        self.error: BaseException | None = None
        hbytes = header.to_bytes()
        self._batches = batches
        # write the header before pysam opens the pipe (opening blocks until it is read)
        self._head = hbytes
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            with os.fdopen(self.w, "wb", buffering=1 << 20) as f:
                f.write(self._head)
                for b in self._batches:
                    f.write(b.raw())
        except BrokenPipeError:
            pass
        except BaseException as e:  # re-raised in the reading thread
            self.error = e

    def finish(self):
        self.thread.join()
        if self.error is not None:
            raise self.error


def iter_segments(header: BamHeader, batches: Iterable[RecordBatch]):
    """Yield (pysam.AlignmentFile, iterator of AlignedSegment) for the records."""
    import pysam

    feeder = _Feeder(header, batches)
    try:
        with pysam.AlignmentFile(os.fdopen(feeder.r, "rb"), "rb", check_sq=False) as af:
            yield af
    finally:
        feeder.finish()


def write_sam(header: BamHeader, batches: Iterable[RecordBatch], out: BinaryIO, *, with_header: bool,
              pg_line: str | None = None) -> int:
    """Write SAM text like `samtools view [-h]`; returns the record count."""
    n = 0
    for af in iter_segments(header, batches):
        if with_header:
            # pysam's text of a header without @SQ lines gains a blank line; samtools prints it verbatim
            text = str(af.header) if header.references else header.text
            if pg_line:
                text += pg_line + "\n"
            out.write(text.encode("utf-8", errors="surrogateescape"))
        buf = []
        for rec in af:
            buf.append(rec.to_string())
            n += 1
            if len(buf) >= 4096:
                out.write(("\n".join(buf) + "\n").encode("utf-8", errors="surrogateescape"))
                buf = []
        if buf:
            out.write(("\n".join(buf) + "\n").encode("utf-8", errors="surrogateescape"))
    return n


def write_bam(header: BamHeader, batches: Iterable[RecordBatch], path: str, *, threads: int = 2,
              index: bool = True, pg_line: str | None = None) -> int:
    """Write a BGZF-compressed BAM to ``path`` ('-' for stdout); index it unless writing to stdout."""
    import pysam

    n = 0
    for af in iter_segments(header, batches):
        hdr = af.header
        if pg_line:
            hdr = pysam.AlignmentHeader.from_text(str(af.header) + pg_line + "\n")
        with pysam.AlignmentFile(path, "wb", header=hdr, threads=max(1, threads)) as out:
            for rec in af:
                out.write(rec)
                n += 1
    if index and path != "-":
        pysam.index(path)
    return n


def count_records(batches: Iterable[RecordBatch]) -> int:
    return sum(len(b) for b in batches)
