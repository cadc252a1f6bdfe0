"""Shards of a conversion: a coordinate-sorted, indexed BAM cut into ranges of sort keys that
are encoded independently, and the merge of their results into one dataset. Pure (no I/O).

A shard is the half-open range ``[lo, hi)`` of samtools' coordinate sort key
(:func:`bams3core.bam.sort_keys`: reference, position + 1, strand) plus the virtual offset
where reading may start (every record with a key >= ``lo`` lies at or after it). A record
belongs to the shard whose range holds its key, so no record is read into two shards; the
unplaced reads (reference -1, whose key is the largest) are the last shard.

Shard ``s`` numbers its chunks ``s * CHUNK_STRIDE + j``; chunk keys keep the layout's
``chunks/[0-9]{6,}.b3c`` (docs/FORMAT.md §2.1). :func:`merge` concatenates the shards' chunks in
shard order and rewrites their index rows to chunk *positions* in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: chunk numbers of shard s: s * CHUNK_STRIDE + j (j < CHUNK_STRIDE / 2; the upper half holds
#: the rewritten chunks of a stream whose header claimed a coordinate sort it does not have)
CHUNK_STRIDE = 1_000_000
RESORT_BASE = CHUNK_STRIDE // 2
UNPLACED_KEY = 0x3FFFFFFF << 33  # the key of reference -1 (pos and strand bits below it)


def pos_key(ref_id: int, pos: int) -> int:
    """The smallest sort key of a record at (``ref_id``, 0-based ``pos``); pos -1 allowed."""
    return ((ref_id & 0x3FFFFFFF) << 33) | (((pos + 1) & 0xFFFFFFFF) << 1)


@dataclass(frozen=True)
class KeyRange:
    lo: int
    hi: int | None  # None: to the end of the file
    voffset: int  # where reading starts
    est_bytes: int  # compressed input bytes the range spans (estimate)


def anchors(offsets: dict, header_voffset: int) -> list[tuple[int, int]]:
    """``[(key, voffset)]`` sorted by key, voffsets non-decreasing: every record with a sort key
    >= key starts at or after voffset (from :func:`bams3core.htsindex.index_offsets`)."""
    pts = [(0, header_voffset)]
    ends = []
    for t, ref in enumerate(offsets["refs"]):
        if ref["beg"] is not None:
            pts.append((pos_key(t, -1), ref["beg"]))
            ends.append(ref["end"])
        pts.extend((pos_key(t, p), v) for p, v in ref["points"])
    if ends:
        pts.append((UNPLACED_KEY, max(ends)))
    pts.sort()
    out, top = [], 0
    for k, v in pts:
        top = max(top, v)  # a later anchor may use an earlier (smaller) lower bound's offset
        if out and out[-1][0] == k:
            out[-1] = (k, top)
        else:
            out.append((k, top))
    return out


def start_voffset(anch: list[tuple[int, int]], key: int) -> int:
    """The largest anchored offset valid for records with sort key >= ``key``."""
    keys = [k for k, _ in anch]
    i = int(np.searchsorted(keys, key, side="right")) - 1
    return anch[max(i, 0)][1]


def split(anch: list[tuple[int, int]], n: int, file_bytes: int) -> list[KeyRange]:
    """``n`` ranges of the placed records balanced by compressed bytes (at anchor keys; fewer if
    the index is too coarse), then the unplaced range. Always covers every key exactly once."""
    placed = [(k, v >> 16) for k, v in anch if k < UNPLACED_KEY]
    first = placed[0][1] if placed else 0
    unplaced_at = next((v >> 16 for k, v in anch if k == UNPLACED_KEY), file_bytes)
    total = max(0, unplaced_at - first)
    bounds = [0]
    for i in range(1, max(1, n)):
        target = first + total * i / n
        k = next((k for k, c in placed if c >= target and k > bounds[-1]), None)
        if k is not None and k < UNPLACED_KEY:
            bounds.append(k)
    bounds.append(UNPLACED_KEY)
    out = []
    for lo, hi in zip(bounds, bounds[1:]):
        a, b = start_voffset(anch, lo) >> 16, start_voffset(anch, hi) >> 16
        out.append(KeyRange(lo, hi, start_voffset(anch, lo), max(0, b - a)))
    out.append(KeyRange(UNPLACED_KEY, None, start_voffset(anch, UNPLACED_KEY),
                        max(0, file_bytes - unplaced_at)))
    return out


def key_slice(keys: np.ndarray, lo: int, hi: int | None) -> tuple[int, int, bool]:
    """Of sorted ``keys``: the records in ``[lo, hi)`` are ``[a, b)``; ``done`` if a key >= hi
    was seen (the range ended in this batch)."""
    a = int(np.searchsorted(keys, lo, side="left"))
    if hi is None:
        return a, len(keys), False
    b = int(np.searchsorted(keys, hi, side="left"))
    return a, b, b < len(keys)


def merge_rows(parts: list[np.ndarray], numbers: list[int]) -> np.ndarray:
    """Index rows of every shard, in shard order, with their ``chunk`` field rewritten from chunk
    numbers to positions in ``numbers`` (the chunk numbers in manifest order, increasing)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return np.zeros(0)
    dtype = parts[0].dtype
    if any(p.dtype != dtype for p in parts):  # v1 and v1.1 rows: widen all
        from .index import widen_entries
        parts = [widen_entries(p) for p in parts]
    rows = np.concatenate(parts)
    nums = np.asarray(numbers, dtype=np.int64)
    if len(nums) > 1 and not (np.diff(nums) > 0).all():
        raise ValueError("chunk numbers are not increasing")
    pos = np.searchsorted(nums, rows["chunk"].astype(np.int64))
    if len(rows) and (pos.max() >= len(nums) or (nums[pos] != rows["chunk"]).any()):
        raise ValueError("an index row names a chunk no shard uploaded")
    rows["chunk"] = pos
    return rows
