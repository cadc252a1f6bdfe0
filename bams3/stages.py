"""The conversion's stages, passing plain values: plan -> shard (encode + upload) -> verify -> commit.

* :func:`plan` looks at the source: a coordinate-sorted BAM with a .bai/.csi, a local file or
  an ``s3://`` object (index next to it; :mod:`bams3.s3source`), is cut into key ranges
  balanced by compressed bytes (:mod:`bams3core.shards`); anything else (SAM, CRAM,
  unindexed or unsorted BAM, standard input) is one ``stream`` shard. A range shard of an
  ``s3://`` BAM reads its byte range with ranged GETs (If-Match the ETag the plan saw).
* :func:`run_shard` encodes and uploads one shard under the run's prefix and returns a
  :class:`ShardResult` (object refs, index rows, statistics). Its inputs and outputs are
  picklable, and it opens its own input and store, so any worker — a thread, a Dask worker
  on another machine — can run it.
* :func:`verify_chunks` reads back what a shard uploaded.
* the commit is :meth:`bams3.dataset.DatasetWriter.commit_shards` (manifest written last,
  conditionally), in the process that holds the run's lease.

Resume: after each chunk is uploaded, a small ledger object ``_tmp/<run>/chunk-<n>.json``
records its ref, index rows and statistics, and ``_tmp/<run>/resume.json`` records what the run
converts (source identity, options, plan). A shard run again — a task retry, or a new
conversion that took the dead run over (:func:`find_resumable`) — reuses its leading chunks
that have a ledger entry: it skips their records in its (deterministic, sorted) input and
encodes only the rest.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np

from bams3core import layout
from bams3core.bam import BamHeader, RecordBatch, Reference, sort_keys
from bams3core.codec import CodecError, decode_block
from bams3core.htsindex import HtsIndexError, index_offsets
from bams3core.index import ENTRY_DTYPE, ENTRY_DTYPE_WIDE, ObjectRef
from bams3core.planner import BlockPlanner, ChunkAssembler, OrderError, PlannedChunk, index_entries
from bams3core.shards import CHUNK_STRIDE, RESORT_BASE, anchors, key_slice, split
from bams3core.sorting import header_sort_order, merge_sorted, sorted_header_text
from bams3core.stats import StatsAccumulator

from .dataset import encode_block, run_prefix
from .errors import DatasetError, InputError, NotFound
from .inputs import AlignmentInput, BgzfReader, open_input
from .store import Store, open_store

#: compressed input bytes per shard by default
DEFAULT_SHARD_BYTES = 64 << 20
#: a shard smaller than this is not worth its own task, even on a cluster
MIN_SHARD_BYTES = 4 << 20
#: a range shard of an s3:// BAM: BGZF blocks inflated per batch (a local file: 64) and bytes
#: of records per batch (a local file: 4 MiB); what it reads past its range's end is about
#: two such inflate batches plus one record batch
S3_INFLATE_GROUP = 8
S3_BATCH_BYTES = 1 << 20
MAX_CHUNKS_IN_FLIGHT = 2  # chunk uploads queued or running at once (each up to chunk_bytes)


def chunks_in_flight(max_memory: int, chunk_bytes: int) -> int:
    """Chunk uploads queued or running while the next chunk is assembled: the chunks held
    (those and the one being assembled) take at most a quarter of ``max_memory`` (at least one
    chunk, whose upload is then waited for), and at most MAX_CHUNKS_IN_FLIGHT."""
    return max(0, min(MAX_CHUNKS_IN_FLIGHT, (max_memory // 4) // max(1, chunk_bytes) - 1))
#: a run whose lease was not refreshed for this long may be taken over by --resume
RESUME_AFTER = 3 * layout.LEASE_TTL / layout.HEARTBEATS_PER_TTL


# -- plain values ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to convert one shard (picklable)."""

    number: int
    source: str  # a path, or what a stream shard's input was called
    kind: str  # "range" (key range of an indexed BAM) or "stream" (the whole input)
    run_id: str
    store: dict  # {"uri": ..., "options": {...}}: open_store(uri, **options)
    header_text: str = ""  # range shards: the BAM's header
    references: tuple = ()  # ((name, length), ...)
    lo: int = 0
    hi: int | None = None
    voffset: int = 0
    est_bytes: int = 0
    reference: str | None = None  # FASTA for CRAM
    source_store: dict | None = None  # an s3:// source: its bucket's store spec (the shard opens its own)
    source_etag: str | None = None  # an s3:// source: the ETag the plan saw (every read is If-Match)
    threads: int = 2
    block_bytes: int = 0
    chunk_bytes: int = 0
    max_memory: int = 768 << 20
    slice_bytes: int = 2 << 20
    upload_concurrency: int | None = None
    ledger: bool = True  # write the resume ledger
    resume: bool = True  # reuse chunks the ledger holds


@dataclass
class ShardResult:
    """What one shard wrote (picklable): chunk refs in order, index rows, statistics."""

    number: int
    chunks: list  # [ObjectRef]
    numbers: list  # chunk numbers, increasing
    rows: np.ndarray
    flagstat: list
    mapped: list
    unmapped: list
    unplaced: int
    n_records: int
    encoded_records: int  # records encoded by this run (the rest came from the ledger)
    reused_chunks: int = 0
    wide: bool = False
    header_text: str | None = None  # stream shards: the header as the dataset keeps it
    sorted_by: str | None = None
    references: list | None = None  # stream shards: [(name, length)] of the header
    spill_runs: int = 0
    seconds: float = 0.0


@dataclass
class Plan:
    source: str
    identity: dict | None  # {"uri", "size", "mtime"/"etag"}: None for a stream without one
    header_text: str | None  # range plans: the BAM's header
    references: list  # [(name, length)]
    jobs: list  # [ShardJob]
    input_bytes: int | None = None
    index_records: int | None = None  # records the BAI/CSI counts (a check on the shards)

    @property
    def sharded(self) -> bool:
        return any(j.kind == "range" for j in self.jobs)


def store_spec(uri: str, **options) -> dict:
    return {"uri": uri, "options": {k: v for k, v in options.items() if v is not None}}


def open_spec(spec: dict) -> Store:
    return open_store(spec["uri"], **spec.get("options", {}))


# -- plan --------------------------------------------------------------------------------------
def source_identity(source: str) -> dict | None:
    """What identifies a local source's content: path, size, mtime (None for stdin or S3)."""
    if source == "-" or source.startswith("s3://"):
        return None
    try:
        st = os.stat(source)
    except OSError:
        return None
    return {"uri": os.path.abspath(source), "size": st.st_size, "mtime": st.st_mtime_ns}


def may_be_sharded(source: str) -> bool:
    """An input the plan may cut into shards: an S3 object, or a file with an index next to it."""
    return source.startswith("s3://") or (os.path.isfile(source) and find_index(source) is not None)


def find_index(path: str) -> str | None:
    base = path[:-4] if path.endswith(".bam") else path
    for p in (path + ".bai", path + ".csi", base + ".bai", base + ".csi"):
        if os.path.exists(p):
            return p
    return None


def _header_voffset(path: str) -> int:
    import pysam

    with pysam.AlignmentFile(path, "rb", check_sq=False) as f:
        return int(f.tell())


def plan(source: str, *, job: dict, store: dict, run_id: str, shards: int | None = None, workers: int | None = None,
         shard_bytes: int = DEFAULT_SHARD_BYTES, opener: Callable[[dict], Store] | None = None) -> Plan:
    """The shards of converting ``source``. ``job``: ShardJob fields shared by every shard
    (threads, sizes, ...); ``shards``: how many (default: by compressed bytes, at least two
    per worker when ``workers`` is given); 1 means one stream shard. An ``s3://`` source is
    planned from its object (HEAD), its index and its first BGZF blocks, read with the store
    ``opener`` gives for ``job["source_store"]`` (default :func:`open_spec`)."""
    if source.startswith("s3://"):
        return _plan_s3(source, job=job, store=store, run_id=run_id, shards=shards, workers=workers,
                        shard_bytes=shard_bytes, opener=opener or open_spec)
    ident = source_identity(source)
    common = dict(run_id=run_id, store=store, **job)
    stream = Plan(source=source, identity=ident, header_text=None, references=[],
                  jobs=[ShardJob(number=0, source=source, kind="stream", **common)],
                  input_bytes=ident["size"] if ident else None)
    idx_path = find_index(source) if ident else None
    if idx_path is None or shards == 1:
        return stream
    try:
        with open(idx_path, "rb") as f:
            index = f.read()
    except OSError:
        return stream
    if not _is_bam_file(source):
        return stream
    try:
        inp = open_input(source, threads=1)
    except InputError:
        return stream  # the stream shard reports the problem
    try:
        header = inp.header
    finally:
        inp.close()
    return _range_plan(stream, index, header, lambda: _header_voffset(source), ident["size"], common,
                       n=_shard_count(ident["size"], shards, workers, shard_bytes))


def _shard_count(size: int, shards: int | None, workers: int | None, shard_bytes: int) -> int:
    n = shards or max(1, -(-size // shard_bytes))
    if workers and not shards:
        n = max(n, min(2 * workers, max(1, size // MIN_SHARD_BYTES)))
    return n


def _range_plan(stream: Plan, index: bytes, header: BamHeader, header_voffset: Callable[[], int], size: int,
                common: dict, *, n: int) -> Plan:
    """``n`` key ranges of a coordinate-sorted BAM of ``size`` bytes from its index's bytes (BAI
    or CSI), its header and ``header_voffset()`` (where the first record starts); ``stream`` if
    the index does not fit the header or one shard is enough."""
    from bams3core.htsindex import index_counts

    try:
        offsets = index_offsets(index)
    except HtsIndexError:
        return stream
    if not header.references or header_sort_order(header.text) != "coordinate" \
            or len(offsets["refs"]) != len(header.references):
        return stream
    if n <= 1:
        return stream
    try:
        hv = header_voffset()
    except Exception:  # noqa: BLE001 - htslib cannot read it: the stream shard will say why
        return stream
    source = stream.source
    ranges = split(anchors(offsets, hv), n, size)
    refs = tuple((r.name, r.length) for r in header.references)
    jobs = [ShardJob(number=i, source=source, kind="range", header_text=header.text, references=refs, lo=r.lo,
                     hi=r.hi, voffset=r.voffset, est_bytes=r.est_bytes, **common) for i, r in enumerate(ranges)]
    try:
        counts = index_counts(index)
        total = counts["records"] if counts["no_coor"] is not None else None
    except HtsIndexError:
        total = None
    return Plan(source=source, identity=stream.identity, header_text=header.text, references=list(refs), jobs=jobs,
                input_bytes=size, index_records=total)


def _plan_s3(source: str, *, job: dict, store: dict, run_id: str, shards: int | None, workers: int | None,
             shard_bytes: int, opener: Callable[[dict], Store]) -> Plan:
    """:func:`plan` of ``s3://bucket/key``: one HEAD (size and ETag: the source's identity),
    the index next to it (``.bai``/``.csi``, one GET per candidate name) and the first range of
    the object (header and its virtual offset); key ranges as for a local file, each read by
    its shard with ranged GETs (:mod:`bams3.s3source`)."""
    from . import s3source

    with s3source.S3Source(source, job.get("source_store"), opener) as src:
        common = dict(run_id=run_id, store=store, **{**job, "source_etag": src.etag})
        stream = Plan(source=source, identity=src.identity, header_text=None, references=[],
                      jobs=[ShardJob(number=0, source=source, kind="stream", **common)], input_bytes=src.size)
        n = _shard_count(src.size, shards, workers, shard_bytes)
        if n <= 1:
            return stream
        found = s3source.find_index(src.store, src.key)
        if found is None:
            return stream
        f = src.open(read_ahead=s3source.HEADER_READ, prefetch=False)
        try:
            got = s3source.read_header(f, source)
        except InputError:
            return stream  # not BAM (SAM, CRAM...): the stream shard reads it or says why
        finally:
            f.close()
        if got is None:
            return stream
        header, hv = got
        return _range_plan(stream, found[1], header, lambda: hv, src.size, common, n=n)


def _is_bam_file(path: str) -> bool:
    import zlib

    with open(path, "rb") as f:
        head = f.read(1 << 16)
    try:
        return zlib.decompressobj(31).decompress(head)[:4] == b"BAM\x01"
    except zlib.error:
        return False


def resume_key(plan_: Plan, job: dict) -> str:
    """A hash of what makes a run's chunks reusable: the source identity, the encoding options
    and the shard ranges."""
    if plan_.identity is None:
        return ""
    what = {"identity": plan_.identity, "block_bytes": job["block_bytes"], "chunk_bytes": job["chunk_bytes"],
            "reference": job.get("reference"), "shards": [(j.kind, j.lo, j.hi) for j in plan_.jobs]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


# -- the ledger --------------------------------------------------------------------------------
def ledger_key(run_id: str, number: int) -> str:
    return f"_tmp/{run_id}/chunk-{number:06d}.json"


def resume_record_key(run_id: str) -> str:
    return f"_tmp/{run_id}/resume.json"


def write_resume_record(store: Store, run_id: str, key: str, plan_: Plan) -> None:
    body = {"run_id": run_id, "resume_key": key, "source": plan_.source, "identity": plan_.identity,
            "shards": len(plan_.jobs), "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    store.set(resume_record_key(run_id), (json.dumps(body) + "\n").encode(), content_type="application/json")


def _lease_dead(store: Store, run_id: str) -> bool:
    """May ``run_id`` be taken over? Its lease is gone, marked failed, older than
    RESUME_AFTER, or names a process of this host that no longer exists."""
    try:
        lease = json.loads(store.get(layout.lease_key(run_id)))
    except NotFound:
        return True
    except ValueError:
        return False
    if lease.get("failed"):
        return True
    if time.time() - float(lease.get("heartbeat", 0)) > RESUME_AFTER:
        return True
    if lease.get("host") == socket.gethostname() and lease.get("pid"):
        try:
            os.kill(int(lease["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def find_resumable(store: Store, key: str) -> str | None:
    """A dead, uncommitted run on ``store`` that converted the same thing (``key``), or None
    (the one with the most ledger entries if several)."""
    if not key:
        return None
    best, best_n = None, -1
    listed = [o.key for o in store.list_prefix("_tmp/")]
    for k in listed:
        parts = k.split("/")
        if len(parts) != 3 or parts[2] != "resume.json" or not layout.is_run_id(parts[1]):
            continue
        run_id = parts[1]
        try:
            rec = json.loads(store.get(k))
        except (NotFound, ValueError):
            continue
        if rec.get("resume_key") != key or not _lease_dead(store, run_id):
            continue
        n = sum(1 for x in listed if x.startswith(f"_tmp/{run_id}/chunk-"))
        if n > best_n:
            best, best_n = run_id, n
    return best


def _rows_to_text(rows: np.ndarray) -> dict:
    return {"wide": rows.dtype == ENTRY_DTYPE_WIDE, "rows": base64.b64encode(rows.tobytes()).decode()}


def _rows_from_text(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["rows"]), dtype=ENTRY_DTYPE_WIDE if d["wide"] else ENTRY_DTYPE).copy()


# -- one shard ---------------------------------------------------------------------------------
class _ChunkStats:
    __slots__ = ("acc", "n")

    def __init__(self, n_refs: int):
        self.acc = StatsAccumulator(n_refs=n_refs)
        self.n = 0


class ShardSink:
    """Uploads one shard's chunks (``base + j``) under the run's prefix, writes their ledger
    entries, and keeps their refs, index rows and statistics in order."""

    def __init__(self, store: Store, run_id: str, base: int, n_refs: int, *, ledger: bool, limit: int):
        self.store = store
        self.run_id = run_id
        self.prefix = run_prefix(run_id)
        self.base = base
        self.limit = limit  # chunk numbers stay below base + limit
        self.n_refs = n_refs
        self.ledger = ledger
        self.next = base
        self.refs: dict[int, ObjectRef] = {}
        self.rows: list[np.ndarray] = []
        self.stats = StatsAccumulator(n_refs=n_refs)
        self.n_records = 0
        self.encoded = 0
        self.reused = 0
        self.wide = False
        self._lock = threading.Lock()

    def chunk_key(self, number: int) -> str:
        return f"{self.prefix}chunks/{number:06d}.b3c"

    def new_number(self) -> int:
        n = self.next
        if n >= self.base + self.limit:
            raise DatasetError(f"shard holds more than {self.limit} chunks: use a larger --chunk-size")
        self.next += 1
        return n

    def reuse(self) -> int:
        """Take over the leading chunks of this shard that the ledger holds (their objects
        listed with the recorded size). Returns the records they hold."""
        entries = {}
        for o in self.store.list_prefix(f"_tmp/{self.run_id}/chunk-"):
            try:
                n = int(o.key.rsplit("-", 1)[1].split(".")[0])
            except ValueError:
                continue
            if self.base <= n < self.base + self.limit:
                entries[n] = o.key
        if not entries:
            return 0
        sizes = {o.key: o.size for o in self.store.list_prefix(f"{self.prefix}chunks/")}
        skip = 0
        n = self.base
        while n in entries:
            try:
                e = json.loads(self.store.get(entries[n]))
            except (NotFound, ValueError):
                break
            ref = ObjectRef(**e["ref"])
            if sizes.get(ref.key) != ref.size:
                break
            rows = _rows_from_text(e)
            self.refs[n] = ref
            self.rows.append(rows)
            self.wide |= rows.dtype == ENTRY_DTYPE_WIDE and bool(rows["layout"].any())
            st = e["stats"]
            self.stats.flagstat += np.asarray(st["flagstat"], dtype=np.int64)
            for k, v in st["mapped"].items():
                self.stats.mapped[int(k)] += v
            for k, v in st["unmapped"].items():
                self.stats.unmapped[int(k)] += v
            self.stats.unplaced += st["unplaced"]
            self.n_records += e["n_records"]
            skip += e["n_records"]
            self.reused += 1
            n += 1
        self.next = n
        return skip

    def upload(self, chunk: PlannedChunk, cs: _ChunkStats) -> ObjectRef:
        """Upload one chunk (idempotent: same key, same bytes), then its ledger entry."""
        payload = chunk.payload()
        key = self.chunk_key(chunk.number)
        info = self.store.set(key, payload, content_type="application/octet-stream", kind="chunk")
        if info.size != len(payload):  # what the store reports it holds (S3 also checked the CRC32)
            raise DatasetError(f"{self.store.uri}/{key}: {info.size} bytes stored, {len(payload)} uploaded")
        ref = ObjectRef(key=key, size=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
                        etag=info.etag if getattr(self.store, "supports_if_match", False) else None,
                        n_blocks=len(chunk.blocks), n_records=sum(b.n_records for b in chunk.blocks))
        if self.ledger:
            rows = index_entries(chunk)
            st = cs.acc
            body = {"ref": asdict(ref), **_rows_to_text(rows), "n_records": cs.n,
                    "stats": {"flagstat": st.flagstat.tolist(),
                              "mapped": {str(i): int(v) for i, v in enumerate(st.mapped) if v},
                              "unmapped": {str(i): int(v) for i, v in enumerate(st.unmapped) if v},
                              "unplaced": int(st.unplaced)}}
            self.store.set(ledger_key(self.run_id, chunk.number), json.dumps(body).encode(),
                           content_type="application/json")
        with self._lock:
            self.refs[chunk.number] = ref
        return ref

    def add(self, chunk: PlannedChunk, cs: _ChunkStats) -> None:
        """Record a chunk's index rows and statistics (orchestrating thread, chunk order)."""
        rows = index_entries(chunk)
        if rows.dtype == ENTRY_DTYPE_WIDE and rows["layout"].any():
            self.wide = True
        self.rows.append(rows)
        self.stats.merge(cs.acc)
        self.n_records += cs.n
        self.encoded += cs.n

    def block_rows(self) -> Iterator[np.ndarray]:
        if self.rows:
            yield _concat_rows(self.rows)

    def read_back(self) -> Iterator[RecordBatch]:
        """The records this sink has written, in order (one chunk in memory at a time)."""
        for rows in self.block_rows():
            for number in np.unique(rows["chunk"]):
                key = self.chunk_key(int(number))
                data = self.store.get(key)
                for row in rows[rows["chunk"] == number]:
                    a = int(row["offset"])
                    try:
                        yield decode_block(data[a:a + int(row["length"])], row["stream_sizes"].tolist(),
                                           int(row["n_records"]), int(row["ref_id"]), int(row["first_start"]))
                    except CodecError as e:
                        raise DatasetError(f"{self.store.uri}/{key}: {e} (reading back this run's chunk)") from None

    def discard(self) -> None:
        """Remove this sink's chunks and ledger entries (a prefix rewritten elsewhere)."""
        keys = [self.refs[n].key for n in sorted(self.refs)] + [ledger_key(self.run_id, n) for n in sorted(self.refs)]
        if keys:
            self.store.delete(keys)

    def result(self, number: int, **kw) -> ShardResult:
        nums = sorted(self.refs)
        if nums != list(range(self.base, self.next)):
            raise DatasetError("internal error: missing chunk uploads")
        rows = _concat_rows(self.rows) if self.rows else np.zeros(0, dtype=ENTRY_DTYPE)
        st = self.stats
        return ShardResult(number=number, chunks=[self.refs[n] for n in nums], numbers=nums, rows=rows,
                           flagstat=st.flagstat.tolist(), mapped=st.mapped.tolist(), unmapped=st.unmapped.tolist(),
                           unplaced=int(st.unplaced), n_records=self.n_records, encoded_records=self.encoded,
                           reused_chunks=self.reused, wide=self.wide, **kw)


def _concat_rows(parts: list[np.ndarray]) -> np.ndarray:
    if len({p.dtype for p in parts}) > 1:  # v1 and v1.1 rows: widen all
        from bams3core.index import widen_entries

        parts = [p if p.dtype == ENTRY_DTYPE_WIDE else widen_entries(p) for p in parts]
    return np.concatenate(parts)


def encode_into(stream: Iterator[RecordBatch], sink: ShardSink, job: ShardJob, *, check_order: bool,
                progress: Callable[[dict], None] | None = None, t0: float | None = None) -> None:
    """Plan blocks, encode them (``job.threads`` threads), assemble chunks and upload them
    (bounded in flight) into ``sink``. Raises OrderError (after writing the sorted prefix) if
    ``stream`` turns out unsorted."""
    t0 = t0 or time.time()
    threads = max(1, job.threads)
    upload_conc = job.upload_concurrency or getattr(sink.store, "concurrency", None) or 2 * threads
    planner = BlockPlanner(job.block_bytes, check_order=check_order)
    assembler = ChunkAssembler(job.chunk_bytes)
    assembler._next = sink.next
    enc = ThreadPoolExecutor(threads, thread_name_prefix="encode")
    in_flight = chunks_in_flight(job.max_memory, job.chunk_bytes)
    up = ThreadPoolExecutor(max(1, min(upload_conc, in_flight + 1)), thread_name_prefix="upload")
    pending_enc: deque = deque()
    pending_up: deque = deque()
    cur = [_ChunkStats(sink.n_refs)]
    written = [0]

    def drain_uploads(limit: int) -> None:
        while len(pending_up) > limit:
            fut, chunk = pending_up.popleft()
            ref = fut.result()
            written[0] += ref.size
            if progress:
                el = max(time.time() - t0, 1e-9)
                progress({"chunk": chunk.number, "bytes": ref.size, "records": ref.n_records,
                          "records_total": sink.n_records, "bytes_total": written[0], "elapsed": el,
                          "records_per_s": sink.n_records / el})

    def submit_chunk(chunk: PlannedChunk) -> None:
        cs, cur[0] = cur[0], _ChunkStats(sink.n_refs)
        sink.new_number()
        sink.add(chunk, cs)  # rows computed before the payload is joined (blocks keep sizes)
        pending_up.append((up.submit(sink.upload, chunk, cs), chunk))
        drain_uploads(in_flight)

    def take_encoded(limit: int) -> None:
        while len(pending_enc) > limit:
            for block, fx, fs in pending_enc.popleft().result():
                cur[0].acc.add(fx, fs)
                cur[0].n += len(fx)
                chunk = assembler.add(block)
                if chunk is not None:
                    submit_chunk(chunk)

    slice_: list[RecordBatch] = []
    size = [0]

    def submit_slice() -> None:
        if slice_:
            pending_enc.append(enc.submit(lambda bs: [encode_block(b) for b in bs], list(slice_)))
            slice_.clear()
            size[0] = 0
            take_encoded(2 * threads)

    def add_blocks(blocks) -> None:
        for blk in blocks:
            raw = blk.raw()
            if len(blk.data) > 2 * len(raw):  # a block owns its bytes: the batch it was cut
                blk = RecordBatch(bytes(raw), blk.offsets - blk.offsets[0], blk.wide)  # from goes
            slice_.append(blk)
            size[0] += len(raw)
            if size[0] >= job.slice_bytes:
                submit_slice()

    ok = False
    try:
        def finish() -> None:  # every planned record encoded, every chunk uploaded
            add_blocks(list(planner.flush()))
            submit_slice()
            take_encoded(0)
            last = assembler.flush()
            if last is not None:
                submit_chunk(last)
            drain_uploads(0)

        try:
            for batch in stream:
                add_blocks(list(planner.feed(batch)))
        except OrderError as e:
            if e.in_order and getattr(e, "batch", None) is not None:
                add_blocks(list(planner.feed(e.batch.slice(0, e.in_order))))
            finish()
            raise
        finish()
        ok = True
    finally:
        enc.shutdown(wait=True, cancel_futures=not ok)
        up.shutdown(wait=True, cancel_futures=not ok)


def _checked(stream: Iterator[RecordBatch], box: list) -> Iterator[RecordBatch]:
    """``stream``, stopping (OrderError carrying the batch) at the first out-of-order record."""
    last = None
    n = 0
    for b in stream:
        keys = sort_keys(b.fixed())
        bad = np.flatnonzero(keys[1:] < keys[:-1])
        if last is not None and len(keys) and keys[0] < last:
            bad = np.r_[-1, bad]
        if len(bad):
            e = OrderError(f"records are not coordinate-sorted (record {n + int(bad[0]) + 2} comes before its "
                           "predecessor)", in_order=int(bad[0]) + 1)
            e.batch = b
            box.append(b)
            raise e
        if len(keys):
            last = keys[-1]
        n += len(b)
        yield b


def _skip(stream: Iterator[RecordBatch], n: int) -> Iterator[RecordBatch]:
    """``stream`` without its first ``n`` records."""
    for b in stream:
        if n >= len(b):
            n -= len(b)
            continue
        if n:
            b = b.slice(n, len(b))
            n = 0
        yield b


def _source_changed(job: ShardJob) -> InputError:
    from .s3source import changed_error

    return changed_error(job.source, job.source_etag)


def _open_range_source(job: ShardJob, opener: Callable[[dict], Store] | None):
    """The file a range shard reads: the local file, or an ``s3://`` object as a seekable
    file over ranged GETs (its own store from ``job.source_store``; If-Match the plan's ETag;
    fetched ahead up to about the shard's estimated end)."""
    if not job.source.startswith("s3://"):
        try:
            return open(job.source, "rb")
        except OSError as e:
            raise InputError(f"{job.source}: {e.strerror}") from None
    from .s3source import S3RangeFile, bucket_spec, split_uri

    _bucket, key = split_uri(job.source)
    src = (opener or open_spec)(bucket_spec(job.source, job.source_store))
    try:
        info = src.head(key)
    except NotFound:
        src.close()
        raise InputError(f"{job.source}: no such object (removed during the conversion?)") from None
    except BaseException:
        src.close()
        raise
    size = info.size
    if job.source_etag and info.etag != job.source_etag:
        src.close()
        raise _source_changed(job)
    start = job.voffset >> 16
    return S3RangeFile(src, key, size=size, etag=job.source_etag, name=job.source, own_store=True,
                       hint_end=start + job.est_bytes if job.hi is not None else None)


def range_batches(job: ShardJob, header: BamHeader, opener: Callable[[dict], Store] | None = None
                  ) -> Iterator[RecordBatch]:
    """The records of an indexed BAM whose sort key lies in ``[job.lo, job.hi)``: BGZF read from
    ``job.voffset`` (inflated on ``job.threads`` threads), stopping after the range."""
    f = _open_range_source(job, opener)
    f.seek(job.voffset >> 16)
    # from S3, what is read past the range's end is fetched for nothing: smaller batches there
    from_s3 = job.source.startswith("s3://")
    if from_s3:
        from .s3source import BGZF_READ

        bg = BgzfReader(f, threads=job.threads, name=job.source, group=S3_INFLATE_GROUP, read_bytes=BGZF_READ)
    else:
        bg = BgzfReader(f, threads=job.threads, name=job.source)
    chunks = bg.chunks()
    skip = job.voffset & 0xFFFF

    def data():
        try:
            first = next(chunks, b"")
        except InputError:
            first = None
        if first is None or skip > len(first):  # the offset the index names is no block start
            raise InputError(f"{job.source}: its index names offset {job.voffset >> 16} (+{skip}), where there is "
                             "no such BGZF block: a stale index? rebuild it with samtools index; nothing was "
                             "committed")
        yield first[skip:]
        yield from chunks

    inp = AlignmentInput(header, data(), b"", job.source, on_close=f.close)
    try:
        last = None
        for batch in inp.batches(*((S3_BATCH_BYTES,) if from_s3 else ())):
            keys = sort_keys(batch.fixed())
            if len(keys) and ((last is not None and keys[0] < last) or (np.diff(keys) < 0).any()):
                raise InputError(f"{job.source}: records are not coordinate-sorted although the file is indexed")
            if len(keys):
                last = keys[-1]
            a, b, done = key_slice(keys, job.lo, job.hi)
            if b > a:
                yield batch if (a, b) == (0, len(batch)) else batch.slice(a, b)
            if done:
                return
    finally:
        chunks.close()
        inp.close()


def run_shard(job: ShardJob, *, store: Store | None = None, inp: AlignmentInput | None = None,
              progress: Callable[[dict], None] | None = None, warn: Callable[[str], None] | None = None,
              opener: Callable[[dict], Store] = None) -> ShardResult:
    """Encode and upload one shard; see the module docstring. ``store``/``inp`` may be given
    (a caller holding them); otherwise they are opened from the job's plain values with
    ``opener`` (default :func:`open_spec`)."""
    t0 = time.time()
    opener = opener or open_spec
    own_store = store is None
    if own_store:
        store = opener(job.store)
    try:
        if job.kind == "range":
            return _run_range(job, store, progress, t0, opener)
        if inp is None and job.source.startswith("s3://"):
            return _run_s3_stream(job, store, opener, progress, warn, t0)
        return _run_stream(job, store, inp, progress, warn, t0)
    finally:
        if own_store:
            store.close()


def _run_s3_stream(job: ShardJob, store: Store, opener, progress, warn, t0: float) -> ShardResult:
    """Stream ``s3://bucket/key`` (BAM or plain SAM; not bgzipped SAM) into the shard."""
    from .store import parse_uri

    _scheme, bucket, key = parse_uri(job.source)
    if not key:
        raise InputError(f"{job.source}: expected s3://bucket/path/to/file.bam")
    spec = job.source_store or {"uri": f"s3://{bucket}", "options": {}}
    with opener({**spec, "uri": f"s3://{bucket}"}) as src:
        reader = src.open_read(key)
        try:
            if job.source_etag and getattr(reader.raw, "_etag", None) not in (None, job.source_etag):
                raise _source_changed(job)
            inp = open_input("-", reference=job.reference, threads=job.threads, stdin=reader)
            inp.name = job.source
            return _run_stream(job, store, inp, progress, warn, t0)
        finally:
            reader.close()


def _run_range(job: ShardJob, store: Store, progress, t0: float, opener=None) -> ShardResult:
    header = BamHeader(job.header_text, [Reference(n, l) for n, l in job.references])
    base = job.number * CHUNK_STRIDE
    sink = ShardSink(store, job.run_id, base, len(header.references), ledger=job.ledger, limit=RESORT_BASE)
    skip = sink.reuse() if job.resume else 0
    stream = range_batches(job, header, opener)
    if skip:
        stream = _skip(stream, skip)
    try:  # range_batches checks the order itself
        encode_into(stream, sink, job, check_order=False, progress=progress, t0=t0)
    except OrderError:
        raise InputError(f"{job.source}: records are not coordinate-sorted although the file is indexed") from None
    return sink.result(job.number, seconds=time.time() - t0)


def _run_stream(job: ShardJob, store: Store, inp: AlignmentInput | None, progress, warn, t0: float) -> ShardResult:
    """The whole input as one shard: sorted here if the header does not say SO:coordinate
    (external sort, runs spilled under ``_tmp/<run>/``)."""
    from .convert import ExternalSorter, stderr_warning

    if inp is None:
        inp = open_input(job.source, reference=job.reference, threads=job.threads)
    try:
        header = inp.header
        unaligned = not header.references
        already_sorted = unaligned or header_sort_order(header.text) == "coordinate"
        if not already_sorted:
            header.text = sorted_header_text(header.text)
        sorted_by = "unplaced" if unaligned else "input" if already_sorted else "bams3"
        base = job.number * CHUNK_STRIDE
        n_refs = len(header.references)
        sink = ShardSink(store, job.run_id, base, n_refs, ledger=job.ledger, limit=RESORT_BASE)
        skip = sink.reuse() if job.resume else 0
        sorter = None
        stream: Iterator[RecordBatch] = inp.batches()
        if not already_sorted:
            sorter = ExternalSorter(store, job.run_id, job.max_memory, wide=inp.wide)
            stream = sorter.sort(stream)
        box: list = []
        checked = stream if unaligned else _checked(stream, box)
        try:
            encode_into(_skip(checked, skip) if skip else checked, sink, job, check_order=False,
                        progress=progress, t0=t0)
        except OrderError as e:
            # The header said SO:coordinate, but it is not so. What was written is a sorted
            # prefix: sort the rest, and write the merge of the two as new chunks.
            batch = box[0]
            (warn or stderr_warning)(f"{inp.name}: the header says SO:coordinate but the {e}; sorting them")
            header.text = sorted_header_text(header.text)
            sorted_by = "bams3"
            prefix = sink
            sink = ShardSink(store, job.run_id, base + RESORT_BASE, n_refs, ledger=False, limit=RESORT_BASE)
            sorter = ExternalSorter(store, job.run_id, job.max_memory)
            rest = itertools.chain([batch.slice(e.in_order, len(batch))], stream)
            merged = merge_sorted([prefix.read_back(), sorter.sort(rest)])
            encode_into(merged, sink, job, check_order=True, progress=progress, t0=t0)
            prefix.discard()
        return sink.result(job.number, header_text=header.text, sorted_by=sorted_by,
                           references=[(r.name, r.length) for r in header.references],
                           spill_runs=len(sorter.runs) if sorter else 0, seconds=time.time() - t0)
    finally:
        inp.close()


def verify_chunks(store: Store, refs: list, mode: str = "read") -> int:
    """Re-read each uploaded chunk: ``read`` compares size and SHA-256 with its ref, ``head``
    size and ETag. Raises DatasetError on a mismatch (nothing may be committed)."""
    for ref in refs:
        where = f"{store.uri}/{ref.key}"
        try:
            if mode == "head":
                info = store.head(ref.key)
                size, digest = info.size, None
                if ref.etag and info.etag and info.etag != ref.etag:
                    raise DatasetError(f"{where}: ETag {info.etag} != uploaded {ref.etag} (object replaced?)")
            elif mode == "read":
                data = store.get(ref.key)
                size, digest = len(data), hashlib.sha256(data).hexdigest()
            else:
                raise ValueError(f"unknown verify mode {mode!r}: use 'read' or 'head'")
        except NotFound:
            raise DatasetError(f"{where}: missing right after its upload") from None
        if size != ref.size:
            raise DatasetError(f"{where}: {size} bytes stored, {ref.size} uploaded (corrupt upload)")
        if digest is not None and digest != ref.sha256:
            raise DatasetError(f"{where}: SHA-256 of the stored object differs from the uploaded bytes "
                               "(corrupt upload)")
    return len(refs)
