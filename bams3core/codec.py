"""Columnar block codec: a batch of raw BAM records <-> one block of compressed streams.

A block is the concatenation of one compressed *frame* per stream, in the fixed order of
:data:`STREAMS`. Each stream is produced by a transform (delta, zigzag, byte shuffle,
nibble unpacking) followed by zstandard, or by its own coder (names, tags, qualities, and
in format v1.2 the bases, FORMAT.md §12). See docs/FORMAT.md §6 for the exact layout.

Decoding reproduces the raw BAM records byte for byte.
"""

from __future__ import annotations

import struct
import threading
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard

from .names import decode_names, encode_names
from .tags import TagError, decode_tag_areas, encode_tags, mate_index, tags_method
from .shuffle import shuffle, unshuffle
from .bam import (FIXED_DTYPE, FIXED_SIZE, WIDE_FIXED_DTYPE, WIDE_FIXED_SIZE, RecordBatch, cigar_ref_lengths,
                  end_positions, fits_bam, gather, reg2bin, scatter, to_bam_layout)

# (name, element width in bytes for byte-shuffling; 1 = no shuffle) — order is the format.
STREAMS: tuple[tuple[str, int], ...] = (
    ("refid", 4),    # zigzag(refid - block ref_id)
    ("pos", 4),      # zigzag(delta of pos, first against block first_start)
    ("flag", 2),
    ("mapq", 1),
    ("bin", 2),      # bin - reg2bin(pos, end) (mod 2**16): zeros unless the writer disagreed
    ("lseq", 4),     # l_seq
    ("mate", 2),     # distance back to the mate record in this block (0: none), see find_mates
    ("nref", 4),     # unlinked records: zigzag(next_refid - refid)
    ("npos", 4),     # unlinked records: zigzag(next_pos - pos)
    ("tlen", 4),     # unlinked records: zigzag(tlen - predicted tlen)
    ("lname", 1),    # unlinked records: l_read_name (NUL included)
    ("name", 1),     # unlinked records: read names, NUL-terminated, concatenated
    ("ncigar", 2),   # n_cigar_op
    ("cigar", 4),    # CIGAR words (uint32 len<<4|op), concatenated
    ("seq", 1),      # one byte per 4-bit base code (the pad nibble of odd lengths kept); v1.2: seqcodec
    ("qual", 1),     # Phred qualities, l_seq per record (0xFF for '*'): context-model range coder
    ("ltags", 4),    # byte length of each record's tag area (zeros with tags method 2)
    ("tags", 1),     # tag areas (key, type, value... exactly as BAM), concatenated
)
STREAM_NAMES = tuple(n for n, _ in STREAMS)
STREAM_INDEX = {n: i for i, n in enumerate(STREAM_NAMES)}
NSTREAMS = len(STREAMS)
# Format v1.1 (wide records, docs/FORMAT.md §11): the same streams, but these hold u64 values
# (64-bit zigzag) so positions, mate positions and TLEN may exceed the i32 range.
WIDE_STREAM_WIDTHS = {"pos": 8, "npos": 8, "tlen": 8}

# zstd level per stream (tuned for size at convert speed); anything absent uses DEFAULT_LEVEL.
DEFAULT_LEVEL = 3

# Which methods the encoder may use: 1 = those of format v1/v1.1 (zstd `seq`, tags methods
# 0/1, `ltags` the lengths); 2 = also `seq` method 1 and tags method 2 (format v1.2/v1.3,
# docs/FORMAT.md §12). The decoder reads both.
CODECS_V1 = 1
CODECS_V2 = 2
CODECS = CODECS_V2
STREAM_LEVELS = {"name": 5, "seq": 7, "tags": 7, "cigar": 5}


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
    wide: bool = False  # encoded from wide records (format v1.1 block layout)


def _zz(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.int64)
    if len(x) and (x.min() < -(1 << 31) or x.max() > (1 << 31) - 1):
        raise CodecError("a position/TLEN difference does not fit in 32 bits")
    return ((x << 1) ^ (x >> 63)).astype(np.uint32)


def _zz64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.int64)
    return ((x << 1) ^ (x >> 63)).view(np.uint64)


def _unzz64(u: np.ndarray) -> np.ndarray:
    u = u.astype(np.uint64)
    return ((u >> np.uint64(1)) ^ (np.uint64(0) - (u & np.uint64(1)))).view(np.int64)


def _unzz(u: np.ndarray) -> np.ndarray:
    u = u.astype(np.int64)
    return ((u >> 1) ^ -(u & 1)).astype(np.int32)


def _unshuffle(buf: bytes, width: int, dtype) -> np.ndarray:
    try:
        return unshuffle(buf, width, dtype)
    except ValueError:
        raise CodecError("stream length is not a multiple of its element width") from None


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """The ``seq`` stream (§6.4): packed 4-bit base codes, one byte per nibble, high first."""
    seq = np.empty(2 * len(packed), dtype=np.uint8)
    seq[0::2] = packed >> 4
    seq[1::2] = packed & 0xF
    return seq


def pack_nibbles(seq: np.ndarray) -> np.ndarray:
    """Inverse of :func:`unpack_nibbles` (``seq`` has an even length)."""
    return (seq[0::2] << 4) | seq[1::2]


MAX_MATE_DISTANCE = 0xFFFF


def find_mates(refid, pos, nref, npos, tlen, names, l_name) -> np.ndarray:
    """For each record, the distance back to an earlier record of this block that is its mate
    (0 if none): same name, and this record's RNEXT/PNEXT/TLEN equal that record's
    RNAME/POS/-TLEN (and the reverse). The target is never itself linked, so decoding needs
    one pass. Compiled: :func:`bams3core.kernels.find_mates_kernel`."""
    n = len(pos)
    link = np.zeros(n, dtype=np.int64)
    if n < 2:
        return link
    i64 = lambda a: np.ascontiguousarray(a, dtype=np.int64)  # noqa: E731
    from .kernels import find_mates_kernel  # numba: imported where used, not with the codec

    find_mates_kernel(i64(refid), i64(pos), i64(nref), i64(npos), i64(tlen),
                      np.ascontiguousarray(names, dtype=np.uint8), i64(l_name), MAX_MATE_DISTANCE, link)
    return link


def predict_tlen(refid, pos, nref, npos, flag, rlen) -> np.ndarray:
    """TLEN as an aligner would write it if the mate spans as many bases as this read."""
    same = (nref == refid) & (refid >= 0) & ((flag & 0xC) == 0)
    right = npos >= pos
    pred = np.where(right, npos + rlen - pos, -(pos + rlen - npos))
    return np.where(same, pred, 0)


class BlockEncoder:
    """Encodes record batches into blocks. One per thread (zstd contexts are not shared)."""

    def __init__(self, level_offset: int = 0, codecs: int = CODECS):
        if codecs not in (CODECS_V1, CODECS_V2):
            raise ValueError(f"unknown codec level {codecs}")
        self.codecs = codecs
        # plain streams carry zstd's content checksum (4 bytes a frame): a reader that fetches
        # only some frames of a block checks each of them (docs/FORMAT.md §7)
        self._cctx = {name: zstandard.ZstdCompressor(level=max(1, STREAM_LEVELS.get(name, DEFAULT_LEVEL) + level_offset),
                                                     write_checksum=name in PLAIN_STREAMS)
                      for name in STREAM_NAMES}

    def encode(self, batch: RecordBatch, fx: np.ndarray | None = None) -> EncodedBlock:
        """Encode ``batch`` (``fx``: its :meth:`RecordBatch.fixed`, if the caller has it)."""
        n = len(batch)
        if n == 0:
            raise ValueError("cannot encode an empty block")
        fx = batch.fixed() if fx is None else fx
        if batch.wide and fits_bam(fx):  # wide records whose values BAM can hold: a v1 block
            batch = to_bam_layout(batch)
            fx = batch.fixed()
        u8 = np.frombuffer(batch.data, dtype=np.uint8)
        wide = batch.wide
        zzw = _zz64 if wide else _zz  # the pos, npos and tlen streams (u64 in wide blocks)
        starts = batch.offsets[:-1]
        sizes = batch.offsets[1:] - starts  # includes the 4-byte block_size
        l_name = fx["l_read_name"].astype(np.int64)
        n_cig = fx["n_cigar_op"].astype(np.int64)
        l_seq = fx["l_seq"].astype(np.int64)
        if (l_seq < 0).any():
            raise CodecError("negative l_seq")
        l_packed = (l_seq + 1) // 2
        name_off = starts + 4 + batch.fixed_size
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

        seq = unpack_nibbles(gather(u8, seq_off, l_packed))

        names = gather(u8, name_off, l_name)
        refid = fx["refid"].astype(np.int64)
        nref = fx["next_refid"].astype(np.int64)
        npos = fx["next_pos"].astype(np.int64)
        tlen = fx["tlen"].astype(np.int64)
        link = find_mates(refid, pos, nref, npos, tlen, names, l_name)
        un = link == 0
        name_keep = np.repeat(un, l_name)
        raw = {
            "refid": _zz(refid - ref_id),
            "pos": zzw(np.diff(pos, prepend=pos[0])),
            "flag": fx["flag"].copy(),
            "mapq": fx["mapq"].copy(),
            "bin": bins.astype(np.uint16),
            "lseq": fx["l_seq"].astype(np.uint32),
            "mate": link.astype(np.uint16),
            "nref": _zz((nref - refid)[un]),
            "npos": zzw((npos - pos)[un]),
            "tlen": zzw((tlen - predict_tlen(refid, pos, nref, npos, fx["flag"], rlen))[un]),
            "lname": fx["l_read_name"][un].copy(),
            "name": names[name_keep],
            "ncigar": fx["n_cigar_op"].copy(),
            "cigar": cigar,
            "seq": seq,
            "qual": gather(u8, qual_off, l_seq),
            "ltags": l_tags.astype(np.uint32),
        }
        v2 = self.codecs >= CODECS_V2
        if v2:
            from .seqcodec import WRITE_MAX_SPAN, block_consensus, encode_seq  # numba: imported where used

            cons = block_consensus(seq, l_seq, pos, cigar, n_cig, WRITE_MAX_SPAN)
            md_ref = None if cons is None else (seq, l_seq, pos, *cons)
            tags = encode_tags(u8, tag_off, l_tags, self._cctx["tags"], cigar=cigar, n_cigar=n_cig,
                               mate=mate_index(link), md_ref=md_ref)
        else:
            tags = encode_tags(u8, tag_off, l_tags, self._cctx["tags"])
        if tags_method(tags) == 2:  # the tag areas' lengths follow from the frame (§6.8)
            raw["ltags"] = np.zeros(n, dtype=np.uint32)
        frames = []
        for name, width in STREAMS:
            if name == "tags":
                frames.append(tags)
            elif name == "name":
                frames.append(encode_names(raw["name"], l_name[un], self._cctx[name]))
            elif name == "qual":
                from .qualcodec import encode_quals  # numba: imported where used, not with the codec

                frames.append(encode_quals(raw["qual"], l_seq))
            elif name == "seq" and v2:
                frames.append(encode_seq(raw["seq"], l_seq, pos, cigar, n_cig, self._cctx[name]))
            else:
                if wide:
                    width = WIDE_STREAM_WIDTHS.get(name, width)
                frames.append(self._cctx[name].compress(shuffle(np.ascontiguousarray(raw[name]), width)))
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
            wide=wide,
        )


_TLS = threading.local()


def _dctx() -> zstandard.ZstdDecompressor:
    """A per-thread decompressor (zstd contexts must not be shared between threads)."""
    d = getattr(_TLS, "dctx", None)
    if d is None:
        d = _TLS.dctx = zstandard.ZstdDecompressor()
    return d


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
        return _dctx().decompress(frame)
    except zstandard.ZstdError as e:
        raise CodecError(f"corrupt stream ({e})") from None


# The fields a reader may ask a block for, and the streams each one needs (every field's
# decoding pulls in only these frames: a projection reads and decodes just their union).
_CIGAR = ("ncigar", "cigar")
_ENDS = ("pos", "flag") + _CIGAR
FIELD_STREAMS: dict[str, tuple[str, ...]] = {
    "refid": ("refid",),
    "pos": ("pos",),
    "flag": ("flag",),
    "mapq": ("mapq",),
    "l_seq": ("lseq",),
    "cigar": _CIGAR,          # n_cigar (per record) and the concatenated CIGAR words
    "end": _ENDS,             # htslib's bam_endpos
    "bin": _ENDS + ("bin",),
    "mate": ("refid", "mate", "nref", "npos", "tlen") + _ENDS,  # next_refid, next_pos, tlen
    "name": ("mate", "lname", "name"),
    "seq": ("lseq", "seq") + ("pos",) + _CIGAR,   # seq method 1 predicts bases from the block's alignments (§12.2)
    "qual": ("lseq", "qual"),
    # tags method 2 derives NM/MD/MC from CIGARs, mate links and the block's bases (§12.3)
    "tags": ("ltags", "tags", "mate", "lseq", "seq", "pos") + _CIGAR,
}
ALL_FIELDS = tuple(FIELD_STREAMS)
# the BlockColumns attribute that decodes each field
_FIELD_ATTR = {"refid": "refid", "pos": "pos", "flag": "flag", "mapq": "mapq", "l_seq": "l_seq", "cigar": "cigar",
               "end": "end", "bin": "bin", "mate": "tlen", "name": "names", "seq": "seq", "qual": "qual",
               "tags": "tags"}
# Streams whose frames are plain zstd frames (§6.2): the writer sets zstd's content checksum on
# them, so a reader fetching only some of a block's frames can still check each one (§7).
PLAIN_STREAMS = frozenset(STREAM_NAMES) - {"name", "qual", "tags"}
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def streams_for(fields) -> list[int]:
    """Stream numbers (ascending, i.e. in block order) that decoding ``fields`` needs."""
    try:
        names = {s for f in fields for s in FIELD_STREAMS[f]}
    except KeyError as e:
        raise ValueError(f"unknown block field {e.args[0]!r} (known: {', '.join(ALL_FIELDS)})") from None
    return sorted(STREAM_INDEX[s] for s in names)


def frame_self_checked(frame) -> bool:
    """True if ``frame`` is a zstd frame carrying a content checksum (verified when decoded)."""
    return len(frame) >= 5 and bytes(frame[:4]) == _ZSTD_MAGIC and bool(frame[4] & 0x04)


class BlockColumns:
    """The fields of one block, decoded lazily from whichever frames were given.

    ``frames`` maps stream names to their compressed frames; a field whose streams are missing
    raises KeyError. Every decoded stream's element count is checked (§6.2). Arrays are numpy
    (positions int64, 0-based); :func:`decode_block` assembles all of them into BAM records."""

    def __init__(self, frames: dict, n_records: int, ref_id: int, first_start: int, wide: bool = False):
        self.frames = frames
        self.n = n_records
        self.ref_id = ref_id
        self.first_start = first_start
        self.wide = wide
        self._s: dict[str, bytes] = {}
        self._c: dict[str, object] = {}

    def __len__(self) -> int:
        return self.n

    def decode(self, fields) -> "BlockColumns":
        """Decode ``fields`` now (e.g. on a worker thread) rather than on first access."""
        for f in fields:
            getattr(self, _FIELD_ATTR[f])
        return self

    def _raw(self, name: str) -> bytes:
        if name not in self._s:
            self._s[name] = _decompress(self.frames[name])
        return self._s[name]

    def _arr(self, name, dtype, count=None):
        """The values of a fixed-width stream (one per record, or ``count`` of them)."""
        count = self.n if count is None else count
        a = _unshuffle(self._raw(name), np.dtype(dtype).itemsize, dtype)
        if len(a) != count:
            raise CodecError(f"stream {name!r} holds {len(a)} values for {count} records")
        return a

    def _diffs(self, name, count=None):  # a zigzagged difference stream (u64 for pos/npos/tlen when wide)
        if self.wide and name in WIDE_STREAM_WIDTHS:
            return _unzz64(self._arr(name, "<u8", count))
        return _unzz(self._arr(name, "<u4", count)).astype(np.int64)

    def _cached(self, key, make):
        if key not in self._c:
            self._c[key] = make()
        return self._c[key]

    # -- fixed fields ----------------------------------------------------------------------
    @property
    def refid(self) -> np.ndarray:
        return self._cached("refid", lambda: _unzz(self._arr("refid", "<u4")).astype(np.int64) + self.ref_id)

    @property
    def pos(self) -> np.ndarray:
        def make():
            pos = np.cumsum(self._diffs("pos"))
            pos += self.first_start - (pos[0] if self.n else 0)
            return pos
        return self._cached("pos", make)

    @property
    def flag(self) -> np.ndarray:
        return self._cached("flag", lambda: self._arr("flag", "<u2"))

    @property
    def mapq(self) -> np.ndarray:
        return self._cached("mapq", lambda: self._arr("mapq", "u1"))

    @property
    def l_seq(self) -> np.ndarray:
        return self._cached("l_seq", lambda: self._arr("lseq", "<u4").astype(np.int64))

    @property
    def n_cigar(self) -> np.ndarray:
        return self._cached("n_cigar", lambda: self._arr("ncigar", "<u2").astype(np.int64))

    @property
    def cigar(self) -> np.ndarray:
        """Every record's CIGAR words (uint32 len<<4|op), concatenated; split by :attr:`n_cigar`."""
        def make():
            cigar = _unshuffle(self._raw("cigar"), 4, "<u4")
            if len(cigar) != self.n_cigar.sum():
                raise CodecError("stream lengths disagree with the record counts")
            return cigar
        return self._cached("cigar", make)

    @property
    def rlen(self) -> np.ndarray:
        return self._cached("rlen", lambda: cigar_ref_lengths(self.cigar, self.n_cigar))

    @property
    def end(self) -> np.ndarray:
        """htslib's ``bam_endpos`` (exclusive)."""
        return self._cached("end", lambda: end_positions(self.pos, self.flag, self.rlen))

    @property
    def bin(self) -> np.ndarray:
        return self._cached("bin", lambda: (reg2bin(self.pos, self.end) + self._arr("bin", "<u2")) & 0xFFFF)

    # -- mate fields and names (§6.6) ----------------------------------------------------
    @property
    def _link(self) -> np.ndarray:
        return self._cached("link", lambda: self._arr("mate", "<u2").astype(np.int64))

    @property
    def _links(self):
        def make():
            link = self._link
            un = link == 0
            tgt = np.arange(self.n) - link
            if (tgt < 0).any() or (link[tgt[~un]] != 0).any():
                raise CodecError("bad mate links")
            return un, tgt
        return self._cached("links", make)

    def _mates(self):
        un, tgt = self._links
        nun = int(un.sum())
        n = self.n
        refid, pos = self.refid, self.pos
        nref = np.zeros(n, dtype=np.int64)
        npos = np.zeros(n, dtype=np.int64)
        tlen = np.zeros(n, dtype=np.int64)
        nref[un] = _unzz(self._arr("nref", "<u4", nun)).astype(np.int64) + refid[un]
        npos[un] = self._diffs("npos", nun) + pos[un]
        pred = predict_tlen(refid, pos, nref, npos, self.flag.astype(np.int64), self.rlen)
        tlen[un] = self._diffs("tlen", nun) + pred[un]
        lk = ~un
        nref[lk] = refid[tgt[lk]]
        npos[lk] = pos[tgt[lk]]
        tlen[lk] = -tlen[tgt[lk]]
        return nref, npos, tlen

    @property
    def next_refid(self) -> np.ndarray:
        return self._cached("mates", self._mates)[0]

    @property
    def next_pos(self) -> np.ndarray:
        return self._cached("mates", self._mates)[1]

    @property
    def tlen(self) -> np.ndarray:
        return self._cached("mates", self._mates)[2]

    @property
    def l_name(self) -> np.ndarray:
        """l_read_name (the NUL included)."""
        def make():
            un, tgt = self._links
            l_name = np.zeros(self.n, dtype=np.int64)
            l_name[un] = self._arr("lname", "u1", int(un.sum()))
            lk = ~un
            l_name[lk] = l_name[tgt[lk]]
            return l_name
        return self._cached("l_name", make)

    @property
    def names(self) -> np.ndarray:
        """Every record's NUL-terminated name, concatenated (split by :attr:`l_name`)."""
        def make():
            un, tgt = self._links
            l_name = self.l_name
            nun = int(un.sum())
            try:
                names_un, l_dec = decode_names(self.frames["name"], nun, _dctx())
            except (ValueError, zstandard.ZstdError, struct.error, IndexError) as e:
                raise CodecError(f"corrupt names stream ({e})") from None
            if len(names_un) != l_name[un].sum() or (l_dec is not None and (l_dec != l_name[un]).any()):
                raise CodecError("stream lengths disagree with the record counts")
            name_starts = np.zeros(self.n, dtype=np.int64)
            np.cumsum(l_name[:-1], out=name_starts[1:])
            names = np.empty(int(l_name.sum()), dtype=np.uint8)
            names[np.repeat(un, l_name)] = names_un
            lk = ~un
            if lk.any():
                ii = np.flatnonzero(lk)
                scatter(names, name_starts[ii], l_name[ii], gather(names, name_starts[tgt[ii]], l_name[ii]))
            return names
        return self._cached("names", make)

    # -- variable fields -----------------------------------------------------------------
    @property
    def seq(self) -> np.ndarray:
        """4-bit base codes, one byte each, ``2*((l_seq+1)//2)`` per record (§6.4, §12.2)."""
        def make():
            from .seqcodec import decode_seq  # numba: imported where used, not with the codec

            try:
                seq = decode_seq(self.frames["seq"], self.l_seq, self.pos, self.cigar, self.n_cigar, _dctx())
            except ValueError as e:
                raise CodecError(str(e)) from None
            if len(seq) != 2 * ((self.l_seq + 1) // 2).sum():
                raise CodecError("stream lengths disagree with the record counts")
            return seq
        return self._cached("seq", make)

    @property
    def qual(self) -> np.ndarray:
        """Quality bytes, ``l_seq`` per record (0xFF for ``*``)."""
        def make():
            from .qualcodec import decode_quals  # numba: imported where used, not with the codec

            try:
                qual = decode_quals(self.frames["qual"], self.l_seq)
            except ValueError as e:
                raise CodecError(f"corrupt quality stream ({e})") from None
            if len(qual) != self.l_seq.sum():
                raise CodecError("stream lengths disagree with the record counts")
            return qual
        return self._cached("qual", make)

    @property
    def l_tags(self) -> np.ndarray:
        """Each record's tag area length (from the ``ltags`` stream, or, with tags method 2,
        from the tags frame itself: §12.3)."""
        return self._tag_areas[1]

    @property
    def tags(self) -> np.ndarray:
        """Tag areas exactly as BAM stores them, concatenated (split by :attr:`l_tags`)."""
        return self._tag_areas[0]

    @property
    def _tag_areas(self) -> tuple[np.ndarray, np.ndarray]:
        def make():
            l_tags = self._arr("ltags", "<u4").astype(np.int64)
            frame = self.frames["tags"]
            try:
                if tags_method(frame) == 2:
                    if l_tags.any():
                        raise CodecError("the ltags stream of a block with method-2 tags holds non-zero values")

                    def md_ref():  # the block's consensus, for a derived MD column (§12.3)
                        from .seqcodec import block_consensus

                        cons = block_consensus(self.seq, self.l_seq, self.pos, self.cigar, self.n_cigar)
                        return None if cons is None else (self.seq, self.l_seq, self.pos, *cons)

                    tags, l_tags = decode_tag_areas(frame, self.n, _dctx(), cigar=self.cigar, n_cigar=self.n_cigar,
                                                    mate=mate_index(self._link), md_ref=md_ref)
                else:
                    tags, _ = decode_tag_areas(frame, self.n, _dctx(), l_tags=l_tags)
            except (TagError, zstandard.ZstdError, struct.error, IndexError, ValueError) as e:
                raise CodecError(f"corrupt tags stream ({e})") from None
            if len(tags) != l_tags.sum():
                raise CodecError("stream lengths disagree with the record counts")
            return tags, np.asarray(l_tags, dtype=np.int64)
        return self._cached("tag_areas", make)


def decode_block(data: bytes, stream_sizes, n_records: int, ref_id: int, first_start: int,
                 wide: bool = False) -> RecordBatch:
    """Rebuild the raw BAM records of a block (inverse of :meth:`BlockEncoder.encode`);
    ``wide``: a v1.1 block, decoded to wide records."""
    return assemble_records(BlockColumns(split_streams(data, stream_sizes), n_records, ref_id, first_start, wide))


# Called with a block's columns before it is assembled, if set: bams3 sets it to start compiling
# the kernels the block needs (decode_kernels) on two cores when numba's cache lacks them
# (bams3.warmup.ParallelCompile). Decoding does not depend on it.
decode_hook = None


def decode_kernels(frames: dict) -> list[str]:
    """The compiled kernels (bams3core.jit.DECODE_GROUPS) decoding these frames calls, from
    their method bytes (a derived MD column is assumed wherever tags are method 2)."""
    from .jit import DECODE_GROUPS  # numba: only where a block is about to be decoded

    groups = ["records"]
    q, s, t = frames.get("qual", b""), frames.get("seq", b""), frames.get("tags", b"")
    if q[:1] == b"\x01":
        groups.append("qual-cm")
    if s[:1] == b"\x01":
        groups.append("seq-cm")
    if t[:1] == b"\x02":
        groups += ["consensus", "tags-derived"]
    return [k for g in groups for k in DECODE_GROUPS[g]]


def assemble_records(c: BlockColumns) -> RecordBatch:
    """The raw BAM records of a block whose frames are all present (§6.10 step 11)."""
    if decode_hook is not None:
        decode_hook(c)
    n = c.n
    wide = c.wide
    fixed_dtype, fixed_size = (WIDE_FIXED_DTYPE, WIDE_FIXED_SIZE) if wide else (FIXED_DTYPE, FIXED_SIZE)
    fx = np.zeros(n, dtype=fixed_dtype)
    fx["refid"] = c.refid
    fx["pos"] = c.pos
    fx["flag"] = c.flag
    fx["mapq"] = c.mapq
    fx["l_seq"] = c.l_seq
    fx["n_cigar_op"] = c.n_cigar
    fx["next_refid"] = c.next_refid
    fx["next_pos"] = c.next_pos
    fx["tlen"] = c.tlen
    l_name = c.l_name
    fx["l_read_name"] = l_name
    names = c.names
    cigar = c.cigar
    n_cig = c.n_cigar
    l_seq = c.l_seq
    l_packed = (l_seq + 1) // 2
    l_tags = c.l_tags
    seq = c.seq
    qual = c.qual
    tags = c.tags
    fx["bin"] = c.bin

    body = fixed_size + l_name + 4 * n_cig + l_packed + l_seq + l_tags
    sizes = 4 + body
    offs = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=offs[1:])
    out = np.empty(int(offs[-1]), dtype=np.uint8)
    starts = offs[:-1]
    scatter(out, starts, np.full(n, 4), body.astype("<i4").view(np.uint8))
    scatter(out, starts + 4, np.full(n, fixed_size), fx.view(np.uint8))
    p = starts + 4 + fixed_size
    scatter(out, p, l_name, names)
    p = p + l_name
    scatter(out, p, 4 * n_cig, cigar.view(np.uint8))
    p = p + 4 * n_cig
    scatter(out, p, l_packed, pack_nibbles(seq))
    p = p + l_packed
    scatter(out, p, l_seq, qual)
    p = p + l_seq
    scatter(out, p, l_tags, tags)
    return RecordBatch(out.tobytes(), offs, wide)


