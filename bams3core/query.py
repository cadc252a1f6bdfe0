"""Query planning: which blocks a region needs, and which byte ranges to read.

A block is needed when ``first_start < region.end`` and ``max_end > region.beg`` (the same
overlap rule htslib's iterator applies to records, lifted to blocks). Needed blocks that
sit next to each other in one chunk object are read with a single ranged GET.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bam import RecordBatch, cigar_ref_lengths, end_positions, gather
from .regions import Region


@dataclass
class RangeRead:
    chunk: int          # chunk number (position in manifest.chunks)
    start: int          # byte range [start, end) in the chunk object
    end: int
    rows: np.ndarray    # the index rows of the blocks inside this range, in order

    @property
    def size(self) -> int:
        return self.end - self.start


def select_blocks(entries: np.ndarray, region: Region) -> np.ndarray:
    """Indices of index rows whose blocks may hold records overlapping ``region``."""
    if region.ref_id < 0:
        return np.arange(len(entries))
    hit = (entries["ref_id"] == region.ref_id) & (entries["first_start"] < region.end) & \
          (entries["max_end"] > region.beg)
    return np.flatnonzero(hit)


def plan_reads(rows: np.ndarray, max_gap: int = 0) -> list[RangeRead]:
    """Coalesce blocks of the same chunk into ranges (gaps up to ``max_gap`` bytes are read through)."""
    reads: list[RangeRead] = []
    if len(rows) == 0:
        return reads
    order = np.lexsort((rows["offset"], rows["chunk"]))
    rows = rows[order]
    cur = [0]
    for i in range(1, len(rows)):
        a, b = rows[cur[-1]], rows[i]
        if b["chunk"] == a["chunk"] and int(b["offset"]) <= int(a["offset"]) + int(a["length"]) + max_gap:
            cur.append(i)
        else:
            reads.append(_range(rows[cur]))
            cur = [i]
    reads.append(_range(rows[cur]))
    return reads


def _range(rows: np.ndarray) -> RangeRead:
    start = int(rows["offset"][0])
    end = int(rows["offset"][-1]) + int(rows["length"][-1])
    return RangeRead(int(rows["chunk"][0]), start, end, rows)


def overlap_mask(batch: RecordBatch, region: Region) -> np.ndarray:
    """Which records of ``batch`` samtools would return for ``region``."""
    fx = batch.fixed()
    if region.ref_id < 0:
        return fx["refid"] == -1
    u8 = np.frombuffer(batch.data, dtype=np.uint8)
    n_cig = fx["n_cigar_op"].astype(np.int64)
    cig_off = batch.offsets[:-1] + 4 + batch.fixed_size + fx["l_read_name"].astype(np.int64)
    cigar = gather(u8, cig_off, 4 * n_cig).view("<u4")
    ends = end_positions(fx["pos"], fx["flag"], cigar_ref_lengths(cigar, n_cig))
    pos = fx["pos"].astype(np.int64)
    return (fx["refid"] == region.ref_id) & (pos < region.end) & (ends > region.beg)
