"""Render records as samtools would: SAM text via htslib's own formatter, or BAM (+ .bai).

Raw records are streamed as an uncompressed BAM through a pipe into pysam, so the text is
produced by ``sam_format1`` — the code `samtools view` runs — and matches it byte for byte.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import threading
from typing import BinaryIO, Iterable, Iterator

from bams3core.bam import BamHeader, RecordBatch

from .errors import InputError, StoreError

_F_SETPIPE_SZ = 1031


class _Feeder:
    """Writes header + records into a pipe from a daemon thread; pysam reads the other end.

    The thread never outlives its reader: :meth:`stop` (called whenever the reading side ends,
    normally or not) closes the read end, so a write blocked on a full pipe fails with EPIPE
    at once, and no further batch is fetched."""

    def __init__(self, header: BamHeader, batches: Iterable[RecordBatch]):
        self.r, self.w = os.pipe()
        try:
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass
        self.error: BaseException | None = None
        self.reader = os.fdopen(self.r, "rb")
        self._stopped = threading.Event()
        self._batches = batches
        # write the header before pysam opens the pipe (opening blocks until it is read)
        self._head = header.to_bytes()
        self.thread = threading.Thread(target=self._run, name="bams3-feeder", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            with os.fdopen(self.w, "wb", buffering=1 << 20) as f:
                f.write(self._head)
                for b in self._batches:
                    if self._stopped.is_set():
                        break
                    f.write(b.raw())
        except BrokenPipeError:
            pass  # the reader stopped early; it reports why
        except BaseException as e:  # re-raised in the reading thread
            self.error = e
        finally:
            close = getattr(self._batches, "close", None)
            if close is not None:  # a generator: release its fetch threads now
                try:
                    close()
                except Exception:  # noqa: BLE001 - the reader's error (or none) is the one to report
                    pass

    def stop(self):
        """Close the read end (pysam holds its own duplicate): the writer cannot block."""
        self._stopped.set()
        self.reader.close()

    def finish(self, timeout: float | None = None):
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def open_segments(header: BamHeader, batches: Iterable[RecordBatch]) -> Iterator:
    """A pysam.AlignmentFile reading the records (iterate it for AlignedSegments).

    On leaving the block the feeding thread is stopped and joined; its error (a failed fetch,
    a corrupt block) wins over the reader's (which only sees the pipe end early)."""
    import pysam

    feeder = _Feeder(header, batches)
    ok = False
    try:
        with pysam.AlignmentFile(feeder.reader, "rb", check_sq=False) as af:
            yield af
        ok = True
    finally:
        feeder.stop()
        # read to the end: the feeder is done or about to be; stopped early: it ends at its
        # next write (EPIPE) or batch, or once the fetch in progress returns
        feeder.finish(None if ok else 5.0)


def iter_segments(header: BamHeader, batches: Iterable[RecordBatch]):
    """Yield (once) a pysam.AlignmentFile over the records; see :func:`open_segments`."""
    with open_segments(header, batches) as af:
        yield af


def stdout_closed() -> bool:
    """True if standard output is a pipe or socket whose reader has gone away (`| head`)."""
    try:
        p = select.poll()
        p.register(1, 0)  # POLLERR and POLLHUP are always reported
        return any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in p.poll(0))
    except (OSError, ValueError):
        return False


def check_writable(path: str | None) -> None:
    """Fail now, in one line, if the output ``path`` cannot be created or written — before
    any work (an existing file is opened without truncating; a new one is created and removed)."""
    if not path or path == "-":
        return
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            created = True
        except FileExistsError:
            fd = os.open(path, os.O_WRONLY)
            created = False
        os.close(fd)
        if created:
            os.unlink(path)
    except OSError as e:
        raise cannot_write(path, e) from None


def cannot_write(path: str, e: OSError) -> InputError:
    """The one-line error for an output that cannot be opened for writing."""
    parent = os.path.dirname(os.path.abspath(path))
    if e.errno == errno.ENOENT and not os.path.isdir(parent):
        why = f"directory {parent} does not exist"
    elif e.errno == errno.ENOTDIR:
        why = f"a component of {parent} is a file, not a directory"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = f"{e.strerror} ({path if os.path.exists(path) else parent} is not writable)"
    else:
        why = e.strerror or _one_line(e)
    return InputError(f"{path}: cannot write the output: {why}")


def write_sam(header: BamHeader, batches: Iterable[RecordBatch], out: BinaryIO, *, with_header: bool,
              pg_line: str | None = None) -> int:
    """Write SAM text like `samtools view [-h]`; returns the record count.

    A closed ``out`` raises BrokenPipeError (the CLI ends quietly, as samtools does); any other
    write failure is a one-line StoreError."""
    def emit(text: str) -> None:
        try:
            out.write(text.encode("utf-8", errors="surrogateescape"))
        except BrokenPipeError:
            raise
        except OSError as e:
            name = getattr(out, "name", "output")
            where = "standard output" if name == "<stdout>" else name
            raise StoreError(f"{where}: write failed: {e.strerror or e}") from None

    n = 0
    with open_segments(header, batches) as af:
        if with_header:
            # pysam's text of a header without @SQ lines gains a blank line; samtools prints it verbatim
            text = str(af.header) if header.references else header.text
            if "\0" in header.text:
                text = _samtools_header_text(header)
            if pg_line:
                text += pg_line + "\n"
            emit(text)
        buf = []
        for rec in af:
            buf.append(rec.to_string())
            n += 1
            if len(buf) >= 4096:
                emit("\n".join(buf) + "\n")
                buf = []
        if buf:
            emit("\n".join(buf) + "\n")
    return n


def write_bam(header: BamHeader, batches: Iterable[RecordBatch], path: str, *, threads: int = 2,
              index: bool = True, pg_line: str | None = None) -> int:
    """Write a BGZF-compressed BAM to ``path`` ('-' for stdout); index it unless writing to stdout.

    htslib's own messages are silenced: a failure is one line (InputError if ``path`` cannot be
    opened, StoreError if a write fails), and a closed stdout raises BrokenPipeError."""
    import pysam

    n = 0
    verbosity = pysam.set_verbosity(0)
    try:
        if "\0" in header.text:
            n = _write_bam_verbatim(header, batches, path, pg_line)
        else:
            with open_segments(header, batches) as af:
                hdr = af.header
                if pg_line:
                    hdr = pysam.AlignmentHeader.from_text(str(af.header) + pg_line + "\n")
                try:
                    out = pysam.AlignmentFile(path, "wb", header=hdr, threads=max(1, threads))
                except OSError as e:
                    raise cannot_write(path, e) from None
                written = False
                try:
                    for rec in af:
                        try:
                            out.write(rec)
                        except OSError as e:
                            raise _write_error(path, e) from None
                        n += 1
                    written = True
                finally:
                    try:
                        out.close()
                    except OSError as e:
                        if written:  # else an error is on its way: do not mask it
                            raise _write_error(path, e) from None
        if index and path != "-":
            try:
                write_index(path, header)
            except pysam.SamtoolsError as e:
                raise StoreError(f"{path}: cannot write the index: {_one_line(e)}") from None
    finally:
        pysam.set_verbosity(verbosity)
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


def _write_error(path: str, e: OSError) -> Exception:
    # htslib does not say why a write failed (errno is stale): a closed stdout is told by poll()
    if path == "-" and stdout_closed():
        return BrokenPipeError(errno.EPIPE, "standard output is closed")
    where = "standard output" if path == "-" else path
    return StoreError(f"{where}: writing the BAM failed ({_one_line(e)}; disk full?)")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def count_records(batches: Iterable[RecordBatch]) -> int:
    return sum(len(b) for b in batches)
