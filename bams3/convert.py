"""The conversion pipeline: input -> (sort) -> blocks -> encode -> chunks -> upload -> commit.

This is the one implementation used by ``bams3 convert`` and by the Prefect flow
``convert-to-s3`` (which wraps the same steps as tasks). Memory is bounded by
``max_memory`` (sort runs) plus a few blocks per thread and ``concurrency + 1`` chunks.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

from bams3core.bam import BamHeader, RecordBatch
from bams3core.codec import CodecError, decode_block
from bams3core.index import Manifest
from bams3core.planner import (DEFAULT_BLOCK_BYTES, DEFAULT_CHUNK_BYTES, BlockPlanner, ChunkAssembler, OrderError,
                               PlannedChunk)
from bams3core.sorting import (decode_run_frames, encode_run_frames, header_sort_order, merge_sorted, sort_batch,
                               sorted_header_text)

import numpy as np
import zstandard

from .dataset import DatasetWriter, encode_block
from .errors import Bams3Error, DatasetError, InputError
from .inputs import AlignmentInput, open_input
from .store import Store

DEFAULT_MAX_MEMORY = 768 << 20
MAX_CHUNKS_IN_FLIGHT = 2  # chunk uploads queued or running at once (each up to chunk_bytes)


@dataclass
class ConvertOptions:
    reference: str | None = None
    threads: int = 2
    max_memory: int = DEFAULT_MAX_MEMORY
    block_bytes: int = DEFAULT_BLOCK_BYTES
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    overwrite: bool = False
    keep_snapshots: int = 1  # previous snapshots an overwrite keeps (docs/FORMAT.md §2.6)
    keep_days: float | None = None  # and every snapshot younger than this
    upload_concurrency: int | None = None  # default: the store's concurrency, else 2 x threads
    slice_bytes: int = 2 << 20  # raw record bytes per encode step (one Prefect `chunk` task)
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


# -- sorting ----------------------------------------------------------------------------
SPILL_THREADS = 2  # zstd threads compressing a run's frames (the encoders are idle while runs are cut)


class ExternalSorter:
    """Sorts a record stream like `samtools sort`, spilling sorted runs to the store."""

    def __init__(self, store: Store, run_id: str, max_memory: int, wide: bool = False):
        self.store = store
        self.wide = wide  # the records are wide (format v1.1 input)
        self.prefix = f"_tmp/{run_id}/"
        self.max_memory = max_memory
        self.run_bytes = max(1 << 16, max_memory // 3)  # sorting a run needs ~2.5x its size
        self.frame_bytes = max(1 << 12, min(1 << 16, max_memory // 16))
        self.fan_in = max(2, max_memory // (2 * self.frame_bytes))
        self.runs: list[str] = []
        self._cctx = zstandard.ZstdCompressor(level=1)
        self._dctx = zstandard.ZstdDecompressor()  # shared by all run readers (one merging thread)
        self._n = 0

    def _spill(self, batches: Iterator[RecordBatch]) -> str:
        key = f"{self.prefix}run-{self._n:06d}"
        self._n += 1
        frames = []
        for b in batches:
            frames.extend(self._frames(b))
        self.store.set(key, b"".join(frames), kind="tmp")
        return key

    def _frames(self, batch: RecordBatch) -> list[bytes]:
        pieces, start, n = [], 0, len(batch)
        offs = batch.offsets
        while start < n:
            stop = int(np.searchsorted(offs, offs[start] + self.frame_bytes, side="right")) - 1
            stop = max(start + 1, min(stop, n))
            pieces.append(batch.slice(start, stop))
            start = stop
        return [encode_run_frames(pieces, self._cctx, threads=SPILL_THREADS)]

    def _read_run(self, key: str, group: int = 1) -> Iterator[RecordBatch]:
        """A run's records, ``group`` frames at a time (fewer, larger merge steps)."""
        f = self.store.open_read(key)
        try:
            buf: list[RecordBatch] = []
            for b in decode_run_frames(f.read, self._dctx, self.wide):
                buf.append(b)
                if len(buf) >= group:
                    yield buf[0] if len(buf) == 1 else RecordBatch.concat(buf)
                    buf = []
            if buf:
                yield buf[0] if len(buf) == 1 else RecordBatch.concat(buf)
        finally:
            f.close()

    def _merge(self, keys: list[str]) -> Iterator[RecordBatch]:
        # each run's read-ahead gets an equal share of an eighth of the memory budget
        group = max(1, (self.max_memory // 8) // (max(1, len(keys)) * self.frame_bytes))
        return merge_sorted([self._read_run(k, group) for k in keys])

    @staticmethod
    def _sorted_run(buf: list[RecordBatch]) -> RecordBatch:
        """Concatenate and sort the buffered batches, releasing them first (peak ~2x the run)."""
        joined = RecordBatch.concat(buf)
        buf.clear()
        return sort_batch(joined)

    def sort(self, batches: Iterator[RecordBatch]) -> Iterator[RecordBatch]:
        buf: list[RecordBatch] = []
        size = 0
        for b in batches:
            buf.append(b)
            size += len(b.raw())
            if size >= self.run_bytes:
                self.runs.append(self._spill(iter([self._sorted_run(buf)])))
                size = 0
        last = self._sorted_run(buf) if buf else None
        if not self.runs:
            if last is not None and len(last):
                yield last
            return
        if last is not None and len(last):
            self.runs.append(self._spill(iter([last])))
        runs = list(self.runs)
        while len(runs) > self.fan_in:  # multi-pass merge keeps memory bounded
            group, runs = runs[:self.fan_in], runs[self.fan_in:]
            merged = self._spill(self._merge(group))
            self.store.delete(group)
            runs.insert(0, merged)  # the earliest runs, merged: input order (and stability) kept
        yield from self._merge(runs)


def read_back(writer: DatasetWriter) -> Iterator[RecordBatch]:
    """The records a (not yet committed) run has written, in order, decoded from its chunks:
    the sorted prefix of an input whose header claimed SO:coordinate wrongly, merged with the
    sorted rest. One chunk in memory at a time."""
    for rows in writer.block_rows():
        for number in np.unique(rows["chunk"]):
            key = writer.chunk_key(int(number))
            data = writer.store.get(key)
            for row in rows[rows["chunk"] == number]:
                a = int(row["offset"])
                try:
                    yield decode_block(data[a:a + int(row["length"])], row["stream_sizes"].tolist(),
                                       int(row["n_records"]), int(row["ref_id"]), int(row["first_start"]))
                except CodecError as e:
                    raise DatasetError(f"{writer.store.uri}/{key}: {e} (reading back this run's chunk)") from None


# -- the pipeline -------------------------------------------------------------------------
def encode_slice(blocks: list[RecordBatch]) -> list[tuple]:
    """Encode a slice of planned blocks: [(EncodedBlock, fixed fields, flagstat counts)]."""
    return [encode_block(b) for b in blocks]


class ThreadExecutor:
    """Runs the pipeline's steps on thread pools (the CLI's executor): encoding on
    ``threads`` threads (zstd, the quality coder and large numpy operations release the
    GIL), uploads on a pool bounded by the upload concurrency.

    Worker processes were tried and dropped: they re-import ``__main__`` (breaking unguarded
    scripts and flows that call :func:`convert`) and cost ~150 MB each.

    The Prefect flow supplies another executor whose ``submit_*`` return Prefect futures of
    the ``chunk`` and ``upload`` tasks; anything with ``.result()`` works.
    """

    def __init__(self, threads: int, upload_concurrency: int):
        self.threads = max(1, threads)
        self.upload_concurrency = max(1, upload_concurrency)
        self._enc = ThreadPoolExecutor(self.threads, thread_name_prefix="encode")
        self._up = ThreadPoolExecutor(self.upload_concurrency, thread_name_prefix="upload")

    def submit_encode(self, blocks: list[RecordBatch]):
        return self._enc.submit(encode_slice, blocks)

    def submit_upload(self, writer: DatasetWriter, chunk: PlannedChunk):
        return self._up.submit(writer.upload_chunk, chunk)

    def shutdown(self, cancel: bool = False) -> None:
        self._enc.shutdown(wait=True, cancel_futures=cancel)
        self._up.shutdown(wait=True, cancel_futures=cancel)


def convert_stream(inp: AlignmentInput, store: Store, opts: ConvertOptions, *, source: str = "",
                   executor=None, commit=None) -> ConvertResult:
    """Run the conversion. ``executor`` runs encode/upload steps (default: threads);
    ``commit(writer)`` commits the manifest (default: ``writer.commit()``)."""
    t0 = time.time()
    header = inp.header
    # no reference (no @SQ lines: unaligned reads): every record is unplaced and keeps its input
    # order and header; there is no position to sort by (FORMAT.md §4, sorted_by "unplaced")
    unaligned = not header.references
    already_sorted = unaligned or header_sort_order(header.text) == "coordinate"
    if not already_sorted:
        header.text = sorted_header_text(header.text)
    sorted_by = "unplaced" if unaligned else "input" if already_sorted else "bams3"
    writer = DatasetWriter(store, header, block_bytes=opts.block_bytes, chunk_bytes=opts.chunk_bytes,
                           overwrite=opts.overwrite, sorted_by=sorted_by, source=source,
                           keep_snapshots=opts.keep_snapshots, keep_days=opts.keep_days,
                           extra=opts.extra)
    threads = max(1, opts.threads)
    upload_conc = opts.upload_concurrency or getattr(store, "concurrency", None) or 2 * threads
    own_executor = executor is None
    planner = BlockPlanner(opts.block_bytes, check_order=not unaligned)
    assembler = ChunkAssembler(opts.chunk_bytes)
    writers = [writer]  # a second one if the input turns out unsorted despite SO:coordinate
    sorter = None
    pending_enc: deque = deque()
    pending_up: deque = deque()
    state = {"written": 0}
    try:
        writer.prepare()
        if own_executor:
            executor = ThreadExecutor(threads, upload_conc)
        stream: Iterator[RecordBatch] = inp.batches()
        if not already_sorted:
            sorter = ExternalSorter(store, writer.run_id, opts.max_memory, wide=inp.wide)
            stream = sorter.sort(stream)

        def report(chunk: PlannedChunk, ref) -> None:
            if opts.progress:
                el = max(time.time() - t0, 1e-9)
                opts.progress({"chunk": chunk.number, "bytes": ref.size, "records": ref.n_records,
                               "records_total": writer.n_records, "bytes_total": state["written"],
                               "elapsed": el, "records_per_s": writer.n_records / el})

        def drain_uploads(limit: int) -> None:
            while len(pending_up) > limit:
                fut, chunk = pending_up.popleft()
                ref = fut.result()
                state["written"] += ref.size
                report(chunk, ref)

        def take_encoded(limit: int) -> None:
            while len(pending_enc) > limit:
                for block, fx, fs in pending_enc.popleft().result():
                    writer.add_block_stats(fx, fs)
                    chunk = assembler.add(block)
                    if chunk is not None:
                        submit_chunk(chunk)

        def submit_chunk(chunk: PlannedChunk) -> None:
            pending_up.append((executor.submit_upload(writer, chunk), chunk))
            writer.add_index_rows(chunk)  # (may write an index object: overlaps the upload)
            # chunks in flight are what memory holds; parallelism within a chunk comes from
            # the store (multipart parts on `upload_conc` connections)
            drain_uploads(MAX_CHUNKS_IN_FLIGHT)

        slice_: list[RecordBatch] = []
        slice_bytes = 0

        def submit_slice() -> None:
            nonlocal slice_, slice_bytes
            if slice_:
                pending_enc.append(executor.submit_encode(slice_))
                slice_, slice_bytes = [], 0
                take_encoded(2 * threads)

        def add_blocks(blocks) -> None:
            nonlocal slice_bytes
            for blk in blocks:
                slice_.append(blk)
                slice_bytes += len(blk.raw())
                if slice_bytes >= opts.slice_bytes:
                    submit_slice()

        def finish_blocks() -> None:
            add_blocks(list(planner.flush()))
            submit_slice()
            take_encoded(0)
            last = assembler.flush()
            if last is not None:
                submit_chunk(last)
            drain_uploads(0)

        unsorted_at = None
        for batch in stream:
            try:
                add_blocks(list(planner.feed(batch)))
            except OrderError as e:
                unsorted_at = (batch, e)
                break
        if unsorted_at is not None:
            # The header said SO:coordinate, but it is not so. What was written is a sorted
            # prefix: finish it, sort the rest, and write a new run from the merge of the two.
            batch, e = unsorted_at
            (opts.warn or stderr_warning)(f"{inp.name}: the header says SO:coordinate but the {e}; sorting them")
            if e.in_order:
                add_blocks(list(planner.feed(batch.slice(0, e.in_order))))
            finish_blocks()
            prefix = writer
            writer = DatasetWriter(store, BamHeader(sorted_header_text(header.text), header.references),
                                   block_bytes=opts.block_bytes, chunk_bytes=opts.chunk_bytes,
                                   overwrite=opts.overwrite, sorted_by="bams3", source=source,
                                   keep_snapshots=opts.keep_snapshots, keep_days=opts.keep_days,
                                   extra=opts.extra)
            writers.append(writer)
            writer.prepare()
            planner = BlockPlanner(opts.block_bytes)
            assembler = ChunkAssembler(opts.chunk_bytes)
            state["written"] = 0
            sorter = ExternalSorter(store, writer.run_id, opts.max_memory)
            rest = itertools.chain([batch.slice(e.in_order, len(batch))], stream)
            for b in merge_sorted([read_back(prefix), sorter.sort(rest)]):
                add_blocks(list(planner.feed(b)))
        finish_blocks()
        manifest = commit(writer) if commit else writer.commit()
        if len(writers) > 1:
            writers[0].abort()  # the prefix run: its records are in the committed run
    except BaseException:
        for f in pending_enc:
            f.cancel()
        for f, _ in pending_up:
            f.cancel()
        if own_executor and executor is not None:
            executor.shutdown(cancel=True)
        for w in writers:
            if w.run_id and w.prepared:
                w.abort()
        raise
    finally:
        inp.close()
    if own_executor:
        executor.shutdown()
    return ConvertResult(manifest=manifest, seconds=time.time() - t0, records=writer.n_records,
                         bytes_written=state["written"], spill_runs=len(sorter.runs) if sorter else 0,
                         chunks=manifest.chunks)


def convert(source: str, store: Store, opts: ConvertOptions | None = None, *, stdin=None, executor=None,
            commit=None) -> ConvertResult:
    """Convert ``source`` (path or ``-``) into a dataset on ``store``."""
    opts = opts or ConvertOptions()
    inp = open_input(source, reference=opts.reference, threads=opts.threads, stdin=stdin)
    return convert_stream(inp, store, opts, source="stdin" if source == "-" else source, executor=executor,
                          commit=commit)


def stderr_progress(info: dict) -> None:
    print(f"bams3: chunk {info['chunk']}: {info['bytes'] / 1e6:.1f} MB, {info['records']} records; "
          f"total {info['records_total']} records, {info['bytes_total'] / 1e6:.1f} MB, "
          f"{info['records_per_s']:.0f} records/s", file=sys.stderr, flush=True)
