"""The BAM binary layout (SAM spec §4.2): header and records, as bytes and numpy views.

A :class:`RecordBatch` is the plain record model of bams3: a contiguous buffer of raw BAM
records (each with its 4-byte ``block_size`` prefix, exactly as in an uncompressed BAM
stream) plus their offsets. Keeping the records byte-for-byte as BAM encodes them is what
makes bams3 lossless by construction: every field, tag type and tag order, long CIGARs
(the ``CG`` tag), ``*`` sequence/quality and the ``bin`` field survive untouched.

Field access is vectorised with numpy, and the per-record/per-byte loops are compiled
(:mod:`bams3core.kernels`); nothing here does I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

# The compiled kernels (bams3core.kernels, numba) are imported where they are called: importing
# this module (every command does) must not import numba, which costs ~0.3 s even when cached.

BAM_MAGIC = b"BAM\x01"

# Fixed part of a record after block_size (32 bytes), SAM spec §4.2.
FIXED_DTYPE = np.dtype([
    ("refid", "<i4"), ("pos", "<i4"), ("l_read_name", "u1"), ("mapq", "u1"),
    ("bin", "<u2"), ("n_cigar_op", "<u2"), ("flag", "<u2"), ("l_seq", "<i4"),
    ("next_refid", "<i4"), ("next_pos", "<i4"), ("tlen", "<i4"),
])
FIXED_SIZE = FIXED_DTYPE.itemsize  # 32
assert FIXED_SIZE == 32

# The *wide* record (format v1.1, docs/FORMAT.md §11): BAM's layout with pos, next_pos and
# tlen widened to i64 (fixed part 44 bytes), for SAM data that BAM cannot hold. Same field
# names, so code reading ``fixed()`` works on either.
WIDE_FIXED_DTYPE = np.dtype([
    ("refid", "<i4"), ("pos", "<i8"), ("l_read_name", "u1"), ("mapq", "u1"),
    ("bin", "<u2"), ("n_cigar_op", "<u2"), ("flag", "<u2"), ("l_seq", "<i4"),
    ("next_refid", "<i4"), ("next_pos", "<i8"), ("tlen", "<i8"),
])
WIDE_FIXED_SIZE = WIDE_FIXED_DTYPE.itemsize  # 44
assert WIDE_FIXED_SIZE == 44

FLAG_PAIRED, FLAG_PROPER, FLAG_UNMAP, FLAG_MUNMAP = 0x1, 0x2, 0x4, 0x8
FLAG_REVERSE, FLAG_MREVERSE, FLAG_READ1, FLAG_READ2 = 0x10, 0x20, 0x40, 0x80
FLAG_SECONDARY, FLAG_QCFAIL, FLAG_DUP, FLAG_SUPPLEMENTARY = 0x100, 0x200, 0x400, 0x800

# CIGAR ops that consume the reference: M D N = X
_REF_CONSUMING = np.zeros(16, dtype=bool)
_REF_CONSUMING[[0, 2, 3, 7, 8]] = True
_I32 = struct.Struct("<i")


class BamFormatError(ValueError):
    """Bytes that do not follow the BAM layout."""


@dataclass
class Reference:
    name: str
    length: int


@dataclass
class BamHeader:
    text: str  # the SAM header text, verbatim
    references: list[Reference] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        """The BAM header block (magic, l_text, text, n_ref, references)."""
        text = self.text.encode("utf-8", errors="surrogateescape")
        parts = [BAM_MAGIC, struct.pack("<i", len(text)), text, struct.pack("<i", len(self.references))]
        for ref in self.references:
            name = ref.name.encode() + b"\0"
            parts.append(struct.pack("<i", len(name)))
            parts.append(name)
            parts.append(struct.pack("<I", min(ref.length, 0xFFFFFFFF)))  # u32; the text's LN keeps the rest
        return b"".join(parts)

    @property
    def ref_names(self) -> list[str]:
        return [r.name for r in self.references]


def parse_header(buf: bytes | memoryview) -> tuple[BamHeader, int] | None:
    """Parse a BAM header at the start of ``buf``.

    Returns (header, bytes consumed), or None if ``buf`` does not yet hold the whole header.
    Raises BamFormatError if the bytes are not a BAM header.
    """
    mv = memoryview(buf)
    if len(mv) < 4:
        return None
    if bytes(mv[:4]) != BAM_MAGIC:
        raise BamFormatError("not a BAM stream (bad magic)")
    if len(mv) < 8:
        return None
    (l_text,) = _I32.unpack_from(mv, 4)
    if l_text < 0:
        raise BamFormatError("corrupt BAM header (negative text length)")
    p = 8 + l_text
    if len(mv) < p + 4:
        return None
    # verbatim, NUL bytes included: htslib's reading of a header with NULs depends on where they are
    text = bytes(mv[8:p]).decode("utf-8", errors="surrogateescape")
    (n_ref,) = _I32.unpack_from(mv, p)
    if n_ref < 0:
        raise BamFormatError("corrupt BAM header (negative reference count)")
    p += 4
    refs = []
    for _ in range(n_ref):
        if len(mv) < p + 4:
            return None
        (l_name,) = _I32.unpack_from(mv, p)
        if l_name <= 0 or l_name > 1 << 20:
            raise BamFormatError("corrupt BAM header (bad reference name length)")
        if len(mv) < p + 4 + l_name + 4:
            return None
        name = bytes(mv[p + 4:p + 4 + l_name - 1]).decode("utf-8", errors="surrogateescape")
        (length,) = struct.unpack_from("<I", mv, p + 4 + l_name)
        refs.append(Reference(name, length))
        p += 8 + l_name
    return BamHeader(text, refs), p


def split_records(buf: bytes | memoryview, start: int = 0) -> tuple[np.ndarray, int]:
    """Find the complete records in ``buf[start:]``.

    Returns (offsets, end): ``offsets`` (int64, n+1) are the record boundaries (each record,
    block_size prefix included, is ``buf[offsets[i]:offsets[i+1]]``); ``end`` is where the
    first incomplete record begins.
    """
    u8 = np.frombuffer(buf, dtype=np.uint8)
    offs = np.empty(max(len(u8) - start, 0) // (4 + FIXED_SIZE) + 2, dtype=np.int64)
    from .kernels import split_records_kernel

    k, end, bad = split_records_kernel(_ro(u8), start, FIXED_SIZE, offs)
    if bad >= 0:
        (bs,) = _I32.unpack_from(buf, bad)
        raise BamFormatError(f"corrupt BAM record (block_size {bs} at byte {bad})")
    return offs[:k].copy(), end


def _as_index(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def _ro(a: np.ndarray) -> np.ndarray:
    """A read-only view: numba compiles one signature per writability of an argument, so the
    arrays a kernel only reads are always passed read-only (one compilation, one cache entry)."""
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def gather(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenate ``buf[starts[i]:starts[i]+lens[i]]`` for all i (IndexError if out of bounds)."""
    starts, lens = _as_index(starts), _as_index(lens)
    if len(starts) != len(lens):
        raise ValueError("gather: starts and lens differ in length")
    total = int(lens.sum())
    out = np.empty(max(total, 0), dtype=buf.dtype)
    if total == 0:
        return out
    if buf.ndim != 1 or not buf.flags.c_contiguous:
        buf = np.ascontiguousarray(buf).reshape(-1)
    from .kernels import gather_kernel

    bad = gather_kernel(_ro(buf), _ro(starts), _ro(lens), out)
    if bad >= 0:
        raise IndexError(f"gather: piece {bad} lies outside the buffer")
    return out


def scatter(out: np.ndarray, starts: np.ndarray, lens: np.ndarray, values: np.ndarray) -> None:
    """Inverse of :func:`gather`: write consecutive pieces of ``values`` at ``starts``."""
    starts, lens = _as_index(starts), _as_index(lens)
    if len(starts) != len(lens):
        raise ValueError("scatter: starts and lens differ in length")
    if len(starts) == 0:
        return
    values = np.ascontiguousarray(values, dtype=out.dtype).reshape(-1)
    if int(lens.sum()) != len(values):
        raise ValueError("scatter: values do not match the piece lengths")
    from .kernels import scatter_kernel

    bad = scatter_kernel(out, _ro(starts), _ro(lens), _ro(values))
    if bad >= 0:
        raise IndexError(f"scatter: piece {bad} lies outside the buffer")


@dataclass
class RecordBatch:
    """Raw BAM records: ``data[offsets[i]:offsets[i+1]]`` is record i (with block_size)."""

    data: bytes
    offsets: np.ndarray  # int64, len n+1, offsets[0] may be > 0
    wide: bool = False   # records in the wide layout (WIDE_FIXED_DTYPE), not BAM's
    # :meth:`fixed`, once computed (slices share it): the stages ask a batch for it several
    # times (reference check, order check, block planning, encoding)
    _fx: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def fixed_size(self) -> int:
        return WIDE_FIXED_SIZE if self.wide else FIXED_SIZE

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_records(cls, records: list[bytes]) -> "RecordBatch":
        offs = np.zeros(len(records) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in records], out=offs[1:])
        return cls(b"".join(records), offs)

    @classmethod
    def concat(cls, batches: list["RecordBatch"]) -> "RecordBatch":
        return cls.from_records_view(b"".join([b.raw() for b in batches]), wide=bool(batches) and batches[0].wide)

    @classmethod
    def from_records_view(cls, data: bytes, wide: bool = False) -> "RecordBatch":
        offs, end = split_records(data)
        if end != len(data):
            raise BamFormatError("truncated BAM record")
        return cls(data, offs, wide)

    def raw(self) -> memoryview:
        """The records' bytes, contiguous."""
        return memoryview(self.data)[int(self.offsets[0]):int(self.offsets[-1])]

    def record(self, i: int) -> bytes:
        return bytes(self.data[int(self.offsets[i]):int(self.offsets[i + 1])])

    def take(self, idx: np.ndarray) -> "RecordBatch":
        """A new batch holding records ``idx`` in that order."""
        u8 = np.frombuffer(self.data, dtype=np.uint8)
        starts = self.offsets[:-1][idx]
        lens = (self.offsets[1:] - self.offsets[:-1])[idx]
        data = gather(u8, starts, lens).tobytes()
        offs = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lens, out=offs[1:])
        return RecordBatch(data, offs, self.wide)

    def slice(self, a: int, b: int) -> "RecordBatch":
        return RecordBatch(self.data, self.offsets[a:b + 1], self.wide, None if self._fx is None else self._fx[a:b])

    def fixed(self) -> np.ndarray:
        """Structured array (FIXED_DTYPE, or WIDE_FIXED_DTYPE) of the fixed fields of every record
        (computed once per batch and kept; callers must not modify it)."""
        if self._fx is None:
            self._fx = self._fixed()
        return self._fx

    def forget_fixed(self) -> "RecordBatch":
        """Drop the kept :meth:`fixed` array (a batch held for long, e.g. in a sort buffer)."""
        self._fx = None
        return self

    def _fixed(self) -> np.ndarray:
        n = len(self)
        dtype, size = (WIDE_FIXED_DTYPE, WIDE_FIXED_SIZE) if self.wide else (FIXED_DTYPE, FIXED_SIZE)
        if n == 0:
            return np.zeros(0, dtype=dtype)
        u8 = np.frombuffer(self.data, dtype=np.uint8)
        out = np.empty((n, size), dtype=np.uint8)
        from .kernels import rows_kernel

        if rows_kernel(_ro(u8), _ro(_as_index(self.offsets[:-1] + 4)), size, out) >= 0:
            raise IndexError("a record's fixed fields lie outside the batch")
        return out.reshape(-1).view(dtype)


def cigar_ref_lengths(cigar_ops: np.ndarray, n_cigar: np.ndarray) -> np.ndarray:
    """Reference length of each record's CIGAR (``bam_cigar2rlen``), vectorised.

    ``cigar_ops`` is the concatenation of all records' uint32 CIGAR words.
    """
    n = len(n_cigar)
    out = np.zeros(n, dtype=np.int64)
    if len(cigar_ops) == 0:
        return out
    consume = _REF_CONSUMING[cigar_ops & 0xF]
    lens = np.where(consume, (cigar_ops >> 4).astype(np.int64), 0)
    rec = np.repeat(np.arange(n), n_cigar.astype(np.int64))
    return np.bincount(rec, weights=lens, minlength=n).astype(np.int64)


def end_positions(pos: np.ndarray, flag: np.ndarray, rlen: np.ndarray) -> np.ndarray:
    """htslib's ``bam_endpos``: pos + reference length, at least pos + 1; unmapped → pos + 1."""
    r = np.where((flag & FLAG_UNMAP) != 0, 0, rlen)
    return pos.astype(np.int64) + np.maximum(r, 1)


def reg2bin(beg: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The BAI bin for [beg, end) (SAM spec §5.3), vectorised; end is exclusive."""
    beg = beg.astype(np.int64)
    end = end.astype(np.int64) - 1
    out = np.zeros(len(beg), dtype=np.int64)
    done = np.zeros(len(beg), dtype=bool)
    for shift, offset in ((14, 4681), (17, 585), (20, 73), (23, 9), (26, 1)):
        hit = ~done & ((beg >> shift) == (end >> shift))
        out[hit] = offset + (beg[hit] >> shift)
        done |= hit
    return out  # the remainder is bin 0


def sort_keys(fixed: np.ndarray) -> np.ndarray:
    """samtools' coordinate sort key: (tid as unsigned, pos + 1, reverse strand), as int64.

    tid -1 (unplaced) sorts after every reference (tids are < 2**30 in practice); ties keep
    input order (samtools sort is stable), so sort with a stable algorithm.
    """
    if fixed.dtype == WIDE_FIXED_DTYPE:
        return wide_sort_keys(fixed)
    tid = fixed["refid"].astype(np.int64) & 0x3FFFFFFF
    pos1 = (fixed["pos"].astype(np.int64) + 1) & 0xFFFFFFFF
    rev = (fixed["flag"] >> 4).astype(np.int64) & 1
    return (tid << 33) | (pos1 << 1) | rev


WIDE_MAX_POS = (1 << 33) - 2  # largest pos the wide sort key orders (pos + 1 takes 33 bits)


def wide_sort_keys(fixed: np.ndarray) -> np.ndarray:
    """The coordinate sort key of wide records, as uint64: tid (30 bits, -1 last), pos + 1
    (33 bits), reverse strand (1 bit). Positions above WIDE_MAX_POS are refused."""
    pos = fixed["pos"].astype(np.int64)
    if len(pos) and int(pos.max()) > WIDE_MAX_POS:
        raise BamFormatError(f"position {int(pos.max()) + 1} is beyond the largest supported "
                             f"({WIDE_MAX_POS + 1})")
    tid = (fixed["refid"].astype(np.int64) & 0x3FFFFFFF).astype(np.uint64)
    pos1 = (pos + 1).astype(np.uint64)
    rev = ((fixed["flag"] >> 4) & 1).astype(np.uint64)
    return (tid << np.uint64(34)) | (pos1 << np.uint64(1)) | rev


_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1


def fits_bam(fixed: np.ndarray) -> bool:
    """True if every pos, next_pos and tlen of these (wide) fixed fields fits BAM's i32."""
    return all(len(fixed) == 0 or (int(fixed[k].min()) >= _I32_MIN and int(fixed[k].max()) <= _I32_MAX)
               for k in ("pos", "next_pos", "tlen"))


def to_bam_layout(batch: RecordBatch, zero_positions: bool = False) -> RecordBatch:
    """The BAM records of a wide batch: the same bytes with a 32-byte fixed part. The values
    of pos, next_pos and tlen must fit an i32 unless ``zero_positions``, which writes 0 for
    them (-1 stays -1): a stand-in record whose other fields htslib can format."""
    if not batch.wide:
        return batch
    fx = batch.fixed()
    n = len(batch)
    nfx = np.zeros(n, dtype=FIXED_DTYPE)
    for name in FIXED_DTYPE.names:
        if zero_positions and name in ("pos", "next_pos", "tlen"):
            nfx[name] = np.where(fx[name] == -1, -1, 0) if name != "tlen" else 0
        else:
            nfx[name] = fx[name]
    sizes = np.diff(batch.offsets) - (WIDE_FIXED_SIZE - FIXED_SIZE)
    offs = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=offs[1:])
    out = np.empty(int(offs[-1]), dtype=np.uint8)
    starts = offs[:-1]
    var_len = sizes - 4 - FIXED_SIZE
    scatter(out, starts, np.full(n, 4), (sizes - 4).astype("<i4").view(np.uint8))
    scatter(out, starts + 4, np.full(n, FIXED_SIZE), nfx.view(np.uint8))
    u8 = np.frombuffer(batch.data, dtype=np.uint8)
    scatter(out, starts + 4 + FIXED_SIZE, var_len, gather(u8, batch.offsets[:-1] + 4 + WIDE_FIXED_SIZE, var_len))
    return RecordBatch(out.tobytes(), offs)
