"""Region index and manifest: plain data, serialised to bytes (no I/O here).

* The **index** is one object per reference (``index/<ref_id>.b3i``; ``index/unplaced.b3i``
  for records with no reference): one or more *pages*, each a zstd frame holding a small
  fixed header and consecutive :data:`ENTRY_DTYPE` rows (one per block, in file order)
  stored column by column. The manifest lists each page's byte range and position bounds, so
  a region query reads only the pages that can overlap it (one ranged GET).
* The **manifest** (``manifest.json``) is the commit point of a dataset: references, stats,
  chunk and index object lists with sizes and checksums.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
import zstandard

from .codec import CODECS, CODECS_V2, NSTREAMS, STREAM_NAMES
from .shuffle import shuffle, unshuffle

FORMAT_NAME = "bams3"
FORMAT_VERSION = 1
# Format v1.1 (docs/FORMAT.md §11): 64-bit positions. Written only for data that needs it.
# A v1 reader rejects it at the manifest's `version` (it accepts only the integer 1).
FORMAT_VERSION_WIDE = "1.1"
# Format v1.2 / v1.3 (docs/FORMAT.md §12): v1 / v1.1 whose blocks may use the codec methods
# of §12 (`seq` method 1, tags method 2). What bams3 >= 0.3 writes.
FORMAT_VERSION_CODECS = "1.2"
FORMAT_VERSION_WIDE_CODECS = "1.3"
READ_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_WIDE, FORMAT_VERSION_CODECS, FORMAT_VERSION_WIDE_CODECS)


def writer_version(wide: bool, codecs: int = CODECS) -> int | str:
    """The manifest ``version`` of a dataset written with codec level ``codecs`` (§12)."""
    if codecs >= CODECS_V2:
        return FORMAT_VERSION_WIDE_CODECS if wide else FORMAT_VERSION_CODECS
    return FORMAT_VERSION_WIDE if wide else FORMAT_VERSION
INDEX_VERSION_WIDE = 0x0101  # the index page header's u16 version in v1.1 (major 1, minor 1)
MANIFEST_KEY = "manifest.json"
HEADER_KEY = "header.sam"
INDEX_MAGIC = b"B3IX"

ENTRY_DTYPE = np.dtype([
    ("chunk", "<u4"),         # position of the chunk object in manifest["chunks"]
    ("offset", "<u8"),        # byte offset of the block inside the chunk object
    ("length", "<u4"),        # compressed length of the block (sum of stream_sizes)
    ("n_records", "<u4"),
    ("ref_id", "<i4"),
    ("first_start", "<i4"),   # pos (0-based) of the first record
    ("last_start", "<i4"),    # pos of the last record
    ("max_end", "<i8"),       # max over records of htslib's bam_endpos (exclusive)
    ("raw_size", "<u4"),      # bytes of the raw BAM records (block_size prefixes included)
    ("crc32", "<u4"),         # CRC-32 (zlib) of the block's compressed bytes
    ("stream_sizes", "<u4", (NSTREAMS,)),
])
# v1.1: first_start and last_start are i64, and `layout` says how the block is encoded
# (0: v1 streams, 1: wide streams with u64 pos/npos/tlen); 129 bytes per entry.
ENTRY_DTYPE_WIDE = np.dtype([(name, "<i8" if name in ("first_start", "last_start") else ENTRY_DTYPE[name])
                             for name in ENTRY_DTYPE.names] + [("layout", "u1")])


def widen_entries(rows: np.ndarray) -> np.ndarray:
    """v1 index rows as v1.1 rows (layout 0); v1.1 rows unchanged."""
    if rows.dtype == ENTRY_DTYPE_WIDE:
        return rows
    out = np.zeros(len(rows), dtype=ENTRY_DTYPE_WIDE)
    for name in ENTRY_DTYPE.names:
        out[name] = rows[name]
    return out


def narrow_entries(rows: np.ndarray) -> np.ndarray:
    """v1.1 rows of v1 blocks only (layout 0) as v1 rows, so their index object stays v1."""
    if rows.dtype == ENTRY_DTYPE:
        return rows
    if rows["layout"].any():
        raise ValueError("rows of wide blocks need a v1.1 index")
    out = np.zeros(len(rows), dtype=ENTRY_DTYPE)
    for name in ENTRY_DTYPE.names:
        out[name] = rows[name]
    return out


class IndexError_(ValueError):
    pass


def index_key(ref_id: int) -> str:
    return "index/unplaced.b3i" if ref_id < 0 else f"index/{ref_id}.b3i"


# Columns of the serialised index, in order: (field, delta-coded against the previous row)
_DELTA_FIELDS = {"offset", "first_start", "last_start"}


def encode_index(entries: np.ndarray) -> bytes:
    """Serialise index rows column by column (deltas for offsets and positions, each column
    byte-shuffled), then zstd: a few bytes per block instead of ~120."""
    dtype, version = (ENTRY_DTYPE_WIDE, INDEX_VERSION_WIDE) if entries.dtype == ENTRY_DTYPE_WIDE else \
        (ENTRY_DTYPE, FORMAT_VERSION)
    entries = np.ascontiguousarray(entries.astype(dtype))
    head = INDEX_MAGIC + struct.pack("<HHI", version, NSTREAMS, len(entries))
    cols = []
    for name in dtype.names:
        col = np.ascontiguousarray(entries[name])
        if name in _DELTA_FIELDS and len(col):
            col = np.diff(col.astype(np.int64), prepend=np.int64(0)).astype(col.dtype)
        # stream_sizes (n x 18): its 18 columns one after the other, shuffled as ONE sequence
        cols.append(shuffle(col if col.ndim == 1 else col.T))
    return zstandard.ZstdCompressor(level=19).compress(head + b"".join(cols))


# Writer policy: pages of at least MIN_PAGE_ENTRIES blocks, at most MAX_PAGES per reference
# (a 30x human chr1 has ~90k blocks: 32 pages of ~2,800 blocks, ~75 KB each, instead of one
# 2.4 MB object per query; the manifest grows by ~60 bytes per page).
MIN_PAGE_ENTRIES = 64
MAX_PAGES = 32


@dataclass
class IndexPage:
    offset: int       # byte range of the page's frame inside the index object
    length: int
    n_entries: int
    first_start: int  # first_start of the page's first entry
    max_end: int      # largest max_end of its entries
    crc32: int        # CRC-32 of the page's bytes

    def to_list(self) -> list[int]:
        return [self.offset, self.length, self.n_entries, self.first_start, self.max_end, self.crc32]

    @classmethod
    def from_list(cls, v) -> "IndexPage":
        if not isinstance(v, (list, tuple)) or len(v) != 6 or not all(isinstance(x, int) for x in v):
            raise IndexError_(f"malformed index page entry {v!r}")
        return cls(*v)


def page_entries(n: int) -> int:
    """Entries per page for a reference with ``n`` blocks (writer policy)."""
    return max(MIN_PAGE_ENTRIES, -(-n // MAX_PAGES))


def encode_index_pages(entries: np.ndarray, per_page: int | None = None) -> tuple[bytes, list[IndexPage]]:
    """An index object of consecutive pages, and its page directory."""
    per_page = per_page or page_entries(len(entries))
    parts, pages, off = [], [], 0
    for a in range(0, max(len(entries), 1), per_page):
        rows = entries[a:a + per_page]
        frame = encode_index(rows)
        pages.append(IndexPage(off, len(frame), len(rows),
                               int(rows["first_start"][0]) if len(rows) else 0,
                               int(rows["max_end"].max()) if len(rows) else 0, zlib.crc32(frame)))
        parts.append(frame)
        off += len(frame)
    return b"".join(parts), pages


def select_pages(pages: list[IndexPage], beg: int, end: int) -> list[int]:
    """Pages that can hold blocks overlapping [beg, end) (same rule as blocks, §5.2)."""
    return [i for i, p in enumerate(pages) if p.first_start < end and p.max_end > beg]


def decode_index(data: bytes, wide_ok: bool = True) -> np.ndarray:
    """Index rows of one page (ENTRY_DTYPE, or ENTRY_DTYPE_WIDE for a v1.1 page, which is
    refused unless ``wide_ok``: a v1 dataset has only v1 pages)."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError as e:
        raise IndexError_(f"corrupt index object ({e})") from None
    if raw[:4] != INDEX_MAGIC or len(raw) < 12:
        raise IndexError_("not a bams3 index object")
    version, nstreams, n = struct.unpack_from("<HHI", raw, 4)
    if version not in (FORMAT_VERSION, INDEX_VERSION_WIDE) or nstreams != NSTREAMS or \
            (version == INDEX_VERSION_WIDE and not wide_ok):
        raise IndexError_(f"unsupported index version {version} / {nstreams} streams")
    dtype = ENTRY_DTYPE_WIDE if version == INDEX_VERSION_WIDE else ENTRY_DTYPE
    body = memoryview(raw)[12:]
    if len(body) != n * dtype.itemsize:
        raise IndexError_("index object has the wrong length")
    out = np.zeros(n, dtype=dtype)
    p = 0
    for name in dtype.names:
        dt, shape = dtype[name].base, dtype[name].shape
        k = int(np.prod(shape)) if shape else 1
        size = n * k * dt.itemsize
        col = unshuffle(body[p:p + size], dt.itemsize, dt)
        p += size
        if shape:
            out[name] = col.reshape(k, n).T
        else:
            out[name] = np.cumsum(col.astype(np.int64)).astype(dt) if name in _DELTA_FIELDS else col
    return out


def check_version(version, supported=READ_VERSIONS) -> None:
    """The manifest's version gate. A v1-only reader is this gate with ``supported=(1,)``:
    ``"1.1"`` (a string) is not the integer 1, so it refuses v1.1 datasets here, before
    reading any index or chunk."""
    if isinstance(version, bool) or version not in supported:
        names = " or ".join(str(v) for v in supported)
        raise IndexError_(f"unsupported bams3 format version {version} (this reader reads {names})")


@dataclass
class ObjectRef:
    key: str
    size: int
    sha256: str
    etag: str | None = None
    n_blocks: int = 0
    n_records: int = 0
    ref_id: int | None = None  # index objects only
    pages: list | None = None  # index objects: [[offset, length, n_entries, first_start, max_end, crc32], ...]

    def index_pages(self) -> list[IndexPage] | None:
        """The page directory (None: the object is a single page, as written before paging)."""
        return None if self.pages is None else [IndexPage.from_list(v) for v in self.pages]


@dataclass
class Manifest:
    references: list[dict]                 # [{"name": str, "length": int}]
    header: ObjectRef
    chunks: list[ObjectRef]
    index: list[ObjectRef]
    n_records: int
    stats: dict                            # {"flagstat": [[..],[..]], "mapped": [..], "unmapped": [..], "unplaced": n}
    run_id: str
    created: str
    tool: str
    block_bytes: int
    chunk_bytes: int
    sorted_by: str = "input"               # "input": already coordinate-sorted; "bams3": sorted on convert
    source: str = ""
    format: str = FORMAT_NAME
    version: int | str = FORMAT_VERSION    # 1; "1.1": wide records; "1.2"/"1.3": the same with §12 codecs
    streams: list[str] = field(default_factory=lambda: list(STREAM_NAMES))
    compression: str = "zstd"
    extra: dict = field(default_factory=dict)
    checksum: str | None = None            # "sha256:<hex>" of the other members (§3.5); set by to_json

    def to_json(self) -> bytes:
        """The manifest file: one-space indentation, page directories one array per line, and
        the ``checksum`` member (§3.5) last. Built member by member, never by text replacement."""
        d = asdict(self)
        d.pop("checksum")
        for ref in [d["header"], *d["chunks"], *d["index"]]:
            if ref.get("pages") is None:
                ref.pop("pages", None)  # only index objects have a page directory
        d["checksum"] = manifest_checksum(d)
        self.checksum = d["checksum"]
        return (_indented(d, 0) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        try:
            d = json.loads(data, object_pairs_hook=_no_duplicates, parse_float=_no_float,
                           parse_constant=_no_float)
        except (ValueError, UnicodeDecodeError) as e:
            raise IndexError_(f"manifest is not valid JSON ({e})") from None
        except _NotInteger as e:
            raise IndexError_(f"malformed manifest (non-integer number {e})") from None
        except RecursionError:
            raise IndexError_("manifest is not valid JSON (nested too deeply)") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise IndexError_("not a bams3 manifest")
        if "checksum" in d:  # absent: written before manifest checksums (bams3 <= 0.1, §3.5)
            want = manifest_checksum(d)
            if d["checksum"] != want:
                raise IndexError_(f"manifest checksum mismatch: it records {str(d['checksum'])[:80]!r}, "
                                  f"its content hashes to {want!r}; the manifest is corrupted")
        check_version(d.get("version"))
        if d.get("streams") != list(STREAM_NAMES):
            raise IndexError_("manifest lists streams this reader does not know")
        try:
            d["header"] = ObjectRef(**d["header"])
            d["chunks"] = [ObjectRef(**c) for c in d["chunks"]]
            d["index"] = [ObjectRef(**c) for c in d["index"]]
            for ref in [d["header"], *d["chunks"], *d["index"]]:
                check_key(ref.key)
            return cls(**d)
        except (TypeError, KeyError) as e:
            raise IndexError_(f"malformed manifest ({e})") from None

    @property
    def wide(self) -> bool:
        """A v1.1 dataset: wide records (64-bit positions), v1.1 blocks and index pages."""
        return self.version in (FORMAT_VERSION_WIDE, FORMAT_VERSION_WIDE_CODECS)

    @property
    def ref_ids(self) -> dict[str, int]:
        return {r["name"]: i for i, r in enumerate(self.references)}

    def index_for(self, ref_id: int) -> ObjectRef | None:
        for ix in self.index:
            if ix.ref_id == ref_id:
                return ix
        return None

    def object_keys(self) -> list[str]:
        return [MANIFEST_KEY, self.header.key] + [c.key for c in self.chunks] + [i.key for i in self.index]


# -- manifest checksum and keys (§3.5, §2.1) ------------------------------------------------
class _NotInteger(Exception):
    pass


def _no_float(text: str):
    raise _NotInteger(text[:40])


def _no_duplicates(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"member {dup!r} appears twice")
    return d


def canonical_json(value) -> bytes:
    """The canonical form of §3.5: members sorted by key (code point order), no whitespace,
    every character outside printable ASCII escaped as ``\\uXXXX`` (UTF-16 code units)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def manifest_checksum(d: dict) -> str:
    """``"sha256:"`` + SHA-256 of the canonical JSON of every member of ``d`` but ``checksum``."""
    body = {k: v for k, v in d.items() if k != "checksum"}
    return "sha256:" + hashlib.sha256(canonical_json(body)).hexdigest()


def _indented(v, level: int) -> str:
    """``json.dumps(v, indent=1)``, except that a ``pages`` array is written on one line."""
    pad = " " * (level + 1)
    if isinstance(v, dict) and v:
        items = [f"{pad}{json.dumps(k)}: " + (json.dumps(x) if k == "pages" and isinstance(x, list)
                                              else _indented(x, level + 1)) for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * level + "}"
    if isinstance(v, list) and v:
        return "[\n" + ",\n".join(pad + _indented(x, level + 1) for x in v) + "\n" + " " * level + "]"
    return json.dumps(v)


MAX_KEY_BYTES = 1024


def check_key(key) -> str:
    """An object key named by a manifest (§2.1): relative, under ``data/``, no empty, ``.``
    or ``..`` segment, no backslash, NUL or other control character. Raises IndexError_."""
    ok = (isinstance(key, str) and 0 < len(key.encode("utf-8", "surrogatepass")) <= MAX_KEY_BYTES
          and not any(c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in key))
    if ok:
        parts = key.split("/")
        ok = len(parts) >= 3 and parts[0] == "data" and not any(p in ("", ".", "..") for p in parts)
    if not ok:
        raise IndexError_(f"malformed manifest (object key {str(key)[:100]!r} is not a key inside the dataset)")
    return key
