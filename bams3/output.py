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
            if "\0" in header.text:
                text = _samtools_header_text(header)
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
    if "\0" in header.text:
        n = _write_bam_verbatim(header, batches, path, pg_line)
    else:
        for af in iter_segments(header, batches):
            hdr = af.header
            if pg_line:
                hdr = pysam.AlignmentHeader.from_text(str(af.header) + pg_line + "\n")
            with pysam.AlignmentFile(path, "wb", header=hdr, threads=max(1, threads)) as out:
                for rec in af:
                    out.write(rec)
                    n += 1
    if index and path != "-":
        write_index(path, header)
    return n


def _samtools_header_text(header: BamHeader) -> str:
    """What `samtools view -H` prints for this header: htslib repairs a header holding NUL
    bytes in ways pysam's text of it does not show. A header-only BAM, through samtools."""
    import tempfile

    import pysam

    with tempfile.TemporaryDirectory(prefix="bams3-hdr-") as d:
        path = os.path.join(d, "h.bam")
        _write_bam_verbatim(header, [], path, None)
        return pysam.samtools.view("--no-PG", "-H", path)


BAI_MAX_POS = 1 << 29  # BAI bins cover positions below 2**29 (SAM spec §5.3)


def write_index(path: str, header: BamHeader) -> str:
    """``samtools index`` the BAM: a .bai, or a .csi (``samtools index -c``) if a reference is
    longer than a BAI can address. A stale index of the other kind is removed."""
    import pysam

    csi = any(r.length > BAI_MAX_POS for r in header.references)
    made, stale = (path + ".csi", path + ".bai") if csi else (path + ".bai", path + ".csi")
    if os.path.exists(stale):
        os.unlink(stale)
    if csi:
        pysam.index("-c", path)
    else:
        pysam.index(path)
    return made


def _write_bam_verbatim(header: BamHeader, batches: Iterable[RecordBatch], path: str, pg_line: str | None) -> int:
    """The header bytes as they are (htslib would rewrite a header holding NUL bytes, and read
    the rewritten one differently), then the raw records, BGZF-compressed."""
    import pysam

    if pg_line:
        text = header.text.rstrip("\0")
        header = BamHeader(text + pg_line + "\n" + header.text[len(text):], header.references)
    n = 0
    with pysam.BGZFile(path if path != "-" else "/dev/stdout", "wb") as out:
        out.write(header.to_bytes())
        for b in batches:
            out.write(bytes(b.raw()))
            n += len(b)
    return n


def count_records(batches: Iterable[RecordBatch]) -> int:
    return sum(len(b) for b in batches)
