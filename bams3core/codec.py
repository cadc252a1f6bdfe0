"""Columnar block codec: a batch of raw BAM records <-> one block of compressed streams.

A block is the concatenation of one compressed *frame* per stream, in the fixed order of
:data:`STREAMS`. Each stream is produced by a transform (delta, zigzag, byte shuffle,
nibble unpacking) followed by zstandard. See docs/FORMAT.md §Block for the exact layout.

Decoding reproduces the raw BAM records byte for byte.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import zstandard

from .bam import FIXED_DTYPE, FIXED_SIZE, RecordBatch, cigar_ref_lengths, end_positions, gather, reg2bin, scatter

# (name, element width in bytes for byte-shuffling; 1 = no shuffle) — order is the format.
STREAMS: tuple[tuple[str, int], ...] = (
    ("refid", 4),    # zigzag(refid - block ref_id)
    ("pos", 4),      # zigzag(delta of pos, first against block first_start)
    ("flag", 2),
    ("mapq", 1),
    ("bin", 2),      # bin - reg2bin(pos, end) (mod 2**16): zeros unless the writer disagreed
    ("lseq", 4),     # l_seq
    ("nref", 4),     # zigzag(next_refid - refid)
    ("npos", 4),     # zigzag(next_pos - pos)
    ("tlen", 4),     # zigzag(tlen)
    ("lname", 1),    # l_read_name (NUL included)
    ("name", 1),     # read names, NUL-terminated, concatenated
    ("ncigar", 2),   # n_cigar_op
    ("cigar", 4),    # CIGAR words (uint32 len<<4|op), concatenated
    ("seq", 1),      # one byte per 4-bit base code (the pad nibble of odd lengths kept)
    ("qual", 1),     # Phred qualities, l_seq bytes per record (0xFF for '*')
    ("ltags", 4),    # byte length of each record's tag area
    ("tags", 1),     # tag areas (key, type, value... exactly as BAM), concatenated
)
STREAM_NAMES = tuple(n for n, _ in STREAMS)
STREAM_INDEX = {n: i for i, n in enumerate(STREAM_NAMES)}
NSTREAMS = len(STREAMS)

# zstd level per stream (tuned for size at convert speed); anything absent uses DEFAULT_LEVEL.
DEFAULT_LEVEL = 3
STREAM_LEVELS = {"qual": 7, "name": 9, "seq": 5, "tags": 7, "cigar": 5}


class CodecError(ValueError):
    """A block that cannot be decoded (corrupt or inconsistent)."""


@dataclass
class EncodedBlock:
    data: bytes
    stream_sizes: list[int]
    n_records: int
    ref_id: int
    first_start: int
    last_start: int
    max_end: int
    raw_size: int  # bytes of the raw BAM records
    crc32: int


def _zz(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.int64)
    return ((x << 1) ^ (x >> 63)).astype(np.uint32)


def _unzz(u: np.ndarray) -> np.ndarray:
    u = u.astype(np.int64)
    return ((u >> 1) ^ -(u & 1)).astype(np.int32)


def _shuffle(arr: np.ndarray, width: int) -> bytes:
    if width == 1:
        return arr.tobytes()
    return arr.view(np.uint8).reshape(-1, width).T.tobytes()


def _unshuffle(buf: bytes, width: int, dtype) -> np.ndarray:
    u8 = np.frombuffer(buf, dtype=np.uint8)
    if width == 1:
        return u8.view(dtype)
    if len(u8) % width:
        raise CodecError("stream length is not a multiple of its element width")
    return np.ascontiguousarray(u8.reshape(width, -1).T).reshape(-1).view(dtype)


class BlockEncoder:
    """Encodes record batches into blocks. One per thread (zstd contexts are not shared)."""

    def __init__(self, level_offset: int = 0):
        self._cctx = {name: zstandard.ZstdCompressor(level=max(1, STREAM_LEVELS.get(name, DEFAULT_LEVEL) + level_offset))
                      for name in STREAM_NAMES}

    def encode(self, batch: RecordBatch) -> EncodedBlock:
        n = len(batch)
        if n == 0:
            raise ValueError("cannot encode an empty block")
        u8 = np.frombuffer(batch.data, dtype=np.uint8)
        fx = batch.fixed()
        starts = batch.offsets[:-1]
        sizes = batch.offsets[1:] - starts  # includes the 4-byte block_size
        l_name = fx["l_read_name"].astype(np.int64)
        n_cig = fx["n_cigar_op"].astype(np.int64)
        l_seq = fx["l_seq"].astype(np.int64)
        if (l_seq < 0).any():
            raise CodecError("negative l_seq")
        l_packed = (l_seq + 1) // 2
        name_off = starts + 4 + FIXED_SIZE
        cig_off = name_off + l_name
        seq_off = cig_off + 4 * n_cig
        qual_off = seq_off + l_packed
        tag_off = qual_off + l_seq
        l_tags = starts + sizes - tag_off
        if (l_tags < 0).any():
            raise CodecError("record fields overrun the record's block_size")

        ref_id = int(fx["refid"][0])
        pos = fx["pos"].astype(np.int64)
        cigar = gather(u8, cig_off, 4 * n_cig).view("<u4")
        rlen = cigar_ref_lengths(cigar, n_cig)
        ends = end_positions(pos, fx["flag"], rlen)
        bins = (fx["bin"].astype(np.int64) - reg2bin(pos, ends)) & 0xFFFF

        packed = gather(u8, seq_off, l_packed)
        seq = np.empty(2 * len(packed), dtype=np.uint8)
        seq[0::2] = packed >> 4
        seq[1::2] = packed & 0xF

        raw = {
            "refid": _zz(fx["refid"].astype(np.int64) - ref_id),
            "pos": _zz(np.diff(pos, prepend=pos[0])),
            "flag": fx["flag"].copy(),
            "mapq": fx["mapq"].copy(),
            "bin": bins.astype(np.uint16),
            "lseq": fx["l_seq"].astype(np.uint32),
            "nref": _zz(fx["next_refid"].astype(np.int64) - fx["refid"]),
            "npos": _zz(fx["next_pos"].astype(np.int64) - pos),
            "tlen": _zz(fx["tlen"]),
            "lname": fx["l_read_name"].copy(),
            "name": gather(u8, name_off, l_name),
            "ncigar": fx["n_cigar_op"].copy(),
            "cigar": cigar,
            "seq": seq,
            "qual": gather(u8, qual_off, l_seq),
            "ltags": l_tags.astype(np.uint32),
            "tags": gather(u8, tag_off, l_tags),
        }
        frames = []
        for name, width in STREAMS:
            frames.append(self._cctx[name].compress(_shuffle(np.ascontiguousarray(raw[name]), width)))
        data = b"".join(frames)
        return EncodedBlock(
            data=data,
            stream_sizes=[len(f) for f in frames],
            n_records=n,
            ref_id=ref_id,
            first_start=int(pos[0]),
            last_start=int(pos[-1]),
            max_end=int(ends.max()),
            raw_size=int(sizes.sum()),
            crc32=zlib.crc32(data),
        )


_DCTX = zstandard.ZstdDecompressor()


def split_streams(data: bytes, stream_sizes) -> dict[str, bytes]:
    """The compressed frames of a block by stream name."""
    out = {}
    p = 0
    for name, size in zip(STREAM_NAMES, stream_sizes):
        out[name] = data[p:p + size]
        p += size
    if p != len(data):
        raise CodecError("block length does not match its stream sizes")
    return out


def _decompress(frame: bytes) -> bytes:
    try:
        return _DCTX.decompress(frame)
    except zstandard.ZstdError as e:
        raise CodecError(f"corrupt stream ({e})") from None


def decode_block(data: bytes, stream_sizes, n_records: int, ref_id: int, first_start: int) -> RecordBatch:
    """Rebuild the raw BAM records of a block (inverse of :meth:`BlockEncoder.encode`)."""
    frames = split_streams(data, stream_sizes)
    s = {name: _decompress(frames[name]) for name in STREAM_NAMES}
    n = n_records

    def arr(name, dtype):
        width = np.dtype(dtype).itemsize
        a = _unshuffle(s[name], width, dtype)
        if len(a) != n:
            raise CodecError(f"stream {name!r} holds {len(a)} values for {n} records")
        return a

    fx = np.zeros(n, dtype=FIXED_DTYPE)
    fx["refid"] = _unzz(arr("refid", "<u4")).astype(np.int64) + ref_id
    pos = np.cumsum(_unzz(arr("pos", "<u4")).astype(np.int64))
    pos += first_start - (pos[0] if n else 0)
    fx["pos"] = pos
    fx["flag"] = arr("flag", "<u2")
    fx["mapq"] = arr("mapq", "u1")
    fx["l_seq"] = arr("lseq", "<u4").astype(np.int64)
    fx["next_refid"] = _unzz(arr("nref", "<u4")).astype(np.int64) + fx["refid"]
    fx["next_pos"] = _unzz(arr("npos", "<u4")).astype(np.int64) + pos
    fx["tlen"] = _unzz(arr("tlen", "<u4"))
    fx["l_read_name"] = arr("lname", "u1")
    fx["n_cigar_op"] = arr("ncigar", "<u2")
    l_name = fx["l_read_name"].astype(np.int64)
    n_cig = fx["n_cigar_op"].astype(np.int64)
    l_seq = fx["l_seq"].astype(np.int64)
    l_packed = (l_seq + 1) // 2
    l_tags = arr("ltags", "<u4").astype(np.int64)

    names = np.frombuffer(s["name"], dtype=np.uint8)
    cigar = _unshuffle(s["cigar"], 4, "<u4")
    seq = np.frombuffer(s["seq"], dtype=np.uint8)
    qual = np.frombuffer(s["qual"], dtype=np.uint8)
    tags = np.frombuffer(s["tags"], dtype=np.uint8)
    if (len(names) != l_name.sum() or len(cigar) != n_cig.sum() or len(seq) != 2 * l_packed.sum()
            or len(qual) != l_seq.sum() or len(tags) != l_tags.sum()):
        raise CodecError("stream lengths disagree with the record counts")

    rlen = cigar_ref_lengths(cigar, n_cig)
    ends = end_positions(pos, fx["flag"], rlen)
    fx["bin"] = (reg2bin(pos, ends) + arr("bin", "<u2")) & 0xFFFF

    body = FIXED_SIZE + l_name + 4 * n_cig + l_packed + l_seq + l_tags
    sizes = 4 + body
    offs = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=offs[1:])
    out = np.empty(int(offs[-1]), dtype=np.uint8)
    starts = offs[:-1]
    scatter(out, starts, np.full(n, 4), body.astype("<i4").view(np.uint8))
    scatter(out, starts + 4, np.full(n, FIXED_SIZE), fx.view(np.uint8))
    p = starts + 4 + FIXED_SIZE
    scatter(out, p, l_name, names)
    p = p + l_name
    scatter(out, p, 4 * n_cig, cigar.view(np.uint8))
    p = p + 4 * n_cig
    scatter(out, p, l_packed, (seq[0::2] << 4) | seq[1::2])
    p = p + l_packed
    scatter(out, p, l_seq, qual)
    p = p + l_seq
    scatter(out, p, l_tags, tags)
    return RecordBatch(out.tobytes(), offs)


def decode_columns(data_by_stream: dict[str, bytes], n_records: int, names) -> dict[str, np.ndarray]:
    """Decode only the named streams (e.g. ``pos``, ``ncigar``, ``cigar`` for depth)."""
    out = {}
    width = dict(STREAMS)
    dtypes = {1: "u1", 2: "<u2", 4: "<u4"}
    for name in names:
        out[name] = _unshuffle(_decompress(data_by_stream[name]), width[name], dtypes[width[name]])
    return out
