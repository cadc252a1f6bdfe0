"""Datasets on a store: the writer (encode, upload, commit) and the reader (plan, fetch, decode).

Object layout under the dataset prefix (docs/FORMAT.md §Objects)::

    manifest.json                       commit point, written last
    data/<run_id>/header.sam            SAM header text, verbatim
    data/<run_id>/index/<ref_id>.b3i    per-reference block index (unplaced.b3i for '*')
    data/<run_id>/chunks/<n>.b3c        chunk objects: blocks of columnar streams
    _tmp/<run_id>/run-<k>               spill runs of an unsorted conversion (removed on commit)
    runs/<run_id>.json                  the run's lease, refreshed while it runs (bams3.runs)

Every object a run writes lives under ``data/<run_id>/``, so a conversion in progress never
touches the committed dataset; ``--overwrite`` swaps the manifest it read (compare-and-swap)
and then deletes the old run. Leftovers are removed only for runs proven dead (bams3.runs).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import threading
import uuid
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from bams3core import layout
from bams3core.bam import BamHeader, RecordBatch, Reference
from bams3core.codec import (PLAIN_STREAMS, STREAM_NAMES, BlockColumns, BlockEncoder, CodecError, EncodedBlock,
                             assemble_records, frame_self_checked, split_streams, streams_for)
from bams3core.index import (ENTRY_DTYPE, ENTRY_DTYPE_WIDE, HEADER_KEY, writer_version,
                             MANIFEST_KEY, IndexError_, IndexPage, Manifest, ObjectRef,
                             decode_index, encode_index_pages, narrow_entries, select_pages, widen_entries)
from bams3core.shards import merge_rows
from bams3core.query import RangeRead, overlap_mask, plan_reads, select_blocks
from bams3core.regions import Region, RegionError, parse_region
from bams3core.stats import StatsAccumulator, flagstat_counts

from . import __version__, runs, snapshots
from .errors import Archived, DatasetError, InputError, NoSuchBucket, NotFound, PreconditionFailed
from .store import Store

_local = threading.local()


def _encoder() -> BlockEncoder:
    enc = getattr(_local, "encoder", None)
    if enc is None:
        enc = _local.encoder = BlockEncoder()
    return enc


def encode_block(batch: RecordBatch) -> tuple[EncodedBlock, np.ndarray, np.ndarray]:
    """Encode one planned block; also return its fixed fields and flagstat counts (thread-safe)."""
    fx = batch.fixed()
    try:
        return _encoder().encode(batch, fx), fx, flagstat_counts(fx)
    except CodecError as e:
        raise InputError(f"cannot encode records at {_where(fx)}: {e}") from None


def _where(fx) -> str:
    return f"refid {int(fx['refid'][0])} pos {int(fx['pos'][0]) + 1}" if len(fx) else "?"


def block_is_wide(row) -> bool:
    """Whether an index row's block has the v1.1 wide layout (u64 pos/npos/tlen streams)."""
    return "layout" in row.dtype.names and bool(row["layout"])


STALE_SECONDS = layout.STALE_SECONDS  # a run without a lease is dead once all it left is this old


def run_prefix(run_id: str) -> str:
    return f"data/{run_id}/"


class DatasetWriter:
    """Writes one run of a dataset; :meth:`commit` makes it visible.

    The shards of the run (:mod:`bams3.stages`) upload its chunks, anywhere; this object holds
    the run's lease in the orchestrating process and commits their results.
    """

    WRITE_THREADS = 4  # index and header objects written at once by a commit

    def __init__(self, store: Store, header: BamHeader, *, block_bytes: int, chunk_bytes: int,
                 overwrite: bool = False, sorted_by: str = "input", source: str = "",
                 run_id: str | None = None, extra: dict | None = None, keep_snapshots: int = 1,
                 keep_days: float | None = None):
        self.store = store
        self.keep_snapshots = keep_snapshots  # previous snapshots kept besides the current one (§2.6)
        self.keep_days = keep_days  # and every snapshot written less than this many days ago
        self.wide = False  # a block in the wide layout was written: the dataset is format v1.1
        self.header = header
        self.block_bytes = block_bytes
        self.chunk_bytes = chunk_bytes
        self.overwrite = overwrite
        self.sorted_by = sorted_by
        self.source = source
        self.extra = dict(extra or {})  # the manifest's `extra` (FORMAT.md §3.1), e.g. {"source": identity}
        self.run_id = run_id or uuid.uuid4().hex[:16]
        if not layout.is_run_id(self.run_id):
            raise ValueError(f"run id {self.run_id!r} is not 16 lowercase hex digits")
        self.prefix = run_prefix(self.run_id)
        self.stats = StatsAccumulator(n_refs=len(header.references))
        self.chunks: dict[int, ObjectRef] = {}
        self.index: list[ObjectRef] = []
        self._rows: list[np.ndarray] = []
        self._rows_ref: int | None = None
        self._lock = threading.Lock()
        self.previous: Manifest | None = None
        self.previous_etag: str | None = None  # the manifest read by prepare(): commit replaces exactly it
        self.previous_bytes: bytes | None = None
        self.lease: runs.Lease | None = None
        self.n_records = 0
        self.prepared = False
        self.committed = False
        self._sweeper: Future | None = None
        self._empty_before = False  # prepare() found no object at all under the prefix
        self._writer_pool: ThreadPoolExecutor | None = None
        self._writes: list[Future] = []

    # -- lifecycle -----------------------------------------------------------------------
    def prepare(self) -> None:
        """Refuse to clobber a committed dataset (unless overwrite) or to write into a prefix
        holding anything but bams3 objects, take this run's lease, then clear dead runs.

        The refusals come before any write; the leftover sweep (listings, aborts, deletes: a
        few round trips on S3) runs on a background thread (while a conversion plans its shards)
        and is joined before this run writes a chunk, an index or the manifest (a conversion
        joins it before any shard starts; its errors surface there). It removes only what :func:`bams3.runs.find_leftovers`
        attributes to dead runs: never a live run's objects, never a key outside the layout."""
        try:
            data, info = self.store.get_with_info(MANIFEST_KEY)
        except NotFound:
            data = info = None
        if data is not None:
            if not self.overwrite:
                raise DatasetError(f"{self.store.uri}: a dataset already exists here; use --overwrite to replace it")
            self.previous_etag = info.etag
            self.previous_bytes = data
            try:
                self.previous = Manifest.from_json(data)
            except IndexError_:
                self.previous = None
        else:
            foreign, self._empty_before = runs.survey(self.store)
            if foreign is not None:
                raise DatasetError(f"{self.store.uri}: not empty and not a bams3 dataset (it holds {foreign}); "
                                   "convert into an empty directory or prefix")
        self.lease = runs.Lease(self.store, self.run_id)
        self.lease.start()
        self.prepared = True
        pool = ThreadPoolExecutor(1, thread_name_prefix="bams3-sweep")
        self._sweeper = pool.submit(self._sweep_leftovers)
        pool.shutdown(wait=False)  # the future outlives the pool; its thread ends with the sweep

    def _sweep_leftovers(self) -> None:
        # Leftovers of conversions that died; live runs (fresh lease, or young objects of a
        # run without one) and the committed dataset are kept.
        # an empty prefix before the lease: only unfinished uploads can be dead runs' leftovers
        plan = runs.find_leftovers(self.store, own={self.run_id}, empty_before=self._empty_before)
        if plan:
            runs.remove(self.store, plan)

    def _swept(self) -> None:
        """Wait for the leftover sweep started by :meth:`prepare`; re-raise its error."""
        if self._sweeper is not None:
            self._sweeper.result()

    def commit_shards(self, results: list) -> Manifest:
        """Commit the chunks the shards of this run uploaded (:class:`bams3.stages.ShardResult`,
        any order): chunks concatenated in shard order, their index rows pointed at the chunks'
        positions (:func:`bams3core.shards.merge_rows`), statistics summed; then :meth:`commit`."""
        results = sorted(results, key=lambda r: r.number)
        numbers = [n for r in results for n in r.numbers]
        refs = [c for r in results for c in r.chunks]
        rows = merge_rows([r.rows for r in results], numbers)
        self.chunks = dict(enumerate(refs))
        st = self.stats = StatsAccumulator(n_refs=len(self.header.references))
        for r in results:
            st.flagstat += np.asarray(r.flagstat, dtype=np.int64)
            if st.n_refs:
                st.mapped += np.asarray(r.mapped, dtype=np.int64)
                st.unmapped += np.asarray(r.unmapped, dtype=np.int64)
            st.unplaced += r.unplaced
        self.n_records = sum(r.n_records for r in results)
        self.wide = any(r.wide for r in results)
        self.index, self._rows, self._rows_ref = [], [], None
        if len(rows):
            self._add_rows(rows)  # index objects uploading (in parallel) while the rest is built
        return self.commit()

    def _add_rows(self, rows: np.ndarray) -> None:
        """Index rows in record order: one index object per reference."""
        start = 0
        refs = rows["ref_id"]
        for i in range(1, len(rows) + 1):
            if i == len(rows) or refs[i] != refs[start]:
                r = int(refs[start])
                if self._rows_ref is not None and r != self._rows_ref:
                    self._flush_index()
                self._rows_ref = r
                self._rows.append(rows[start:i])
                start = i

    def _flush_index(self) -> None:
        if self._rows_ref is None or not self._rows:
            return
        parts = self._rows
        if any(r.dtype == ENTRY_DTYPE_WIDE for r in parts):
            parts = [widen_entries(r) for r in parts]
        rows = np.concatenate(parts)
        if rows.dtype == ENTRY_DTYPE_WIDE and not rows["layout"].any():
            rows = narrow_entries(rows)  # a reference without wide blocks keeps a v1 index object
        ref_id = self._rows_ref
        name = "unplaced" if ref_id < 0 else str(ref_id)
        key = f"{self.prefix}index/{name}.b3i"
        data, pages = encode_index_pages(rows)
        self._swept()
        self._write(key, data)
        self.index.append(ObjectRef(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                    n_blocks=len(rows), n_records=int(rows["n_records"].sum()), ref_id=ref_id,
                                    pages=[p.to_list() for p in pages]))
        self._rows = []
        self._rows_ref = None

    def _write(self, key: str, data: bytes, **kw) -> None:
        """Start writing a run object (index, header) on the writer's pool; :meth:`_written`
        waits for all of them. They are independent small objects: in parallel, a commit costs
        one round trip for them instead of one per reference."""
        if self._writer_pool is None:
            self._writer_pool = ThreadPoolExecutor(self.WRITE_THREADS, thread_name_prefix="bams3-commit")
        self._writes.append(self._writer_pool.submit(self.store.set, key, data, **kw))

    def _written(self) -> None:
        """Wait for every write :meth:`_write` started (all of them, even after one failed, so an
        abort never races an upload still in flight); re-raise the first error."""
        writes, self._writes = self._writes, []
        futures_wait(writes)
        pool, self._writer_pool = self._writer_pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for f in writes:
            f.result()

    def _settle_writes(self) -> None:
        try:
            self._written()
        except Exception:  # noqa: BLE001 - the failure that matters is being handled already
            pass

    def commit(self) -> Manifest:
        """Write index remainder, header and — last — the manifest, conditionally: created if
        absent, or (``overwrite``) replacing exactly the manifest :meth:`prepare` read."""
        try:
            return self._commit()
        finally:
            self._settle_writes()  # after an error too: nothing of the commit stays in flight

    def _commit(self) -> Manifest:
        self._swept()
        self._flush_index()
        htext = self.header.text.encode("utf-8", errors="surrogateescape")
        hkey = f"{self.prefix}{HEADER_KEY}"
        self._write(hkey, htext)
        self._written()  # every index object and the header are stored before the manifest names them
        if sorted(self.chunks) != list(range(len(self.chunks))):
            raise DatasetError("internal error: missing chunk uploads")
        chunks = [self.chunks[i] for i in range(len(self.chunks))]
        st = self.stats
        manifest = Manifest(
            references=[{"name": r.name, "length": r.length} for r in self.header.references],
            header=ObjectRef(key=hkey, size=len(htext), sha256=hashlib.sha256(htext).hexdigest()),
            chunks=chunks,
            index=self.index,
            n_records=self.n_records,
            stats={"flagstat": st.flagstat.tolist(), "mapped": st.mapped.tolist(),
                   "unmapped": st.unmapped.tolist(), "unplaced": st.unplaced},
            run_id=self.run_id,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            tool=f"bams3 {__version__}",
            block_bytes=self.block_bytes,
            chunk_bytes=self.chunk_bytes,
            sorted_by=self.sorted_by,
            source=self.source,
            extra=dict(self.extra),
            version=writer_version(self.wide),
        )
        if self.lease is not None and not self.lease.holds():
            raise DatasetError(f"{self.store.uri}: this conversion's lease ({layout.lease_key(self.run_id)}) was not "
                               f"refreshed for over {self.lease.ttl / 2:.0f} s, so another process may have removed "
                               "its objects as a dead run's; nothing was committed: convert again")
        text = manifest.to_json()
        prev_run = self.previous.run_id if self.previous is not None and self.previous.run_id != self.run_id else None
        if prev_run is not None and self.keep_snapshots + (self.keep_days is not None) > 0:
            # the manifest being replaced becomes a snapshot *before* the swap, so its run is
            # never unprotected (a dataset written before snapshots has none yet)
            skey = layout.snapshot_key(prev_run)
            if not self.store.exists(skey):
                self.store.set(skey, self.previous_bytes, content_type="application/json")
        try:
            self.store.set(MANIFEST_KEY, text, if_none_match=self.previous_etag is None,
                           if_match=self.previous_etag, content_type="application/json")
        except PreconditionFailed:
            if not self._committed_here():
                if self.previous_etag is None:
                    raise PreconditionFailed(f"{self.store.uri}: a dataset already exists here (another conversion "
                                             "committed first); use --overwrite to replace it") from None
                raise PreconditionFailed(f"{self.store.uri}: another conversion replaced the dataset while this one "
                                         "ran; nothing was committed (convert again to replace it)") from None
        self.committed = True  # from here on the run is the dataset: never abort it
        # record this commit as a snapshot, remove the runs beyond the retention and this
        # run's spill leftovers, then the lease (best effort: a failure here leaves garbage that
        # a later commit, sweep or `bams3 cleanup` removes)
        pool = ThreadPoolExecutor(1, thread_name_prefix="bams3-tmp")
        tmp = pool.submit(self._remove_tmp)
        pool.shutdown(wait=False)
        try:  # while this run's _tmp/ goes on another thread
            self.store.set(layout.snapshot_key(self.run_id), text, content_type="application/json")
            snapshots.apply_retention(self.store, current=self.run_id, previous=prev_run,
                                      keep=self.keep_snapshots, keep_days=self.keep_days)
        except Exception:  # noqa: BLE001
            pass
        futures_wait([tmp])
        self._end_lease()
        return manifest

    def _remove_tmp(self) -> None:
        """Delete this run's ``_tmp/<run>/`` (ledger, resume record, spill runs): best effort."""
        try:
            old = [o.key for o in self.store.list_prefix(f"_tmp/{self.run_id}/")]
            if old:
                self.store.delete(old)
        except Exception:  # noqa: BLE001
            pass

    def _committed_here(self) -> bool:
        """After a failed conditional manifest write: did an earlier attempt of ours succeed
        (its reply lost)? True if the manifest now names this run."""
        try:
            return Manifest.from_json(self.store.get(MANIFEST_KEY)).run_id == self.run_id
        except (NotFound, IndexError_):
            return False

    def _end_lease(self) -> None:
        if self.lease is not None:
            try:
                self.lease.end()
            except Exception:  # noqa: BLE001 - a stale lease of a finished run is removed later
                self.lease.stop()

    def suspend(self) -> None:
        """Stop without removing anything: the run's chunks stay for ``--resume``; its lease is
        marked failed so that a resumed conversion may take the run over at once (and, left
        alone, it is a dead run's, removed by a later sweep or ``bams3 cleanup``)."""
        if self.committed:
            return
        if self._sweeper is not None:
            futures_wait([self._sweeper])
        self._settle_writes()
        if self.lease is not None:
            try:
                self.lease.fail()
            except Exception:  # noqa: BLE001
                self.lease.stop()

    def abort(self) -> None:
        """Remove everything this run wrote (best effort); the committed dataset is untouched."""
        if self.committed:
            return
        try:
            if self._sweeper is not None:
                futures_wait([self._sweeper])  # it may still be listing/deleting: let it finish first
            self._settle_writes()  # and no index/header upload may land after the listing
            mine = (self.prefix, f"_tmp/{self.run_id}/")
            self.store.abort_uploads([u for p in mine for u in self.store.incomplete_uploads(p)])
            keys = [o.key for p in mine for o in self.store.list_prefix(p)]
            self.store.delete(keys)
        except Exception:  # noqa: BLE001 - abort must not mask the original error
            pass
        self._end_lease()  # last: while its objects remain, the run stays attributable


# ---------------------------------------------------------------------------------------
@dataclass
class QueryStats:
    """What a query read: data requests and bytes (chunk objects only), blocks and records."""

    requests: int = 0
    bytes: int = 0
    blocks: int = 0
    records_decoded: int = 0
    records_out: int = 0
    blocks_with_hits: int = 0  # decoded blocks holding at least one returned record


class Stale(DatasetError):
    """An object the manifest names is gone (404) or replaced (412): the dataset was committed
    again after the manifest was read (or is damaged)."""


class Dataset:
    """A committed dataset, opened for reading.

    Coherence (docs/FORMAT.md §2.3): a query reads the objects of one manifest only. If one of
    them is gone or replaced (another machine committed and the retention removed this
    snapshot's run), and no record was returned yet, the query re-reads the manifest from the
    store (no cache) and restarts once on it; a pinned snapshot (``snapshot=``) is not switched.
    """

    def __init__(self, store: Store, manifest: Manifest, *, threads: int = 2, refresh: bool = False,
                 snapshot: str | None = None):
        self.store = store
        self.snapshot = snapshot  # a run id: this snapshot was asked for, never switch to another
        self._set_manifest(manifest)
        self.threads = max(1, threads)
        self.refresh = refresh  # revalidate cached header/index copies with the store (verify)
        self.qstats = QueryStats()
        self._qlock = threading.Lock()
        # whether this dataset's plain stream frames carry zstd checksums, so a projection may
        # fetch only some frames of a block (None: not seen yet; bams3core.codec.PLAIN_STREAMS)
        self._frames_checked: bool | None = None

    def _set_manifest(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._index: dict[int, np.ndarray] = {}
        self._page_rows: dict[tuple[int, int], np.ndarray] = {}
        self.header = BamHeader(text="", references=[Reference(r["name"], r["length"]) for r in manifest.references])
        self.wide = manifest.wide  # v1.1: blocks decode to wide records (RecordBatch.wide)
        self._entry_dtype = ENTRY_DTYPE_WIDE if self.wide else ENTRY_DTYPE
        self._header_loaded = False

    @classmethod
    def open(cls, store: Store, *, threads: int = 2, refresh: bool = False,
             snapshot: str | None = None) -> "Dataset":
        """Read and check the manifest (§2.3), or (``snapshot``, a run id) the snapshot
        manifest of that commit (§2.6). Bytes that fail the check (a damaged cached copy, or a
        damaged read) are dropped from the cache and read once more before giving up."""
        if snapshot is not None:
            try:
                _data, manifest = snapshots.read_snapshot(store, snapshot)
            except NoSuchBucket:
                raise
            except NotFound:
                raise DatasetError(f"{store.uri}: no bams3 dataset here") from None
            return cls(store, manifest, threads=threads, refresh=refresh, snapshot=snapshot)
        return cls(store, cls._read_manifest(store, refresh), threads=threads, refresh=refresh)

    @staticmethod
    def _read_manifest(store: Store, refresh: bool) -> Manifest:
        try:
            data, _info = store.get_small(MANIFEST_KEY, max_age=0 if refresh else None)
            try:
                manifest = Manifest.from_json(data)
            except IndexError_:
                store.invalidate(MANIFEST_KEY)
                data, _info = store.get_small(MANIFEST_KEY, max_age=0)
                manifest = Manifest.from_json(data)
        except NoSuchBucket:
            raise
        except NotFound:
            raise DatasetError(f"{store.uri}: no bams3 dataset here (no {MANIFEST_KEY}; "
                               "a conversion that did not finish leaves none)") from None
        except IndexError_ as e:
            raise DatasetError(f"{store.uri}/{MANIFEST_KEY}: {e}") from None
        return manifest

    def _reopen(self) -> bool:
        """After a Stale read: take the store's current manifest (bypassing the cache). False if
        there is nothing else to switch to (a pinned snapshot, or the manifest did not change:
        the object is damaged, not superseded)."""
        if self.snapshot is not None:
            return False
        manifest = self._read_manifest(self.store, True)
        if manifest.run_id == self.manifest.run_id:
            return False
        self._set_manifest(manifest)
        return True

    def _coherent(self, make) -> Iterator[RecordBatch]:
        """The batches of ``make()``; restarted once on a fresh manifest if an object turned
        out superseded before any batch was returned (§2.3)."""
        returned = False
        try:
            for b in make():
                returned = True
                yield b
        except Stale:
            if returned or not self._reopen():
                raise
        else:
            return
        yield from make()

    # -- metadata ------------------------------------------------------------------------
    def _read_checked(self, ref: ObjectRef, what: str) -> bytes:
        """A whole header or index object, checked against the manifest's size and SHA-256; a
        copy that fails (a damaged cache entry) is dropped and fetched again, once."""
        for _attempt in range(2):
            try:
                data, _ = self.store.get_small(ref.key, max_age=0 if self.refresh else float("inf"))
            except NotFound:
                raise Stale(f"{self.store.uri}/{ref.key}: missing {what} object (the dataset was committed again "
                            "after its manifest was read, or is damaged); run the command again or verify the "
                            "dataset") from None
            if len(data) == ref.size and hashlib.sha256(data).hexdigest() == ref.sha256:
                return data
            self.store.invalidate(ref.key)
        raise DatasetError(f"{self.store.uri}/{ref.key}: checksum mismatch (corrupt {what})")

    def header_text(self) -> str:
        if not self._header_loaded:
            try:
                data = self._read_checked(self.manifest.header, "header")
            except Stale:
                if not self._reopen():
                    raise
                data = self._read_checked(self.manifest.header, "header")
            self.header.text = data.decode("utf-8", errors="surrogateescape")
            self._header_loaded = True
        return self.header.text

    def bam_header(self) -> BamHeader:
        self.header_text()
        return self.header

    def _pages(self, ref: ObjectRef) -> list[IndexPage] | None:
        try:
            pages = ref.index_pages()
        except IndexError_ as e:
            raise DatasetError(f"{self.store.uri}/{MANIFEST_KEY}: {e}") from None
        if pages is not None and (sum(p.length for p in pages) != ref.size or
                                  sum(p.n_entries for p in pages) != ref.n_blocks):
            raise DatasetError(f"{self.store.uri}/{MANIFEST_KEY}: the page directory of {ref.key} "
                               "does not add up")
        return pages

    def _decode_pages(self, ref: ObjectRef, pages: list[IndexPage], which: list[int], data: bytes,
                      base: int, check_crc: bool) -> None:
        """Decode pages ``which`` from ``data`` (which starts at byte ``base`` of the object)."""
        for i in which:
            p = pages[i]
            frame = data[p.offset - base:p.offset - base + p.length]
            if check_crc and (len(frame) != p.length or zlib.crc32(frame) != p.crc32):
                raise DatasetError(f"{self.store.uri}/{ref.key}: checksum mismatch (corrupt index page {i})")
            try:
                rows = self._rows_of(decode_index(frame, wide_ok=self.wide))
            except IndexError_ as e:
                raise DatasetError(f"{self.store.uri}/{ref.key}: {e}") from None
            if len(rows) != p.n_entries:
                raise DatasetError(f"{self.store.uri}/{ref.key}: index page {i} holds {len(rows)} entries, "
                                   f"the manifest says {p.n_entries}")
            self._page_rows[(ref.ref_id, i)] = rows

    def _rows_of(self, rows: np.ndarray) -> np.ndarray:
        """Decoded index rows in this dataset's row type (v1.1: v1 pages widened)."""
        return widen_entries(rows) if self.wide else rows

    def index(self, ref_id: int) -> np.ndarray:
        """Every index row of a reference (the whole index object, one GET)."""
        if ref_id not in self._index:
            ref = self.manifest.index_for(ref_id)
            if ref is None:
                self._index[ref_id] = np.zeros(0, dtype=self._entry_dtype)
                return self._index[ref_id]
            pages = self._pages(ref)
            data = self._read_checked(ref, "index")
            if pages is None:  # a single frame (datasets written before index paging)
                try:
                    self._index[ref_id] = self._rows_of(decode_index(data, wide_ok=self.wide))
                except IndexError_ as e:
                    raise DatasetError(f"{self.store.uri}/{ref.key}: {e}") from None
            else:
                self._decode_pages(ref, pages, list(range(len(pages))), data, 0, check_crc=True)
                parts = [self._page_rows[(ref_id, i)] for i in range(len(pages))]
                self._index[ref_id] = np.concatenate(parts) if parts else np.zeros(0, dtype=self._entry_dtype)
        return self._index[ref_id]

    def region_rows(self, region: Region) -> np.ndarray:
        """Index rows that may overlap ``region``: only the index pages it needs (one ranged GET)."""
        rows = self._candidate_rows(region.ref_id, [region])
        return rows[select_blocks(rows, region)]

    def _candidate_rows(self, ref_id: int, regions: list[Region]) -> np.ndarray:
        """The index rows of every page that ``regions`` (all on ``ref_id``) may need, in file
        order: the missing pages come with one ranged GET (first to last), cached; a
        single-page or unplaced index is read whole."""
        ref = self.manifest.index_for(ref_id)
        if ref is None:
            return np.zeros(0, dtype=self._entry_dtype)
        pages = self._pages(ref)
        if ref_id in self._index or pages is None or ref_id < 0 or len(pages) <= 1:
            return self.index(ref_id)
        which = sorted({i for r in regions for i in select_pages(pages, r.beg, r.end)})
        missing = [i for i in which if (ref_id, i) not in self._page_rows]
        if missing:
            a, b = pages[missing[0]], pages[missing[-1]]
            span = (a.offset, b.offset + b.length)
            try:
                data = self.store.get_small_range(ref.key, span)
            except NotFound:
                raise Stale(f"{self.store.uri}/{ref.key}: missing index object (the dataset was committed again "
                            "after its manifest was read, or is damaged); run the command again or verify the "
                            "dataset") from None
            try:
                self._decode_pages(ref, pages, missing, data, span[0], check_crc=True)
            except DatasetError:
                self.store.invalidate_range(ref.key, span)  # a stale or damaged cached copy: once more
                data = self.store.get_small_range(ref.key, span)
                self._decode_pages(ref, pages, missing, data, span[0], check_crc=True)
        parts = [self._page_rows[(ref_id, i)] for i in which]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self._entry_dtype)

    def parse_region(self, text: str) -> Region:
        try:
            return parse_region(text, self.manifest.ref_ids)
        except RegionError as e:
            raise InputError(str(e)) from None

    # -- data ----------------------------------------------------------------------------
    def _fetch(self, rr: RangeRead) -> bytes:
        return self._get_ranges(rr.chunk, [(rr.start, rr.end)])[0]

    def _get_ranges(self, chunk_no: int, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Byte ranges of one chunk object (parallel ranged GETs on S3, each with If-Match)."""
        chunk = self.manifest.chunks[chunk_no]
        try:
            if len(ranges) == 1:
                out = [self.store.get(chunk.key, ranges[0], if_match=chunk.etag)]
            else:
                out = self.store.get_ranges(chunk.key, ranges, if_match=chunk.etag)
        except PreconditionFailed:
            # a run never rewrites its chunks (a rerun writes the same bytes, the same ETag)
            raise Stale(f"{self.store.uri}/{chunk.key}: checksum mismatch: its ETag is not the one the "
                               "manifest records (corrupted or replaced object); run bams3 verify") from None
        except Archived as e:
            raise DatasetError(f"{self.store.uri}/{chunk.key}: chunk object is archived"
                               f"{f' (storage class {e.storage_class})' if e.storage_class else ''} and "
                               f"must be restored before it can be read; restore it with "
                               f"`bams3 restore {self.store.uri}`") from None
        except NotFound:
            raise Stale(f"{self.store.uri}/{chunk.key}: missing chunk object (dataset rewritten "
                               "or damaged); run the command again or verify the dataset") from None
        with self._qlock:
            self.qstats.requests += len(ranges)
            self.qstats.bytes += sum(len(d) for d in out)
        for (a, b), d in zip(ranges, out):
            if len(d) != b - a:
                raise DatasetError(f"{self.store.uri}/{chunk.key}: short read (corrupt or truncated chunk)")
        return out

    def _checked_block(self, chunk_no: int, row, blk) -> bytes:
        if zlib.crc32(blk) != int(row["crc32"]):
            raise DatasetError(f"{self.store.uri}/{self.manifest.chunks[chunk_no].key}: checksum mismatch in block "
                               f"at byte {int(row['offset'])} (corrupt chunk)")
        return blk

    @staticmethod
    def _columns(row, frames: dict) -> BlockColumns:
        return BlockColumns(frames, int(row["n_records"]), int(row["ref_id"]), int(row["first_start"]),
                            wide=block_is_wide(row))

    def _decode_range(self, rr: RangeRead, data: bytes) -> list[RecordBatch]:
        out = []
        for row in rr.rows:
            a = int(row["offset"]) - rr.start
            blk = self._checked_block(rr.chunk, row, data[a:a + int(row["length"])])
            try:
                frames = split_streams(blk, row["stream_sizes"].tolist())
                batch = assemble_records(self._columns(row, frames))
            except CodecError as e:
                raise DatasetError(f"{self.store.uri}/{self.manifest.chunks[rr.chunk].key}: {e}") from None
            out.append(batch)
        return out

    def _project_range(self, rr: RangeRead, fields: tuple[str, ...], need: list[int]) -> list[BlockColumns]:
        """The blocks of ``rr`` decoded for ``fields`` only, reading only the frames of streams
        ``need`` when they check themselves (zstd content checksums, FORMAT.md §7); otherwise
        (frames written without checksums, or a stream with its own framing) the whole blocks,
        checked against their CRC-32. Never data that was not checked."""
        partial = self._frames_checked is not False and all(STREAM_NAMES[k] in PLAIN_STREAMS for k in need)
        out: list[BlockColumns] = []
        if partial:
            spans = []  # per block: (stream number, absolute start, end)
            ranges: list[list[int]] = []
            for row in rr.rows:
                sizes = row["stream_sizes"].astype(np.int64)
                starts = int(row["offset"]) + np.concatenate(([0], np.cumsum(sizes)))
                mine = []
                for k in need:
                    a, b = int(starts[k]), int(starts[k + 1])
                    mine.append((k, a, b))
                    if ranges and ranges[-1][1] == a:
                        ranges[-1][1] = b  # adjacent to the previous frame: one range
                    elif b > a:
                        ranges.append([a, b])
                spans.append(mine)
            got = self._get_ranges(rr.chunk, [(a, b) for a, b in ranges])
            bounds = np.array([a for a, _ in ranges], dtype=np.int64)
            unchecked = False
            blocks = []
            for row, mine in zip(rr.rows, spans):
                frames = {}
                for k, a, b in mine:
                    i = int(np.searchsorted(bounds, a, side="right")) - 1
                    frame = memoryview(got[i])[a - int(bounds[i]):b - int(bounds[i])]
                    if not frame_self_checked(frame):
                        unchecked = True
                    frames[STREAM_NAMES[k]] = frame
                blocks.append(frames)
            if not unchecked:
                self._frames_checked = True
                for row, frames in zip(rr.rows, blocks):
                    out.append(self._columns(row, frames))
            else:
                self._frames_checked = False  # written without frame checksums: read whole blocks
                out = []
        if not out and len(rr.rows):
            data = self._fetch(rr)
            for row in rr.rows:
                a = int(row["offset"]) - rr.start
                blk = self._checked_block(rr.chunk, row, data[a:a + int(row["length"])])
                try:
                    frames = split_streams(blk, row["stream_sizes"].tolist())
                except CodecError as e:
                    raise DatasetError(f"{self.store.uri}/{self.manifest.chunks[rr.chunk].key}: {e}") from None
                out.append(self._columns(row, {STREAM_NAMES[k]: frames[STREAM_NAMES[k]] for k in need}))
        try:
            for c in out:
                c.decode(fields)  # here, on the worker thread
        except CodecError as e:
            raise DatasetError(f"{self.store.uri}/{self.manifest.chunks[rr.chunk].key}: {e}") from None
        return out

    def _pipeline(self, reads: list[RangeRead], work) -> Iterator:
        """``work(rr)`` (a list) for each read, in order; fetches and decodes in parallel."""
        if not reads:
            return
        if len(reads) == 1:
            yield from work(reads[0])
            return
        # at most `concurrency` ranged GETs in flight (the store's, i.e. --s3-concurrency;
        # 2 x threads for a store without one); decoding runs on up to `threads` of the workers
        conc = max(1, getattr(self.store, "concurrency", None) or 2 * self.threads)
        with ThreadPoolExecutor(max(self.threads, conc)) as pool:
            window = max(2, self.threads * 2, conc)
            futs = []
            it = iter(reads)

            def submit():
                rr = next(it, None)
                if rr is not None:
                    futs.append(pool.submit(work, rr))

            for _ in range(window):
                submit()
            while futs:
                items = futs.pop(0).result()
                submit()
                yield from items

    def iter_blocks(self, rows: np.ndarray, max_gap: int = 0) -> Iterator[RecordBatch]:
        """Decoded blocks for the given index rows, in order; reads and decodes in parallel."""
        reads = plan_reads(rows, max_gap=max_gap)
        if not reads:
            return
        with self._qlock:
            self.qstats.blocks += len(rows)
        # split large sequential reads so memory stays bounded and work spreads over threads
        reads = _split_reads(reads, max_bytes=8 << 20)
        for b in self._pipeline(reads, lambda rr: self._decode_range(rr, self._fetch(rr))):
            self.qstats.records_decoded += len(b)
            yield b

    def iter_columns(self, rows: np.ndarray, fields) -> Iterator[BlockColumns]:
        """The blocks of ``rows``, in order, decoded for ``fields`` only (names in
        :data:`bams3core.codec.FIELD_STREAMS`): only the byte ranges of the streams those
        fields need are fetched (see :meth:`_project_range`)."""
        fields = tuple(fields)
        need = streams_for(fields)
        reads = plan_reads(rows)
        if not reads:
            return
        with self._qlock:
            self.qstats.blocks += len(rows)
        reads = _split_reads(reads, max_bytes=8 << 20)
        for c in self._pipeline(reads, lambda rr: self._project_range(rr, fields, need)):
            self.qstats.records_decoded += len(c)
            yield c

    def all_rows(self) -> np.ndarray:
        rows = [self.index(ix.ref_id) for ix in sorted(self.manifest.index,
                                                        key=lambda x: (x.ref_id < 0, x.ref_id))]
        return np.concatenate(rows) if rows else np.zeros(0, dtype=self._entry_dtype)

    def query(self, regions: Iterable[Region] | None) -> Iterator[RecordBatch]:
        """Records for each region in turn (like `samtools view FILE R1 R2`); None = all."""
        regions = None if regions is None else list(regions)
        return self._coherent(lambda: self._query(regions))

    def _query(self, regions: list[Region] | None) -> Iterator[RecordBatch]:
        if regions is None:
            rows = self.all_rows()
            for b in self.iter_blocks(rows, max_gap=1 << 20):
                self.qstats.records_out += len(b)
                yield b
            return
        for region in regions:
            for b in self.iter_blocks(self.region_rows(region)):
                if region.ref_id < 0:
                    self.qstats.records_out += len(b)
                    yield b
                    continue
                mask = overlap_mask(b, region)
                self.qstats.blocks_with_hits += bool(mask.any())
                if mask.all():
                    self.qstats.records_out += len(b)
                    yield b
                elif mask.any():
                    sub = b.take(np.flatnonzero(mask))
                    self.qstats.records_out += len(sub)
                    yield sub

    def _region_groups(self, regions: list[Region], union: bool) -> Iterator[tuple[int, list[Region], np.ndarray]]:
        """(ref_id, regions, index rows) to read: one group per region, or (``union``) per
        reference with every block any of its regions needs, each once."""
        if not union:
            for r in regions:
                yield r.ref_id, [r], self.region_rows(r)
            return
        by_ref: dict[int, list[Region]] = {}
        for r in regions:
            by_ref.setdefault(r.ref_id, []).append(r)
        for ref_id in sorted(by_ref, key=lambda r: (r < 0, r)):
            rows = self._candidate_rows(ref_id, by_ref[ref_id])
            idx = np.unique(np.concatenate([select_blocks(rows, r) for r in by_ref[ref_id]]))
            yield ref_id, by_ref[ref_id], rows[idx]

    @staticmethod
    def _overlaps(c: BlockColumns, regions: list[Region]) -> np.ndarray:
        mask = np.zeros(len(c), dtype=bool)
        for r in regions:
            mask |= (c.refid == r.ref_id) & (c.pos < r.end) & (c.end > r.beg)
        return mask

    def query_columns(self, regions: Iterable[Region] | None, fields, *,
                      union: bool = False) -> Iterator[tuple[BlockColumns, np.ndarray | None]]:
        """Like :meth:`query` (``union``: :meth:`query_union`), but blocks decoded for
        ``fields`` only (see :meth:`iter_columns`), each with the mask of its records that
        samtools would return (None: all of them). Blocks without such records are skipped."""
        regions = None if regions is None else list(regions)
        fields = tuple(fields)
        return self._coherent(lambda: self._query_columns(regions, fields, union))

    def _query_columns(self, regions, fields, union):
        if regions is None:
            for c in self.iter_columns(self.all_rows(), fields):
                self.qstats.records_out += len(c)
                yield c, None
            return
        need = tuple(dict.fromkeys(fields + ("refid", "end")))  # the overlap rule's fields
        for ref_id, regs, rows in self._region_groups(regions, union):
            if ref_id < 0:
                for c in self.iter_columns(rows, fields):
                    self.qstats.records_out += len(c)
                    yield c, None
                continue
            for c in self.iter_columns(rows, need):
                mask = self._overlaps(c, regs)
                if mask.any():
                    self.qstats.blocks_with_hits += 1
                    self.qstats.records_out += int(mask.sum())
                    yield c, mask

    def count(self, regions: Iterable[Region] | None, *, union: bool = False) -> int:
        """What ``samtools view -c`` prints for these regions (``union``: with ``-M``; None:
        every record). Blocks that lie inside a region are counted from the index alone;
        only the blocks at a region's edges are read, and of them only the streams the
        overlap rule needs (refid, pos, flag, CIGAR)."""
        regions = None if regions is None else list(regions)
        return next(iter(self._coherent(lambda: self._count(regions, union))))

    def _count(self, regions, union) -> Iterator[int]:
        if regions is None:
            self.qstats.records_out = self.manifest.n_records
            yield self.manifest.n_records
            return
        n = 0
        for ref_id, regs, rows in self._region_groups(regions, union):
            if ref_id < 0:
                n += int(rows["n_records"].sum())
                continue
            inside = np.zeros(len(rows), dtype=bool)
            for r in regs:  # every record of such a block starts in the region and ends after its start
                inside |= (rows["ref_id"] == r.ref_id) & (rows["first_start"] >= r.beg) & (rows["last_start"] < r.end)
            n += int(rows["n_records"][inside].sum())
            for c in self.iter_columns(rows[~inside], ("refid", "end")):
                n += int(self._overlaps(c, regs).sum())
        self.qstats.records_out = n
        yield n

    def query_union(self, regions: list[Region]) -> Iterator[RecordBatch]:
        """Records overlapping any region, each once, in file order (`samtools view -M`)."""
        return self._coherent(lambda: self._query_union(list(regions)))

    def _query_union(self, regions: list[Region]) -> Iterator[RecordBatch]:
        by_ref: dict[int, list[Region]] = {}
        for r in regions:
            by_ref.setdefault(r.ref_id, []).append(r)
        order = sorted(by_ref, key=lambda r: (r < 0, r))
        for ref_id in order:
            rows = self._candidate_rows(ref_id, by_ref[ref_id])
            idx = np.unique(np.concatenate([select_blocks(rows, r) for r in by_ref[ref_id]]))
            for b in self.iter_blocks(rows[idx]):
                if ref_id < 0:
                    mask = np.ones(len(b), dtype=bool)
                else:
                    mask = np.zeros(len(b), dtype=bool)
                    for r in by_ref[ref_id]:
                        mask |= overlap_mask(b, r)
                if mask.any():
                    sub = b if mask.all() else b.take(np.flatnonzero(mask))
                    self.qstats.records_out += len(sub)
                    yield sub


def _split_reads(reads: list[RangeRead], max_bytes: int) -> list[RangeRead]:
    out = []
    for rr in reads:
        if rr.size <= max_bytes or len(rr.rows) == 1:
            out.append(rr)
            continue
        cur = [0]
        start = int(rr.rows["offset"][0])
        for i in range(1, len(rr.rows)):
            if int(rr.rows["offset"][i]) + int(rr.rows["length"][i]) - start > max_bytes:
                out.append(_sub(rr, cur))
                cur = [i]
                start = int(rr.rows["offset"][i])
            else:
                cur.append(i)
        out.append(_sub(rr, cur))
    return out


def _sub(rr: RangeRead, idx: list[int]) -> RangeRead:
    rows = rr.rows[idx[0]:idx[-1] + 1]
    return RangeRead(rr.chunk, int(rows["offset"][0]), int(rows["offset"][-1]) + int(rows["length"][-1]), rows)

