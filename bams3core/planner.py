"""Chunk planner: cut a coordinate-sorted record stream into blocks and blocks into chunks.

* A **block** holds records of one reference, up to ``block_bytes`` of raw BAM records
  (and at most ``max_block_records``); it is the unit of decoding.
* A **chunk** is an object holding consecutive blocks, closed once it reaches
  ``chunk_bytes`` of compressed data; it is the unit of upload.
Both are bounded in bytes, so deep coverage never produces giant blocks or chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .bam import FIXED_SIZE, WIDE_FIXED_SIZE, RecordBatch, sort_keys
from .codec import EncodedBlock

DEFAULT_BLOCK_BYTES = 256 << 10
DEFAULT_MAX_BLOCK_RECORDS = 4096
DEFAULT_CHUNK_BYTES = 16 << 20


class OrderError(ValueError):
    """Records are not in coordinate order; the first ``in_order`` records of the batch fed were."""

    def __init__(self, msg: str, in_order: int = 0):
        super().__init__(msg)
        self.in_order = in_order


class BlockPlanner:
    """Feed sorted record batches; get complete blocks (RecordBatch) back."""

    def __init__(self, block_bytes: int = DEFAULT_BLOCK_BYTES, max_block_records: int = DEFAULT_MAX_BLOCK_RECORDS,
                 check_order: bool = True):
        self.block_bytes = block_bytes
        self.max_records = max_block_records
        self.check_order = check_order
        self._pending: RecordBatch | None = None
        self._pending_bytes = 0  # its size as blocks are cut (BAM bytes)
        self._last_key = None
        self.n_records = 0

    def feed(self, batch: RecordBatch) -> Iterator[RecordBatch]:
        if len(batch) == 0:
            return
        fx = batch.fixed()
        if self.check_order:
            keys = sort_keys(fx)
            bad = np.flatnonzero(keys[1:] < keys[:-1])
            if self._last_key is not None and keys[0] < self._last_key:
                bad = np.r_[-1, bad]
            if len(bad):
                raise OrderError(f"records are not coordinate-sorted (record {self.n_records + int(bad[0]) + 2} "
                                 "comes before its predecessor)", in_order=int(bad[0]) + 1)
            self._last_key = keys[-1]
        self.n_records += len(batch)
        sizes = np.diff(batch.offsets)
        if batch.wide:  # blocks are cut by BAM size, so wide input that BAM can hold cuts as BAM does
            sizes = sizes - (WIDE_FIXED_SIZE - FIXED_SIZE)
        refid = fx["refid"]
        n = len(batch)
        start = 0
        if self._pending is not None:
            # The pending block continues into this batch: complete it with the fewest records
            # (the cuts are those of the two batches joined; only the block itself is copied).
            pend, self._pending = self._pending, None
            m = len(pend)
            psize = int(self._pending_bytes)
            other = np.flatnonzero(refid != pend.fixed()["refid"][-1])
            r = int(other[0]) if len(other) else n  # records before the first reference change
            cum = np.concatenate([[0], np.cumsum(sizes)])
            k = int(np.searchsorted(cum, self.block_bytes - psize, side="right")) - 1
            k = max(0, min(k, r, self.max_records - m))
            if k == r == n and psize + cum[k] < self.block_bytes and m + k < self.max_records:
                self._pending = RecordBatch.concat([pend, batch])  # still open: wait for more
                self._pending_bytes = psize + int(cum[k])
                return
            yield pend if k == 0 else RecordBatch.concat([pend, batch.slice(0, k)])
            start = k
        # split points where the reference changes
        ref_breaks = [int(x) for x in np.flatnonzero(refid[start + 1:] != refid[start:-1]) + start + 1] + [n]
        csum = np.concatenate([[0], np.cumsum(sizes)])
        for stop in ref_breaks:
            while start < stop:
                # largest end such that bytes(start:end) <= block_bytes, at least one record
                limit = csum[start] + self.block_bytes
                end = int(np.searchsorted(csum, limit, side="right")) - 1
                end = max(start + 1, min(end, stop, start + self.max_records))
                if end == stop and stop == n and csum[end] - csum[start] < self.block_bytes \
                        and end - start < self.max_records:
                    self._pending = batch.slice(start, end)  # may continue in the next batch
                    self._pending_bytes = int(csum[end] - csum[start])
                    return
                yield batch.slice(start, end)
                start = end

    def flush(self) -> Iterator[RecordBatch]:
        if self._pending is not None and len(self._pending):
            yield self._pending
        self._pending = None


@dataclass
class PlannedChunk:
    number: int
    blocks: list[EncodedBlock] = field(default_factory=list)
    _payload: bytes | None = None

    @property
    def size(self) -> int:
        return len(self._payload) if self._payload is not None else sum(len(b.data) for b in self.blocks)

    def payload(self) -> bytes:
        """The chunk object's bytes. Joined once; the blocks then drop their copies (so a
        chunk waiting for upload holds its bytes once), and later calls return the same."""
        if self._payload is None:
            self._payload = b"".join(b.data for b in self.blocks)
            for b in self.blocks:
                b.data = b""
        return self._payload


class ChunkAssembler:
    """Groups encoded blocks (in order) into chunks of about ``chunk_bytes``."""

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes
        self._cur: PlannedChunk | None = None
        self._size = 0
        self._next = 0

    def add(self, block: EncodedBlock) -> PlannedChunk | None:
        if self._cur is None:
            self._cur = PlannedChunk(self._next)
            self._next += 1
            self._size = 0
        self._cur.blocks.append(block)
        self._size += len(block.data)
        if self._size >= self.chunk_bytes:
            done, self._cur = self._cur, None
            return done
        return None

    def flush(self) -> PlannedChunk | None:
        done, self._cur = self._cur, None
        return done


def index_entries(chunk: PlannedChunk) -> np.ndarray:
    """Index rows for the blocks of a chunk (offsets within the chunk object)."""
    from .index import ENTRY_DTYPE, ENTRY_DTYPE_WIDE

    wide = any(b.wide for b in chunk.blocks)  # a wide block: v1.1 rows (with their layout)
    rows = np.zeros(len(chunk.blocks), dtype=ENTRY_DTYPE_WIDE if wide else ENTRY_DTYPE)
    off = 0
    for i, b in enumerate(chunk.blocks):
        length = sum(b.stream_sizes)  # (b.data may already be released into the payload)
        rows[i] = (chunk.number, off, length, b.n_records, b.ref_id, b.first_start, b.last_start,
                   b.max_end, b.raw_size, b.crc32, b.stream_sizes) + ((int(b.wide),) if wide else ())
        off += length
    return rows
