"""What a dataset costs (``bams3 cost``, the ``storage-report`` flow): the I/O half.

This module reads what the numbers need — a dataset's object listing and index, or a
BAM/CRAM/SAM file's size and record count — and hands them to the pure functions of
:mod:`bams3core.cost`, which do all the arithmetic (so the CLI and the flow show the same numbers).
"""

from __future__ import annotations

import os
import zlib

from bams3core import cost
from bams3core.htsindex import HtsIndexError, index_counts
from bams3core.index import MANIFEST_KEY
from bams3core.query import plan_reads

from .dataset import Dataset, _split_reads
from .errors import InputError, NoSuchBucket, NotFound
from .store import Store, open_store, parse_uri

# what `bams3 query DATASET` (every record) does: merge reads over gaps < 1 MiB, split > 8 MiB
WHOLE_READ_MAX_GAP = 1 << 20
WHOLE_READ_MAX_BYTES = 8 << 20


def profile(store: Store) -> dict:
    """What queries of this dataset read: block sizes from its index, and the range reads a
    whole-dataset read makes (planned exactly as the reader plans them)."""
    ds = Dataset.open(store, refresh=True)
    m = ds.manifest
    rows = ds.all_rows()
    reads = _split_reads(plan_reads(rows, max_gap=WHOLE_READ_MAX_GAP), max_bytes=WHOLE_READ_MAX_BYTES)
    manifest_bytes = store.head(MANIFEST_KEY).size
    return {
        "uri": store.uri,
        "run_id": m.run_id,
        "records": m.n_records,
        "source": m.source,
        "chunks": len(m.chunks),
        "chunk_keys": [c.key for c in m.chunks],
        "chunk_bytes": [c.size for c in m.chunks],
        "blocks": int(len(rows)),
        "block_lengths": [int(x) for x in rows["length"]],
        "manifest_bytes": manifest_bytes,
        "header_bytes": m.header.size,
        "index_bytes": [ix.size for ix in m.index],
        # what a small region query reads of an index: one page (the whole object if unpaged)
        "index_page_bytes": [p[1] for ix in m.index for p in (ix.pages or [[0, ix.size]])],
        "whole_read_sizes": [rr.size for rr in reads],
    }


def noncurrent_versions(store: Store) -> list | None:
    """The noncurrent versions and delete markers under an S3 store's prefix if its bucket is
    versioned or suspended (:func:`bams3.store.s3admin.noncurrent_versions`); None for a
    non-versioned bucket or a local directory."""
    from .store import s3admin
    from .store.s3 import S3Store

    if not isinstance(store, S3Store) or not s3admin.is_versioned(store):
        return None
    return s3admin.noncurrent_versions(store)


def dataset_report(store: Store, *, egress: str = "internet") -> dict:
    """:func:`bams3core.cost.dataset_costs` for the dataset in ``store``: the objects of the
    dataset (its own run and anything else under its prefix) and its index profile; in a
    versioned (or suspended) S3 bucket also the noncurrent versions and delete markers under
    the prefix (``"noncurrent"`` and ``"total"``; a non-versioned bucket costs no extra request)."""
    prof = profile(store)
    objects = [(o.key, o.size, o.storage_class or "STANDARD") for o in store.list_prefix("")]
    rep = cost.dataset_costs("", objects, prof, egress=egress, noncurrent=noncurrent_versions(store))
    rep["uri"] = store.uri
    return rep


# ---------------------------------------------------------------------------------------------
# before a migration: a BAM/CRAM/SAM file
# ---------------------------------------------------------------------------------------------
class _Source:
    """A file, local or ``s3://bucket/key``: size, first bytes, sibling files, a stream."""

    def __init__(self, path: str, **s3_options):
        self.path = path
        scheme, bucket, key = parse_uri(path)
        self.s3 = scheme == "s3"
        if self.s3:
            if not key:
                raise InputError(f"{path}: expected s3://bucket/key of a BAM, CRAM or SAM file")
            self.store = open_store(f"s3://{bucket}", **s3_options)
            self.key = key
            try:
                self.size = self.store.head(key).size
            except NotFound:
                raise InputError(f"{path}: no such object") from None
        else:
            if not os.path.isfile(path):
                raise InputError(f"{path}: no such file")
            self.size = os.path.getsize(path)

    def head(self, n: int) -> bytes:
        if self.s3:
            return self.store.get(self.key, (0, min(n, self.size)))
        with open(self.path, "rb") as f:
            return f.read(n)

    def sibling(self, suffix: str, strip: str | None = None) -> tuple[str, bytes] | None:
        base = self.key if self.s3 else self.path
        if strip and base.endswith(strip):
            base = base[: -len(strip)]
        name = base + suffix
        if self.s3:
            try:
                return f"s3://{self.store.bucket}/{name}", self.store.get(name)
            except NotFound:
                return None
        if os.path.isfile(name):
            with open(name, "rb") as f:
                return name, f.read()
        return None

    def stream(self):
        return self.store.open_read(self.key) if self.s3 else open(self.path, "rb")

    def close(self):
        if self.s3:
            self.store.close()


def _sniff(head: bytes) -> str:
    if head[:4] == b"CRAM":
        return "cram"
    if head[:2] == b"\x1f\x8b":
        try:
            d = zlib.decompressobj(31).decompress(head, 4)
        except zlib.error:
            d = b""
        if d[:4] == b"BAM\x01":
            return "bam"
        raise InputError("gzip-compressed input that is not BAM: bams3 cost takes BAM, CRAM or SAM")
    if head[:1] == b"@" or b"\t" in head.split(b"\n", 1)[0]:
        return "sam"
    raise InputError("not a BAM, CRAM or SAM file")


def source_estimate(path: str, *, chunk_bytes: int = 16 << 20, **s3_options) -> dict:
    """:func:`bams3core.cost.estimate_dataset` for a BAM/CRAM/SAM file (local or s3://).

    Record count: BAM from its BAI/CSI (``X.bam.bai``, ``X.bai``, ``X.bam.csi``); CRAM from
    ``samtools idxstats`` when local and indexed (``.crai``); SAM by counting its lines;
    otherwise estimated from the file size."""
    src = _Source(path, **s3_options)
    try:
        fmt = _sniff(src.head(1 << 16))
        records, records_from = None, ""
        if fmt == "bam":
            for suffix, strip in ((".bai", None), (".bai", ".bam"), (".csi", None)):
                found = src.sibling(suffix, strip)
                if found is None:
                    continue
                try:
                    c = index_counts(found[1])
                except HtsIndexError as e:
                    raise InputError(f"{found[0]}: {e}") from None
                records, records_from = c["records"], f"{c['format']} index ({found[0]})"
                break
        elif fmt == "cram" and not src.s3 and any(os.path.isfile(src.path + s) for s in (".crai",)):
            import pysam

            rows = [ln.split("\t") for ln in pysam.idxstats(src.path).splitlines() if ln]
            records = sum(int(r[2]) + int(r[3]) for r in rows)
            records_from = f"samtools idxstats ({src.path}.crai)"
        elif fmt == "sam":
            n = 0
            with src.stream() as f:
                for line in f:
                    if not line.startswith(b"@") and line.strip():
                        n += 1
            records, records_from = n, "counted (SAM lines)"
        return dict(cost.estimate_dataset(fmt, src.size, records, records_from=records_from,
                                          chunk_bytes=chunk_bytes), path=path)
    finally:
        src.close()


def is_dataset(path: str, **s3_options) -> bool:
    """Is there a bams3 dataset (a manifest) at ``path``?"""
    scheme, _bucket, _prefix = parse_uri(path)
    if scheme == "file":
        return os.path.isfile(os.path.join(path, MANIFEST_KEY))
    with open_store(path, **s3_options) as st:
        try:
            st.head(MANIFEST_KEY)  # a 404 is told apart from a missing bucket (NoSuchBucket)
        except NoSuchBucket:
            raise
        except NotFound:
            return False
        return True
