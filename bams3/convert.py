"""The conversion: plan -> shards (input -> (sort) -> blocks -> encode -> chunks -> upload)
-> verify -> commit. The stages are in :mod:`bams3.stages`; :func:`run_conversion` drives them.

This is the one implementation used by ``bams3 convert`` (the shards of an indexed BAM on
``--threads`` worker processes (:mod:`bams3.shardpool`), anything else as one stream in this
process, or the shards on a Dask cluster with ``--dask``) and by the Prefect flow
``convert-to-s3`` (shards as tasks on any task runner). Memory per shard is bounded by its
share of ``max_memory`` (sort runs) plus a few blocks per thread and a few chunks in flight.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator

from bams3core.bam import BamHeader, RecordBatch, Reference, gather, sort_keys
from bams3core.index import Manifest
from bams3core.planner import DEFAULT_BLOCK_BYTES, DEFAULT_CHUNK_BYTES
from bams3core.sorting import decode_run_frames, encode_run_frames, merge_sorted

import numpy as np
import zstandard

from .dataset import DatasetWriter
from .errors import DatasetError, InputError
from .inputs import AlignmentInput, open_input
from .store import Store

DEFAULT_MAX_MEMORY = 768 << 20


@dataclass
class ConvertOptions:
    reference: str | None = None
    threads: int = 2
    processes: int = 1  # worker processes for the shards of an indexed BAM (1: in this process); they share
    # threads and max_memory (bams3.shardpool); `bams3 convert` sets it to --threads
    max_memory: int = DEFAULT_MAX_MEMORY
    block_bytes: int = DEFAULT_BLOCK_BYTES
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    overwrite: bool = False
    keep_snapshots: int = 1  # previous snapshots an overwrite keeps (docs/FORMAT.md §2.6)
    keep_days: float | None = None  # and every snapshot younger than this
    upload_concurrency: int | None = None  # default: the store's concurrency, else 2 x threads
    slice_bytes: int = 2 << 20  # raw record bytes per encode step
    shards: int | None = None  # shards of an indexed BAM (default: by compressed bytes; 1: one stream)
    shard_bytes: int = 64 << 20  # compressed input bytes per shard by default
    resume: bool = False  # take over a dead run of the same conversion; keep chunks on failure
    progress: Callable[[dict], None] | None = None
    warn: Callable[[str], None] | None = None  # one line about the input (default: stderr)
    extra: dict = field(default_factory=dict)  # the manifest's `extra` (e.g. the source identity of `migrate`)


def stderr_warning(msg: str) -> None:
    print(f"bams3: warning: {msg}", file=sys.stderr, flush=True)


@dataclass
class ConvertResult:
    manifest: Manifest
    seconds: float
    records: int
    bytes_written: int
    spill_runs: int = 0
    chunks: list = field(default_factory=list)
    encoded_records: int = 0  # records encoded by this run (the rest: reused chunks)
    reused_chunks: int = 0
    shards: int = 1
    resumed: bool = False


# -- sorting ----------------------------------------------------------------------------
SPILL_THREADS = 2  # zstd threads compressing a run's frames (the encoders are idle while runs are cut)
SPILL_GROUP_BYTES = 1 << 20  # raw bytes gathered (in sorted order) and compressed at a time


class _RunBuffer:
    """One sort run's raw records, copied into a single preallocated buffer as they arrive (the
    input batches are released at once), with their offsets and sort keys. Sorting it costs an
    index (8 bytes a record per array), not a second copy of the records."""

    def __init__(self, capacity: int):
        self.data = np.empty(capacity, dtype=np.uint8)
        self.clear()

    def clear(self) -> None:
        self.used = 0
        self._starts: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []

    @property
    def n(self) -> int:
        return sum(len(k) for k in self._keys)

    def room(self) -> int:
        return len(self.data) - self.used

    def add(self, batch: RecordBatch) -> None:
        raw = batch.raw()
        if len(raw) > self.room():  # one record larger than the buffer: grow it
            grown = np.empty(self.used + len(raw), dtype=np.uint8)
            grown[:self.used] = self.data[:self.used]
            self.data = grown
        self.data[self.used:self.used + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        self._starts.append(batch.offsets[:-1] - batch.offsets[0] + self.used)
        self._keys.append(sort_keys(batch.fixed()))
        self.used += len(raw)

    def order(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, lengths) of the records in samtools' order (stable)."""
        starts = np.concatenate(self._starts)
        lens = np.diff(np.append(starts, self.used))
        order = np.argsort(np.concatenate(self._keys), kind="stable")
        self._keys.clear()
        return starts[order], lens[order]


class ExternalSorter:
    """Sorts a record stream like `samtools sort`, spilling sorted runs to the store.

    Memory: one run buffer of two fifths of ``max_memory`` (records copied in as they arrive), its
    index, and the run's compressed frames while it is spilled (zstd level 1: about a third of
    the run); the merge reads ahead a sixteenth of ``max_memory`` in all (at least a frame a
    run: the fan-in keeps that within an eighth)."""

    def __init__(self, store: Store, run_id: str, max_memory: int, wide: bool = False):
        self.store = store
        self.wide = wide  # the records are wide (format v1.1 input)
        self.prefix = f"_tmp/{run_id}/"
        self.max_memory = max_memory
        self.run_bytes = max(1 << 16, max_memory * 2 // 5)
        self.frame_bytes = max(1 << 12, min(1 << 16, max_memory // 16))
        self.fan_in = max(2, max_memory // (8 * self.frame_bytes))  # read-ahead: a frame a run at least
        self.runs: list[str] = []
        self._cctx = zstandard.ZstdCompressor(level=1)
        self._dctx = zstandard.ZstdDecompressor()  # shared by all run readers (one merging thread)
        self._n = 0

    def _key(self) -> str:
        key = f"{self.prefix}run-{self._n:06d}"
        self._n += 1
        return key

    def _put(self, out: bytearray) -> str:
        key = self._key()
        self.store.set(key, out, kind="tmp")
        return key

    def _spill(self, batches: Iterator[RecordBatch]) -> list[str]:
        """A run of already sorted batches (a merge pass), spilled as parts of at most half a
        run's compressed size each (a merged run is never held whole)."""
        parts, out = [], bytearray()
        for b in batches:
            out += self._frames(b)
            if len(out) >= self.run_bytes // 2:
                parts.append(self._put(out))
                out = bytearray()
        if out or not parts:
            parts.append(self._put(out))
        return parts

    def _frames(self, batch: RecordBatch) -> bytes:
        pieces, start, n = [], 0, len(batch)
        offs = batch.offsets
        while start < n:
            stop = int(np.searchsorted(offs, offs[start] + self.frame_bytes, side="right")) - 1
            stop = max(start + 1, min(stop, n))
            pieces.append(batch.slice(start, stop))
            start = stop
        return encode_run_frames(pieces, self._cctx, threads=SPILL_THREADS)

    def _sorted_groups(self, run: _RunBuffer) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The run's records in sorted order, ~SPILL_GROUP_BYTES at a time: (raw bytes, offsets)."""
        starts, lens = run.order()
        ends = np.cumsum(lens)
        a = 0
        while a < len(starts):
            b = int(np.searchsorted(ends, ends[a] - lens[a] + SPILL_GROUP_BYTES, side="right"))
            b = max(a + 1, min(b, len(starts)))
            offs = np.zeros(b - a + 1, dtype=np.int64)
            np.cumsum(lens[a:b], out=offs[1:])
            yield gather(run.data, starts[a:b], lens[a:b]), offs
            a = b

    def _spill_run(self, run: _RunBuffer) -> str:
        """Sort the buffered run and spill it, compressed frame by frame (never a sorted copy)."""
        key = self._key()
        out = bytearray()
        for raw, offs in self._sorted_groups(run):
            out += self._frames(RecordBatch(raw, offs, self.wide))
        run.clear()
        self.store.set(key, out, kind="tmp")
        return key

    def _read_run(self, run: str | list[str], group: int = 1) -> Iterator[RecordBatch]:
        """A run's records (a key, or a merged run's parts in order), ``group`` frames at a
        time (fewer, larger merge steps)."""
        buf: list[RecordBatch] = []
        for key in [run] if isinstance(run, str) else run:
            f = self.store.open_read(key)
            try:
                for b in decode_run_frames(f.read, self._dctx, self.wide):
                    buf.append(b)
                    if len(buf) >= group:
                        yield buf[0] if len(buf) == 1 else RecordBatch.concat(buf)
                        buf = []
            finally:
                f.close()
        if buf:
            yield buf[0] if len(buf) == 1 else RecordBatch.concat(buf)

    def _merge(self, keys: list) -> Iterator[RecordBatch]:
        # each run's read-ahead gets an equal share of a sixteenth of the memory budget
        group = max(1, (self.max_memory // 16) // (max(1, len(keys)) * self.frame_bytes))
        return merge_sorted([self._read_run(k, group) for k in keys])

    def sort(self, batches: Iterator[RecordBatch]) -> Iterator[RecordBatch]:
        run = _RunBuffer(self.run_bytes)
        for b in batches:
            while len(b):
                if len(b.raw()) > run.room():
                    # the records that fit, then spill (a batch never overfills the run)
                    offs = b.offsets
                    k = int(np.searchsorted(offs, offs[0] + run.room(), side="right")) - 1
                    if k == 0 and run.used:  # not even one record fits: spill first
                        self.runs.append(self._spill_run(run))
                        continue
                    k = max(k, 1)
                    run.add(b.slice(0, k))
                    b = b.slice(k, len(b))
                    if len(b):
                        self.runs.append(self._spill_run(run))
                else:
                    run.add(b)
                    break
            del b  # the run holds a copy: the input batch goes now
        if not self.runs:
            for raw, offs in self._sorted_groups(run):  # all in memory: no spill
                yield RecordBatch(raw.tobytes(), offs, self.wide)
            return
        if run.used:
            self.runs.append(self._spill_run(run))
        del run
        runs = list(self.runs)
        while len(runs) > self.fan_in:  # multi-pass merge keeps memory bounded
            group, runs = runs[:self.fan_in], runs[self.fan_in:]
            merged = self._spill(self._merge(group))
            self.store.delete([k for r in group for k in ([r] if isinstance(r, str) else r)])
            runs.insert(0, merged)  # the earliest runs, merged: input order (and stability) kept
        yield from self._merge(runs)


# -- the driver ----------------------------------------------------------------------------
def _job_fields(opts: ConvertOptions, ledger: bool, source_store: dict | None = None) -> dict:
    return dict(reference=opts.reference, source_store=source_store, threads=max(1, opts.threads), block_bytes=opts.block_bytes,
                chunk_bytes=opts.chunk_bytes, max_memory=opts.max_memory, slice_bytes=opts.slice_bytes,
                upload_concurrency=opts.upload_concurrency, ledger=ledger, resume=True)


def default_runner(jobs: list, *, store: Store, inp: AlignmentInput | None, opts: ConvertOptions) -> list:
    """Two or more key-range shards and ``opts.processes`` > 1: on that many worker processes
    (at most one per shard; each with its share of the threads and of ``max_memory``);
    otherwise :func:`local_runner`."""
    from . import shardpool

    n = min(opts.processes, len(jobs))
    if not shardpool.worth_it(jobs, n, inp):
        return local_runner(jobs, store=store, inp=inp, opts=opts)
    with shardpool.ShardPool(n, progress=opts.progress is not None) as pool:
        return pool.run(shardpool.share(jobs, n), progress=opts.progress)


def local_runner(jobs: list, *, store: Store, inp: AlignmentInput | None, opts: ConvertOptions) -> list:
    """Run the shards one after the other in this process (each on ``threads`` threads)."""
    from .stages import run_shard

    out = []
    done = {"records": 0, "bytes": 0}

    def progress(info: dict) -> None:
        if opts.progress:
            opts.progress({**info, "records_total": done["records"] + info["records_total"],
                           "bytes_total": done["bytes"] + info["bytes_total"]})

    for job in jobs:
        res = run_shard(job, store=store, inp=inp if job.kind == "stream" else None, progress=progress,
                        warn=opts.warn)
        done["records"] += res.n_records
        done["bytes"] += sum(c.size for c in res.chunks)
        out.append(res)
    return out


def run_conversion(source: str, store: Store, opts: ConvertOptions, *, inp: AlignmentInput | None = None,
                   spec: dict | None = None, runner=None, verify=None, commit=None, planner=None,
                   workers: int | None = None, on_plan=None, source_store: dict | None = None) -> ConvertResult:
    """plan -> shards -> verify -> commit (see :mod:`bams3.stages`).

    ``inp``: an open input (standard input, an S3 stream): one stream shard, run here.
    ``spec``: the store as plain values for workers elsewhere (:func:`bams3.stages.store_spec`).
    ``runner(jobs, store=, inp=, opts=)`` runs the shards and returns their results (default
    :func:`default_runner`: worker processes if ``opts.processes`` > 1 and the store can be
    opened from ``spec`` — a local directory, or any store when ``spec`` is given — else
    :func:`local_runner`); ``workers``: the plan makes at least two shards per worker
    (default ``opts.processes`` for the default runner); ``verify(store, results)`` checks
    what they uploaded before the commit; ``commit(writer, results)`` commits (default
    ``writer.commit_shards``).
    ``planner`` replaces :func:`bams3.stages.plan` (the flow's ``plan`` task); ``on_plan(plan,
    writer)`` is called once the run is prepared (the flow's progress); ``source_store``: the
    store spec of an ``s3://`` source's bucket."""
    from . import stages

    t0 = time.time()
    job = _job_fields(opts, ledger=True, source_store=source_store)
    if runner is None:
        # workers elsewhere open the store from ``spec``: an S3 store's options (storage class,
        # encryption...) are only known to a caller that gives it
        procs = opts.processes if (spec is not None or not store.uri.startswith("s3://")) else 1
        runner = default_runner if procs > 1 else local_runner
        opts = dataclasses.replace(opts, processes=procs)
        workers = workers or (procs if procs > 1 else None)
    spec = spec or stages.store_spec(store.uri)
    if inp is not None:
        p = stages.Plan(source=source, identity=None, header_text=None, references=[],
                        jobs=[stages.ShardJob(number=0, source=source, kind="stream", run_id="", store=spec,
                                              **{**job, "ledger": False})])
    else:
        p = (planner or stages.plan)(source, job=job, store=spec, run_id="", shards=opts.shards, workers=workers,
                        shard_bytes=opts.shard_bytes)
        if p.identity is None:  # nothing identifies the content: no ledger, no resume
            p.jobs = [dataclasses.replace(j, ledger=False) for j in p.jobs]
    key = stages.resume_key(p, job)
    run_id = stages.find_resumable(store, key) if opts.resume and key else None
    resumed = run_id is not None
    run_id = run_id or uuid.uuid4().hex[:16]
    p.jobs = [dataclasses.replace(j, run_id=run_id) for j in p.jobs]
    header = BamHeader(p.header_text or "", [Reference(n, l) for n, l in p.references])
    writer = DatasetWriter(store, header, block_bytes=opts.block_bytes, chunk_bytes=opts.chunk_bytes,
                           overwrite=opts.overwrite, sorted_by="input", source=source,
                           keep_snapshots=opts.keep_snapshots, keep_days=opts.keep_days, extra=opts.extra,
                           run_id=run_id)
    try:
        writer.prepare()
        writer._swept()  # the shards write chunks: dead runs' leftovers are gone first
        if key:
            stages.write_resume_record(store, run_id, key, p)
        if on_plan:
            on_plan(p, writer)
        results = runner(p.jobs, store=store, inp=inp, opts=opts)
        results = sorted(results, key=lambda r: r.number)
        n = sum(r.n_records for r in results)
        if p.index_records is not None and n != p.index_records:
            raise DatasetError(f"{source}: the shards read {n} records but its index counts {p.index_records}; "
                               "nothing was committed (a stale index? rebuild it with samtools index)")
        stream = next((r for r in results if r.header_text is not None), None)
        if stream is not None:  # the header as the stream shard read (and maybe sorted) it
            writer.header = BamHeader(stream.header_text, [Reference(a, b) for a, b in stream.references])
            writer.sorted_by = stream.sorted_by
        if verify:
            verify(store, results)
        manifest = commit(writer, results) if commit else writer.commit_shards(results)
    except BaseException as e:
        if opts.resume and key and not isinstance(e, (InputError, DatasetError)):
            writer.suspend()  # keep the uploaded chunks for the next --resume (bad input or a
            # corrupt upload: nothing worth keeping)
        else:
            writer.abort()
        raise
    return ConvertResult(manifest=manifest, seconds=time.time() - t0, records=manifest.n_records,
                         bytes_written=sum(c.size for c in manifest.chunks),
                         spill_runs=sum(r.spill_runs for r in results), chunks=manifest.chunks,
                         encoded_records=sum(r.encoded_records for r in results),
                         reused_chunks=sum(r.reused_chunks for r in results), shards=len(results),
                         resumed=resumed)


def convert_stream(inp: AlignmentInput, store: Store, opts: ConvertOptions, *, source: str = "",
                   **kw) -> ConvertResult:
    """Convert an open input (standard input, an S3 object's stream): one stream shard."""
    try:
        return run_conversion(source or inp.name, store, opts, inp=inp, **kw)
    finally:
        inp.close()


def convert(source: str, store: Store, opts: ConvertOptions | None = None, *, stdin=None, **kw) -> ConvertResult:
    """Convert ``source`` (path or ``-``) into a dataset on ``store``."""
    opts = opts or ConvertOptions()
    if source == "-":
        inp = open_input(source, reference=opts.reference, threads=opts.threads, stdin=stdin)
        return convert_stream(inp, store, opts, source="stdin", **kw)
    return run_conversion(source, store, opts, **kw)


def stderr_progress(info: dict) -> None:
    print(f"bams3: chunk {info['chunk']}: {info['bytes'] / 1e6:.1f} MB, {info['records']} records; "
          f"total {info['records_total']} records, {info['bytes_total'] / 1e6:.1f} MB, "
          f"{info['records_per_s']:.0f} records/s", file=sys.stderr, flush=True)
