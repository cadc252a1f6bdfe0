"""The Python API: a dataset opened like a ``pysam.AlignmentFile``, plus Arrow tables.

::

    import bams3

    with bams3.open("s3://bucket/sample.bams3") as ds:
        ds.references                       # ('chr1', 'chr2', ...)
        for read in ds.fetch("chr1", 1000, 2000):   # pysam.AlignedSegment, as pysam yields them
            ...
        ds.count(region="chr1:1001-2000")
        t = ds.to_arrow("chr1:1001-2000", columns=["pos", "flag", "cigar", "mapq"])

Coordinates follow pysam: ``start``/``stop`` are 0-based, half-open; a ``region`` string is
samtools' 1-based, inclusive syntax. Records are those ``samtools view`` returns for the
region (overlap), in the same order.

``to_arrow`` reads only the streams its columns need (FORMAT.md §6.2, §7). Its columns, all
SAM values (a missing value, SAM's ``*``, is null):

=========  ===========================  ===============================================
column     Arrow type                   value
=========  ===========================  ===============================================
qname      string                       QNAME
flag       uint16                       FLAG
rname      dictionary<int32, string>    RNAME (null: unplaced)
pos        int64                        POS, **1-based as in SAM** (0: unplaced)
mapq       uint8                        MAPQ
cigar      string                       CIGAR text (null: ``*``)
rnext      dictionary<int32, string>    RNEXT as a name, never ``=`` (null: ``*``)
pnext      int64                        PNEXT, 1-based (0: none)
tlen       int64                        TLEN
seq        string                       SEQ (null: ``*``)
qual       string                       QUAL, Phred+33 (null: ``*``)
tags       string                       the optional fields as SAM text, tab-separated
                                        in stored order (null: none)
=========  ===========================  ===============================================

A CIGAR of more than 65,535 operations is stored by BAM in the ``CG`` tag; the ``cigar``
column then holds the placeholder BAM stores (``<l_seq>S<rlen>N``) and ``tags`` the ``CG``
tag (``fetch`` gives the real CIGAR, as pysam does).

Reads from several threads at once are safe: each call runs its own fetches; the dataset's
index pages are cached and shared.
"""

from __future__ import annotations

import math
import struct
from typing import Iterable, Iterator

import numpy as np

from bams3core.regions import MAX_END, Region

from .errors import InputError

COLUMNS = ("qname", "flag", "rname", "pos", "mapq", "cigar", "rnext", "pnext", "tlen", "seq", "qual", "tags")
# the block fields (bams3core.codec.FIELD_STREAMS) each column decodes
_COLUMN_FIELDS = {"qname": ("name",), "flag": ("flag",), "rname": ("refid",), "pos": ("pos",), "mapq": ("mapq",),
                  "cigar": ("cigar",), "rnext": ("mate",), "pnext": ("mate",), "tlen": ("mate",),
                  "seq": ("seq",), "qual": ("qual",), "tags": ("tags",)}
_CIGAR_OPS = np.array(list("MIDNSHP=XB??????"))
_BASES = np.frombuffer(b"=ACMGRSVTWYHKDBN", dtype=np.uint8)


def open(uri: str, *, s3_region: str | None = None, endpoint_url: str | None = None, session=None,
         concurrency: int | None = None, threads: int = 2, cache: bool = True, cache_dir: str | None = None,
         refresh: bool = False, snapshot: str | None = None) -> "AlignmentDataset":
    """Open a dataset (a local directory or ``s3://bucket/prefix``) for reading.

    S3 options are the CLI's: ``s3_region`` (``--s3-region``), ``endpoint_url`` (else
    ``AWS_ENDPOINT_URL``), ``concurrency`` (``--s3-concurrency``, default 2 x ``threads``),
    ``cache``/``cache_dir`` (``--no-cache``/``--cache-dir``: the metadata cache),
    ``refresh``, ``snapshot`` (a run id, as ``--snapshot``). Credentials come from boto3's
    standard chain, or from ``session`` (a ``boto3.Session``, e.g. for a profile)."""
    from .dataset import Dataset
    from .store import open_store

    if not uri.startswith("s3://"):
        import os

        if os.path.isfile(uri):
            raise InputError(f"{uri}: is a file, not a bams3 dataset (a directory or s3://bucket/prefix)")
    opts = dict(region=s3_region, endpoint_url=endpoint_url, session=session,
                concurrency=concurrency or 2 * max(1, threads), use_cache=cache, cache_dir=cache_dir)
    store = open_store(uri, **opts)
    try:
        ds = Dataset.open(store, threads=threads, refresh=refresh, snapshot=snapshot)
    except BaseException:
        store.close()
        raise
    return AlignmentDataset(ds, uri)


class AlignmentDataset:
    """An opened dataset; see :func:`open`. A context manager (closing releases connections)."""

    def __init__(self, dataset, uri: str = ""):
        self.dataset = dataset  # the bams3.dataset.Dataset underneath
        self.uri = uri or dataset.store.uri
        self._header = None

    # -- metadata ------------------------------------------------------------------------
    @property
    def references(self) -> tuple[str, ...]:
        """Reference names, in header order (``pysam.AlignmentFile.references``)."""
        return tuple(r["name"] for r in self.dataset.manifest.references)

    @property
    def lengths(self) -> tuple[int, ...]:
        """Reference lengths (``pysam.AlignmentFile.lengths``)."""
        return tuple(int(r["length"]) for r in self.dataset.manifest.references)

    @property
    def nreferences(self) -> int:
        return len(self.dataset.manifest.references)

    @property
    def header_text(self) -> str:
        """The SAM header, verbatim (one small read, then cached)."""
        return self.dataset.header_text()

    @property
    def header(self):
        """The header as a ``pysam.AlignmentHeader`` (parsed by htslib, as for a BAM file)."""
        if self._header is None:
            from .output import open_segments

            with open_segments(self.dataset.bam_header(), iter(())) as af:
                self._header = af.header
        return self._header

    @property
    def mapped(self) -> int:
        return int(sum(self.dataset.manifest.stats["mapped"]))

    @property
    def unmapped(self) -> int:
        st = self.dataset.manifest.stats
        return int(sum(st["unmapped"]) + st["unplaced"])

    def stats(self) -> dict:
        """``{"records", "flagstat", "idxstats"}`` from the manifest alone (no data read):
        ``flagstat`` equals ``samtools flagstat -O json``; ``idxstats`` holds
        ``samtools idxstats`` rows ``[name, length, mapped, unmapped]`` (last: ``*``)."""
        from bams3core.stats import flagstat_json, idxstats_rows

        m = self.dataset.manifest
        st = m.stats
        return {"records": m.n_records, "flagstat": flagstat_json(st["flagstat"]),
                "idxstats": idxstats_rows(self.references, self.lengths, st["mapped"], st["unmapped"],
                                          st["unplaced"])}

    @property
    def query_stats(self):
        """Requests, bytes, blocks and records read so far (a ``QueryStats``)."""
        return self.dataset.qstats

    # -- regions -------------------------------------------------------------------------
    def _regions(self, contig, start, stop, region, reference=None, end=None) -> list[Region] | None:
        contig = contig if contig is not None else reference
        stop = stop if stop is not None else end
        if region is not None:
            if contig is not None or start is not None or stop is not None:
                raise ValueError("give either region or contig/start/stop, not both")
            if isinstance(region, str):
                region = [region]
            return [self._parse(r) for r in region]
        if contig is None:
            if start is not None or stop is not None:
                raise ValueError("start/stop need a contig")
            return None
        ids = self.dataset.manifest.ref_ids
        if contig not in ids:
            raise ValueError(f"invalid contig `{contig}`")
        beg = 0 if start is None else int(start)
        fin = MAX_END if stop is None else int(stop)
        if beg < 0 or fin < beg:
            raise ValueError(f"invalid coordinates: start ({start}) > stop ({stop})" if fin < beg
                             else f"start out of range ({start})")
        return [Region(ids[contig], beg, fin, contig)]

    def _parse(self, text: str) -> Region:
        try:
            return self.dataset.parse_region(text)
        except InputError as e:
            raise ValueError(str(e)) from None

    def _placed(self) -> list[Region]:
        """Every reference in order: what pysam's ``fetch()`` without a region iterates."""
        return [Region(i, 0, MAX_END) for i in range(self.nreferences)]

    # -- records -------------------------------------------------------------------------
    def fetch(self, contig: str | None = None, start: int | None = None, stop: int | None = None,
              region: str | Iterable[str] | None = None, *, reference: str | None = None,
              end: int | None = None, until_eof: bool = False) -> Iterator:
        """``pysam.AlignedSegment``s overlapping the region, in file order: what
        ``pysam.AlignmentFile(bam).fetch(...)`` yields for the source BAM (``start``/``stop``
        0-based half-open; ``region`` samtools' text, or a list of them, each in turn).
        Without a region: every placed record (pysam's ``fetch()``); ``until_eof=True``: every
        record, unplaced ones included."""
        from .export import refuse_wide
        from .output import open_segments

        ds = self.dataset
        if ds.wide:
            raise refuse_wide("bam")
        regions = self._regions(contig, start, stop, region, reference, end)
        if regions is None and not until_eof:
            regions = self._placed()
        batches = ds.query(regions)
        with open_segments(ds.bam_header(), batches) as af:
            yield from af

    def count(self, contig: str | None = None, start: int | None = None, stop: int | None = None,
              region: str | Iterable[str] | None = None, *, reference: str | None = None,
              end: int | None = None, until_eof: bool = False) -> int:
        """How many records :meth:`fetch` would yield (``samtools view -c``), decoding only
        the blocks at the region's edges, and of them only positions, flags and CIGARs."""
        regions = self._regions(contig, start, stop, region, reference, end)
        if regions is None and not until_eof:
            regions = self._placed()
        return self.dataset.count(regions)

    # -- Arrow ---------------------------------------------------------------------------
    def iter_arrow(self, region: str | Iterable[str] | None = None, columns: Iterable[str] | None = None, *,
                   contig: str | None = None, start: int | None = None, stop: int | None = None):
        """``pyarrow.RecordBatch``es (one per block with records in the region) of
        :meth:`to_arrow`: memory stays bounded by a few blocks."""
        import pyarrow as pa

        columns = list(COLUMNS if columns is None else columns)
        bad = [c for c in columns if c not in _COLUMN_FIELDS]
        if bad or not columns:
            raise ValueError(f"unknown column(s) {', '.join(map(repr, bad))}; known: {', '.join(COLUMNS)}"
                             if bad else "no columns asked for")
        regions = self._regions(contig, start, stop, region)
        fields = tuple(dict.fromkeys(f for c in columns for f in _COLUMN_FIELDS[c]))
        schema = arrow_schema(columns)
        refs = pa.array(self.references, type=pa.string())
        for c, mask in self.dataset.query_columns(regions, fields):
            idx = None if mask is None else np.flatnonzero(mask)
            arrays = [_column(name, c, idx, schema.field(name).type, refs) for name in columns]
            yield pa.RecordBatch.from_arrays(arrays, schema=schema)

    def to_arrow(self, region: str | Iterable[str] | None = None, columns: Iterable[str] | None = None, *,
                 contig: str | None = None, start: int | None = None, stop: int | None = None):
        """A ``pyarrow.Table`` of the records ``samtools view`` returns for ``region`` (None:
        every record, unplaced ones last), with ``columns`` (default: all; see the module
        docstring for names and types). Only the streams those columns need are read and
        decoded: positions, flags, CIGARs and MAPQ are a fraction of a block's bytes."""
        import pyarrow as pa

        columns = list(COLUMNS if columns is None else columns)
        batches = list(self.iter_arrow(region, columns, contig=contig, start=start, stop=stop))
        return pa.Table.from_batches(batches, schema=arrow_schema(columns))

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        self.dataset.store.close()

    def __enter__(self) -> "AlignmentDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<bams3 dataset {self.uri}: {self.dataset.manifest.n_records} records>"


# ---------------------------------------------------------------------------------------
def arrow_schema(columns):
    """The Arrow schema of :meth:`AlignmentDataset.to_arrow` for ``columns``."""
    import pyarrow as pa

    names = pa.dictionary(pa.int32(), pa.string())
    types = {"qname": pa.string(), "flag": pa.uint16(), "rname": names, "pos": pa.int64(), "mapq": pa.uint8(),
             "cigar": pa.string(), "rnext": names, "pnext": pa.int64(), "tlen": pa.int64(), "seq": pa.string(),
             "qual": pa.string(), "tags": pa.string()}
    return pa.schema([pa.field(c, types[c]) for c in columns])


def _strings(data: np.ndarray, lengths: np.ndarray, valid: np.ndarray | None):
    """A pyarrow string array from concatenated bytes and per-row lengths (rows not ``valid``:
    null, and their bytes are not in ``data``)."""
    import pyarrow as pa

    n = len(lengths)
    offs = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offs[1:])
    bufs = [None, pa.py_buffer(offs), pa.py_buffer(np.ascontiguousarray(data, dtype=np.uint8))]
    if valid is not None and not valid.all():
        bufs[0] = pa.py_buffer(np.packbits(valid, bitorder="little"))
        return pa.StringArray.from_buffers(n, bufs[1], bufs[2], bufs[0], null_count=int(n - valid.sum()))
    return pa.StringArray.from_buffers(n, bufs[1], bufs[2])


def _pieces(starts: np.ndarray, lens: np.ndarray, total: int) -> np.ndarray:
    """Mask over ``total`` items keeping ``lens[i]`` items from ``starts[i]``."""
    keep = np.zeros(total + 1, dtype=np.int64)
    np.add.at(keep, starts, 1)
    np.add.at(keep, starts + lens, -1)
    return np.cumsum(keep[:-1]) > 0


def _column(name: str, c, idx, typ, refs):
    import pyarrow as pa

    from bams3core.bam import gather

    n = len(c)
    take = (lambda a: a) if idx is None else (lambda a: a[idx])
    rows = np.arange(n) if idx is None else idx
    if name == "flag":
        return pa.array(take(c.flag).astype(np.uint16), type=typ)
    if name == "mapq":
        return pa.array(take(c.mapq).astype(np.uint8), type=typ)
    if name == "pos":
        return pa.array(take(c.pos).astype(np.int64) + 1, type=typ)
    if name == "pnext":
        return pa.array(take(c.next_pos).astype(np.int64) + 1, type=typ)
    if name == "tlen":
        return pa.array(take(c.tlen).astype(np.int64), type=typ)
    if name in ("rname", "rnext"):
        ids = take(c.refid if name == "rname" else c.next_refid).astype(np.int32)
        return pa.DictionaryArray.from_arrays(pa.array(ids, mask=ids < 0, type=pa.int32()), refs)
    if name == "qname":
        l_name = c.l_name
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(l_name[:-1], out=starts[1:])
        lens = l_name[rows] - 1
        return _strings(gather(c.names, starts[rows], lens), lens, None)
    if name == "cigar":
        n_cig = c.n_cigar
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(n_cig[:-1], out=starts[1:])
        words = c.cigar
        ops = np.char.add((words >> 4).astype(str), _CIGAR_OPS[words & 0xF]).tolist()
        out = ["".join(ops[s:s + k]) if k else None for s, k in zip(starts[rows].tolist(), n_cig[rows].tolist())]
        return pa.array(out, type=typ)
    if name == "seq":
        l_seq = c.l_seq
        lp = 2 * ((l_seq + 1) // 2)
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(lp[:-1], out=starts[1:])
        lens = l_seq[rows]
        return _strings(_BASES[gather(c.seq, starts[rows], lens)], lens, lens > 0)
    if name == "qual":
        l_seq = c.l_seq
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(l_seq[:-1], out=starts[1:])
        q = c.qual
        lens = l_seq[rows]
        first = np.where(lens > 0, q[np.minimum(starts[rows], max(len(q) - 1, 0))] if len(q) else 0, 0xFF)
        valid = (lens > 0) & (first != 0xFF)
        lens = np.where(valid, lens, 0)
        return _strings(gather(q, starts[rows], lens) + 33, lens, valid)
    if name == "tags":
        l_tags = c.l_tags
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(l_tags[:-1], out=starts[1:])
        buf = c.tags.tobytes()
        out = [format_tags(buf[s:s + k]) if k else None for s, k in zip(starts[rows].tolist(), l_tags[rows].tolist())]
        return pa.array(out, type=typ)
    raise ValueError(f"unknown column {name!r}")


_INT = {"c": "<b", "C": "<B", "s": "<h", "S": "<H", "i": "<i", "I": "<I"}


def _g(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return "%g" % x


def format_tags(area: bytes) -> str:
    """A BAM tag area as SAM text (``NM:i:0\\tMD:Z:10``), as samtools prints it."""
    out = []
    p = 0
    n = len(area)
    while p < n:
        key = area[p:p + 2].decode("ascii", "replace")
        t = chr(area[p + 2])
        p += 3
        if t == "A":
            out.append(f"{key}:A:{chr(area[p])}")
            p += 1
        elif t in _INT:
            fmt = _INT[t]
            out.append(f"{key}:i:{struct.unpack_from(fmt, area, p)[0]}")
            p += struct.calcsize(fmt)
        elif t == "f":
            out.append(f"{key}:f:{_g(struct.unpack_from('<f', area, p)[0])}")
            p += 4
        elif t in "ZH":
            e = area.index(b"\0", p)
            out.append(f"{key}:{t}:{area[p:e].decode('utf-8', 'surrogateescape')}")
            p = e + 1
        elif t == "B":
            sub = chr(area[p])
            (cnt,) = struct.unpack_from("<i", area, p + 1)
            p += 5
            if sub == "f":
                vals = [_g(v) for v in struct.unpack_from(f"<{cnt}f", area, p)]
                p += 4 * cnt
            else:
                fmt = _INT[sub]
                w = struct.calcsize(fmt)
                vals = [str(v) for v in struct.unpack_from(f"<{cnt}{fmt[1]}", area, p)]
                p += w * cnt
            out.append(f"{key}:B:{sub}" + "".join("," + v for v in vals))
        else:
            raise ValueError(f"unknown tag type {t!r}")
    return "\t".join(out)
