"""SAM input with 64-bit positions (format v1.1): parsed by htslib, carried as wide records.

htslib (>= 1.10) parses SAM positions, mate positions, TLEN and reference lengths as 64-bit
values, but its BAM encoder refuses anything outside the i32 range, so the ordinary SAM path
(:mod:`bams3.tobam`, uncompressed BAM on a pipe) cannot carry such data. A SAM whose header
declares a reference of length >= 2^31 takes this path instead: a child process reads it with
htslib's own parser (``sam_read1``, through ctypes on pysam's bundled htslib) and writes
**wide records** (:data:`bams3core.bam.WIDE_FIXED_DTYPE`: BAM's layout with i64 pos,
next_pos and tlen; name, CIGAR, sequence, qualities and tags exactly as htslib encodes them
for BAM) on a pipe. The dataset is then written as format v1.1 (docs/FORMAT.md §11).

Pipe protocol (internal, child -> parent): ``B3W\\x01``, i32 l_text, text, i32 n_ref, then per
reference i32 l_name, name with NUL, i64 length; then wide records, each with its i32
block_size prefix, back to back.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import threading
from typing import BinaryIO

from bams3core.bam import WIDE_MAX_POS, BamHeader, Reference

from .errors import InputError
from .inputs import AlignmentInput, _Chain, _read_exact

WIDE_MAGIC = b"B3W\x01"
WIDE_REFERENCE_LENGTH = 1 << 31  # a SAM header with a reference at least this long is read wide
MAX_HEADER_BYTES = 1 << 30       # a SAM header larger than this is not a header (bounded peek)
_CORE = struct.Struct("<qiHBBHHIiiqqQQi")  # bam1_t: core (48 bytes), id, data, l_data
_WIDE_FIXED = struct.Struct("<iiqBBHHHiiqq")  # block_size + the 44-byte wide fixed part


# -- parent side ---------------------------------------------------------------------------
def header_needs_wide(header_text: bytes) -> bool:
    """True if an @SQ line declares LN >= 2^31 (records may then lie beyond BAM's i32 range)."""
    for line in header_text.split(b"\n"):
        if line.startswith(b"@SQ\t"):
            for f in line.rstrip(b"\r").split(b"\t")[1:]:
                if f.startswith(b"LN:") and f[3:].isdigit() and int(f[3:]) >= WIDE_REFERENCE_LENGTH:
                    return True
    return False


def peek_sam_header(stream: BinaryIO) -> tuple[bytes, BinaryIO]:
    """Read the SAM header lines at the start of ``stream``; return them and a stream that
    yields every byte again (header included). Reads one line past the header at most."""
    lines = []
    size = 0
    while size <= MAX_HEADER_BYTES:
        line = stream.readline()
        lines.append(line)
        size += len(line)
        if not line.startswith(b"@"):
            break
    header = b"".join(x for x in lines if x.startswith(b"@"))
    return header, io.BufferedReader(_Chain(b"".join(lines), stream), buffer_size=1 << 20)


def open_if_wide(stream: BinaryIO, name: str, path: str | None):
    """For a SAM input: (AlignmentInput of wide records, None) if its header needs format v1.1,
    else (None, a stream equivalent to ``stream``) for the ordinary path."""
    header, stream = peek_sam_header(stream)
    if not header_needs_wide(header):
        return None, stream
    if path is not None:
        stream.close()
        stream = None
    return open_wide_sam(stream, name, path), None


def bgzf_sam_needs_wide(path: str) -> bool:
    """The same test for a bgzipped SAM file (its header is read through gzip)."""
    import gzip

    try:
        with gzip.open(path, "rb") as f:
            header, _ = peek_sam_header(f)
    except (OSError, EOFError):
        return False  # not plain gzip: leave it to htslib, which reports the problem
    return header_needs_wide(header)


def _read_header(f: BinaryIO) -> BamHeader | None:
    """The child's header (None if the pipe ended first: the child failed)."""
    head = _read_exact(f, 8)
    if len(head) < 8:
        return None
    if head[:4] != WIDE_MAGIC:
        raise InputError("internal error: unexpected output from the SAM reader")
    (l_text,) = struct.unpack_from("<i", head, 4)
    text = _read_exact(f, l_text)
    (n_ref,) = struct.unpack("<i", _read_exact(f, 4))
    refs = []
    for _ in range(n_ref):
        (l_name,) = struct.unpack("<i", _read_exact(f, 4))
        rname = _read_exact(f, l_name)[:-1].decode("utf-8", errors="surrogateescape")
        (length,) = struct.unpack("<q", _read_exact(f, 8))
        refs.append(Reference(rname, length))
    return BamHeader(text.decode("utf-8", errors="surrogateescape"), refs)


def open_wide_sam(stream: BinaryIO | None, name: str, path: str | None):
    """Run the wide SAM reader child on ``path`` (or on ``stream`` fed to its stdin)."""
    cmd = [sys.executable, "-m", "bams3.widesam", path or "-"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if path is None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if path is None:
        def feed():
            try:
                while True:
                    chunk = stream.read(1 << 20)
                    if not chunk:
                        break
                    proc.stdin.write(chunk)
            except (BrokenPipeError, ValueError, OSError):
                pass
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    pass

        threading.Thread(target=feed, daemon=True).start()
    err_box: list[bytes] = []
    errt = threading.Thread(target=lambda: err_box.append(proc.stderr.read()), daemon=True)
    errt.start()

    def check():
        if proc.wait() != 0:
            errt.join()
            msg = (err_box[0] if err_box else b"").decode(errors="replace").strip().splitlines()
            line = msg[-1] if msg else f"the SAM reader failed (exit {proc.returncode})"
            raise InputError(f"{name}: {line}")

    def close():
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    header = _read_header(proc.stdout)
    if header is None:
        check()
        raise InputError(f"{name}: empty input")

    def data():
        yield from iter(lambda: proc.stdout.read(1 << 20), b"")

    return AlignmentInput(header, data(), b"", name, on_close=close, check_complete=check, wide=True)


# -- child side ----------------------------------------------------------------------------
def _htslib():
    """pysam's bundled htslib, through ctypes (the same library pysam itself uses)."""
    import ctypes

    import pysam.libchtslib as mod

    lib = ctypes.CDLL(mod.__file__)
    vp, cp, ci = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    for fn, res, args in (("hts_open", vp, [cp, cp]), ("hts_close", ci, [vp]), ("sam_hdr_read", vp, [vp]),
                          ("sam_hdr_destroy", None, [vp]), ("sam_hdr_str", cp, [vp]), ("sam_hdr_nref", ci, [vp]),
                          ("sam_hdr_tid2name", cp, [vp, ci]), ("sam_hdr_tid2len", ctypes.c_int64, [vp, ci]),
                          ("bam_init1", vp, []), ("bam_destroy1", None, [vp]), ("sam_read1", ci, [vp, vp, vp]),
                          ("hts_set_log_level", None, [ci])):
        f = getattr(lib, fn)
        f.restype = res
        f.argtypes = args
    return lib


class _Fail(Exception):
    pass


def _write_wide(src: str, out: BinaryIO) -> int:
    """Read SAM ``src`` (a path or '-') with htslib; write the header and wide records."""
    import ctypes

    lib = _htslib()
    lib.hts_set_log_level(0)
    fp = lib.hts_open(src.encode(), b"r")
    if not fp:
        raise _Fail("cannot open the input")
    hdr = b = None
    try:
        hdr = lib.sam_hdr_read(fp)
        if not hdr:
            raise _Fail("malformed SAM header")
        text = lib.sam_hdr_str(hdr) or b""
        parts = [WIDE_MAGIC, struct.pack("<i", len(text)), text, struct.pack("<i", lib.sam_hdr_nref(hdr))]
        for tid in range(lib.sam_hdr_nref(hdr)):
            rname = lib.sam_hdr_tid2name(hdr, tid) + b"\0"
            parts += [struct.pack("<i", len(rname)), rname, struct.pack("<q", lib.sam_hdr_tid2len(hdr, tid))]
        out.write(b"".join(parts))
        b = lib.bam_init1()
        string_at, read1, unpack, pack = ctypes.string_at, lib.sam_read1, _CORE.unpack, _WIDE_FIXED.pack
        buf, size, n = [], 0, 0
        while True:
            r = read1(fp, hdr, b)
            if r < 0:
                if r < -1:
                    raise _Fail(f"malformed SAM record after record {n} (htslib error {r})")
                break
            (pos, tid, bin_, mapq, extranul, flag, l_qname, n_cigar, l_seq, mtid, mpos, isize,
             _id, data, l_data) = unpack(string_at(b, _CORE.size))
            if n_cigar > 0xFFFF:
                raise _Fail(f"record {n + 1} has {n_cigar} CIGAR operations; more than 65535 are not "
                            "supported with positions beyond 2^31")
            if pos > WIDE_MAX_POS or mpos > WIDE_MAX_POS:
                raise _Fail(f"record {n + 1}: position {max(pos, mpos) + 1} is beyond the largest "
                            f"supported ({WIDE_MAX_POS + 1})")
            raw = string_at(data, l_data)
            l_name = l_qname - extranul
            rec = pack(44 + l_data - extranul, tid, pos, l_name, mapq, bin_, n_cigar, flag, l_seq,
                       mtid, mpos, isize) + raw[:l_name] + raw[l_qname:]
            buf.append(rec)
            size += len(rec)
            n += 1
            if size >= 1 << 20:
                out.write(b"".join(buf))
                buf, size = [], 0
        out.write(b"".join(buf))
        return n
    finally:
        if b:
            lib.bam_destroy1(b)
        if hdr:
            lib.sam_hdr_destroy(hdr)
        lib.hts_close(fp)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bams3.widesam FILE|-", file=sys.stderr)
        return 2
    try:
        _write_wide(argv[0], sys.stdout.buffer)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        return 1
    except _Fail as e:
        print(f"cannot parse input: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
