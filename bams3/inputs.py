"""Open an alignment input (BAM, SAM, CRAM, file or stdin) as a stream of raw record batches.

BAM is read directly: BGZF blocks are inflated in parallel (zlib releases the GIL) and the
records are split without decoding them. SAM and CRAM go through htslib (pysam) in a child
process that emits uncompressed BAM on a pipe, so parsing runs on the second core.
Nothing is read whole into memory.
"""

from __future__ import annotations

import io
import itertools
import struct
import subprocess
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Iterator

import numpy as np

from bams3core.bam import BamFormatError, BamHeader, RecordBatch, parse_header, split_records

from .errors import InputError

try:  # ISA-L's inflate is 2-3x faster than zlib's, and releases the GIL the same way
    from isal import isal_zlib as _inflate_lib
except ImportError:  # pragma: no cover - isal has wheels for the usual platforms
    _inflate_lib = zlib

BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")
_GZ_MAGIC = b"\x1f\x8b"


class _Chain(io.RawIOBase):
    """``head`` bytes followed by the rest of ``f``."""

    def __init__(self, head: bytes, f: BinaryIO):
        self._head = head
        self._f = f

    def readable(self):
        return True

    def readinto(self, b):
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._f.read(len(b))
        b[:len(data)] = data
        return len(data)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = f.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


class BgzfReader:
    """Iterates the decompressed contents of a BGZF stream, inflating blocks in parallel."""

    READ_BYTES = 1 << 20  # compressed bytes read at a time (block headers are parsed from them)

    def __init__(self, f: BinaryIO, threads: int = 2, group: int = 16, name: str = "input",
                 read_bytes: int = READ_BYTES):
        self.f = f
        self.read_bytes = read_bytes
        self.name = name
        self.group = group
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="bgzf")
        self.saw_eof_marker = False
        self.compressed_bytes = 0
        self._buf = b""
        self._pos = 0

    def _fill(self, need: int) -> int:
        """Make ``need`` unparsed bytes available if the stream has them; returns how many are."""
        have = len(self._buf) - self._pos
        if have >= need:
            return have
        parts = [self._buf[self._pos:]]
        while have < need:
            data = self.f.read(max(need - have, self.read_bytes))
            if not data:
                break
            parts.append(data)
            have += len(data)
        self._buf = b"".join(parts)
        self._pos = 0
        return have

    def _next_blocks(self) -> list[bytes]:
        blocks = []
        for _ in range(self.group):
            have = self._fill(18)
            if not have:
                break
            buf, p = self._buf, self._pos
            if have < 18 or buf[p:p + 2] != _GZ_MAGIC:
                raise InputError(f"{self.name}: truncated or corrupt BGZF block (is this a BAM file?)")
            if not buf[p + 3] & 4:
                raise InputError(f"{self.name}: gzip data that is not BGZF; recompress with bgzip or samtools")
            (xlen,) = struct.unpack_from("<H", buf, p + 10)
            have = self._fill(12 + xlen)
            buf, p = self._buf, self._pos
            extra = buf[p + 12:p + min(have, 12 + xlen)]
            bsize = None
            q = 0
            while q + 4 <= len(extra):
                si1, si2, slen = extra[q], extra[q + 1], struct.unpack_from("<H", extra, q + 2)[0]
                if si1 == 66 and si2 == 67 and slen == 2:
                    bsize = struct.unpack_from("<H", extra, q + 4)[0]
                q += 4 + slen
            if bsize is None:
                raise InputError(f"{self.name}: gzip data that is not BGZF (no BC field)")
            rest_len = bsize + 1 - 12 - xlen
            total = 12 + xlen + max(rest_len, 0)
            if self._fill(total) < total:
                raise InputError(f"{self.name}: truncated BGZF block (file cut short?)")
            self.compressed_bytes += 12 + xlen + rest_len
            blocks.append(self._buf[self._pos:self._pos + total])
            self._pos += total
        return blocks

    @staticmethod
    def _inflate(block: bytes) -> bytes:
        xlen = struct.unpack_from("<H", block, 10)[0]
        cdata = block[12 + xlen:-8]
        crc, isize = struct.unpack_from("<II", block, len(block) - 8)
        try:
            data = _inflate_lib.decompress(cdata, -15)
        except _inflate_lib.error:
            raise ValueError("corrupt deflate data") from None
        if len(data) != isize or _inflate_lib.crc32(data) != crc:
            raise ValueError("CRC mismatch")
        return data

    @classmethod
    def _inflate_all(cls, blocks: list[bytes]) -> bytes:
        return b"".join([cls._inflate(b) for b in blocks])

    TASK_BLOCKS = 8  # blocks inflated per task: few futures, yet a slow thread holds up little

    def _submit(self, blocks: list[bytes]) -> list:
        """Inflate ``blocks`` as tasks of about TASK_BLOCKS consecutive blocks (in order)."""
        k = max(self.threads, -(-len(blocks) // self.TASK_BLOCKS))
        k = min(k, len(blocks))
        cut = [len(blocks) * i // k for i in range(k + 1)]
        return [self.pool.submit(self._inflate_all, blocks[cut[i]:cut[i + 1]]) for i in range(k)]

    def chunks(self) -> Iterator[bytes]:
        """Yields decompressed data in pieces of about ``group`` blocks."""
        pending = None
        try:
            while True:
                blocks = self._next_blocks()
                if not blocks:
                    break
                futs = self._submit(blocks)
                if pending is not None:
                    yield self._collect(pending)
                pending = (futs, blocks)
            if pending is not None:
                yield self._collect(pending)
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _collect(self, pending) -> bytes:
        futs, blocks = pending
        try:
            parts = [f.result() for f in futs]
        except ValueError as e:
            raise InputError(f"{self.name}: corrupt BGZF block ({e})") from None
        self.saw_eof_marker = blocks[-1] == BGZF_EOF
        return parts[0] if len(parts) == 1 else b"".join(parts)


class AlignmentInput:
    """Header plus an iterator of :class:`RecordBatch` of about ``batch_bytes`` each."""

    def __init__(self, header: BamHeader, data_iter: Iterator[bytes], leftover: bytes, name: str,
                 on_close=None, check_complete=None, wide: bool = False):
        self.header = header
        self.wide = wide  # wide records (bams3.widesam): the dataset is format v1.1
        self._iter = data_iter
        self._buf = leftover
        self.name = name
        self._on_close = on_close
        self._check_complete = check_complete

    def batches(self, batch_bytes: int = 4 << 20) -> Iterator[RecordBatch]:
        buf, self._buf = self._buf, b""  # (not kept for the whole input)
        pieces, size = [buf] if buf else [], len(buf)
        n = 0
        for piece in self._iter:
            pieces.append(piece)
            size += len(piece)
            del piece
            if size < batch_bytes:
                continue
            buf = pieces[0] if len(pieces) == 1 else b"".join(pieces)  # one copy, not one per piece
            pieces.clear()
            batch, buf = self._split(buf)
            pieces, size = ([buf] if buf else []), len(buf)
            if batch is not None:
                n = self._check_refs(batch, n)
                yield batch
                del batch
        buf = b"".join(pieces)
        pieces.clear()
        while buf:
            batch, rest = self._split(buf)
            if batch is None:
                raise InputError(f"{self.name}: truncated BAM record at end of input (file cut short?)")
            buf = rest
            n = self._check_refs(batch, n)
            yield batch
        if self._check_complete:
            self._check_complete()

    def _check_refs(self, batch: RecordBatch, before: int) -> int:
        """Every refID and next refID names a reference of the header (or is -1)."""
        fx = batch.fixed()
        n_ref = len(self.header.references)
        for col, what in (("refid", "reference"), ("next_refid", "mate reference")):
            v = fx[col]
            bad = np.flatnonzero((v < -1) | (v >= n_ref))
            if len(bad):
                i = int(bad[0])
                raise InputError(f"{self.name}: record {before + i + 1}: {what} id {int(v[i])} is not in the header "
                                 f"(it has {n_ref} @SQ reference{'s' if n_ref != 1 else ''})")
        return before + len(batch)

    def _split(self, buf: bytes):
        try:
            offs, end = split_records(buf)
        except BamFormatError as e:
            raise InputError(f"{self.name}: {e}") from None
        if len(offs) == 1:
            return None, buf
        return RecordBatch(buf, offs, self.wide), buf[end:]

    def close(self):
        if self._on_close:
            self._on_close()


def _header_from(data_iter: Iterator[bytes], name: str) -> tuple[BamHeader, bytes]:
    buf = b""
    for piece in data_iter:
        buf += piece
        try:
            res = parse_header(buf)
        except BamFormatError as e:
            raise InputError(f"{name}: {e}") from None
        if res is not None:
            header, used = res
            return header, buf[used:]
    if not buf:
        raise InputError(f"{name}: empty input")
    raise InputError(f"{name}: truncated BAM header")


def _is_bgzf(head: bytes) -> bool:
    """A gzip member with the BGZF ``BC`` extra subfield (SAM spec §4.1)."""
    if len(head) < 18 or not head[3] & 4:
        return False
    (xlen,) = struct.unpack_from("<H", head, 10)
    extra, p = head[12:12 + xlen], 0
    while p + 4 <= len(extra):
        if extra[p:p + 2] == b"BC" and struct.unpack_from("<H", extra, p + 2)[0] == 2:
            return True
        p += 4 + struct.unpack_from("<H", extra, p + 2)[0]
    return False


def _is_text(sample: bytes) -> bool:
    """UTF-8 (SAM allows it in names and tags), a multi-byte character cut at the end allowed."""
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.reason == "unexpected end of data" and e.start >= len(sample) - 3
    return b"\0" not in sample


def _sniff(head: bytes) -> str:
    if head.startswith(_GZ_MAGIC):
        return "bgzf" if _is_bgzf(head) else "gzip"
    if head.startswith(b"CRAM"):
        return "cram"
    if head.startswith(b"BAM\x01"):
        return "ubam"
    if not head:
        return "empty"
    sample = head[:4096]
    if not _is_text(sample):
        return "unknown"
    first = sample.split(b"\n", 1)[0]
    if first.startswith(b"@") or first.count(b"\t") >= 10:
        return "sam"
    return "unknown"


def open_input(source: str, *, reference: str | None = None, threads: int = 2,
               stdin: BinaryIO | None = None) -> AlignmentInput:
    """Open ``source`` (a path, or ``-`` for standard input) as an :class:`AlignmentInput`."""
    name = "stdin" if source == "-" else source
    if source == "-":
        f = stdin if stdin is not None else sys.stdin.buffer
    else:
        try:
            f = open(source, "rb")
        except FileNotFoundError:
            raise InputError(f"{source}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{source}: is a directory, expected a BAM/SAM/CRAM file") from None
        except PermissionError:
            raise InputError(f"{source}: permission denied") from None
    head = _read_exact(f, 4096)
    kind = _sniff(head)
    stream = io.BufferedReader(_Chain(head, f), buffer_size=1 << 20)

    if kind == "bgzf":
        bg = BgzfReader(stream, threads=threads, name=name)
        chunks = bg.chunks()
        first = next(chunks, b"")
        if first[:4] != b"BAM\x01":
            # bgzipped SAM: htslib parses it from the file, or the text we inflate from stdin
            if source == "-":
                return _via_htslib(itertools.chain([first], chunks), name, reference, threads, None)
            f.close()
            from .widesam import bgzf_sam_needs_wide, open_wide_sam
            if bgzf_sam_needs_wide(source):
                return open_wide_sam(None, name, source)
            return _via_htslib(None, name, reference, threads, source)

        held = [first]  # not a closure over `first`: the first piece is not kept for the whole input
        del first

        def data():
            yield held.pop()
            yield from chunks

        it = data()
        header, leftover = _header_from(it, name)

        def check():
            # samtools reads such a file with a warning; bams3 refuses it so that a truncated
            # file is never archived as if it were whole (README: fidelity)
            if not bg.saw_eof_marker:
                raise InputError(f"{name}: BAM ends without the BGZF EOF marker: the file is probably truncated "
                                 "(if it is complete, rewrite it with samtools view -b and convert that)")

        return AlignmentInput(header, it, leftover, name, on_close=f.close if source != "-" else None,
                              check_complete=check)
    if kind == "ubam":
        it = iter(lambda: stream.read(1 << 20), b"")
        header, leftover = _header_from(it, name)
        return AlignmentInput(header, it, leftover, name)
    if kind == "sam":  # positions beyond BAM's i32 range: read as wide records (format v1.1)
        from .widesam import open_if_wide
        wide, stream = open_if_wide(stream, name, None if source == "-" else source)
        if wide is not None:
            return wide
    if kind in ("sam", "cram", "gzip"):
        # SAM text, CRAM, and plain (non-BGZF) gzip, which htslib inflates as it reads
        if source != "-":
            return _via_htslib(None, name, reference, threads, source)
        return _via_htslib(iter(lambda: stream.read(1 << 20), b""), name, reference, threads, None)
    if kind == "empty":
        raise InputError(f"{name}: empty input")
    raise InputError(f"{name}: not a BAM, SAM or CRAM file")


def _via_htslib(pieces: Iterator[bytes] | None, name: str, reference: str | None, threads: int,
                path: str | None) -> AlignmentInput:
    """Parse SAM/CRAM with htslib in a child process that writes uncompressed BAM; the child
    reads ``path``, or ``pieces`` of the input fed to its standard input."""
    cmd = [sys.executable, "-m", "bams3.tobam"]
    if reference:
        cmd += ["--reference", reference]
    cmd += [path or "-"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if path is None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    feeder = None
    feed_err: list[InputError] = []  # the input broke while being fed (e.g. corrupt BGZF)
    if path is None:
        def feed():
            try:
                for chunk in pieces:
                    proc.stdin.write(chunk)
            except InputError as e:
                feed_err.append(e)
            except (BrokenPipeError, ValueError, OSError):
                pass
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
    err_box = []
    errt = threading.Thread(target=lambda: err_box.append(proc.stderr.read()), daemon=True)
    errt.start()

    def fail():
        proc.wait()
        errt.join()
        if feeder is not None:
            feeder.join()
        if feed_err:
            raise feed_err[0]
        msg = (err_box[0] if err_box else b"").decode(errors="replace").strip().splitlines()
        line = msg[-1] if msg else f"htslib could not parse the input (exit {proc.returncode})"
        raise InputError(f"{name}: {line}")

    bg = BgzfReader(proc.stdout, threads=1, name=name)  # the child writes level-0 BGZF

    def data():
        try:
            yield from bg.chunks()
        except InputError:
            if proc.wait() != 0:
                fail()
            raise
        if proc.wait() != 0:
            fail()

    it = data()
    try:
        header, leftover = _header_from(it, name)
    except InputError:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        errt.join(timeout=5)
        if err_box and err_box[0].strip():
            fail()
        raise

    def close():
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def check():
        if proc.wait() != 0:
            fail()
        if feeder is not None:
            feeder.join()
        if feed_err:
            raise feed_err[0]

    return AlignmentInput(header, it, leftover, name, on_close=close, check_complete=check)
