"""Coordinate sorting exactly as ``samtools sort`` orders records, in bounded memory.

Runs of at most ``max_memory`` bytes are sorted in memory (stable, by samtools' key) and
serialised with :func:`encode_run_frame`; :func:`merge_sorted` merges run iterators in a
vectorised way (records from earlier runs first on equal keys, so the result is the stable
sort of the whole input). Where runs live (memory, disk, S3) is the caller's business.
"""

from __future__ import annotations

import re
import struct
from typing import Iterable, Iterator

import numpy as np
import zstandard

from .bam import RecordBatch, split_records, sort_keys

_LEN = struct.Struct("<I")


def sort_batch(batch: RecordBatch) -> RecordBatch:
    keys = sort_keys(batch.fixed())
    order = np.argsort(keys, kind="stable")
    if np.all(order[1:] > order[:-1]):
        return batch
    return batch.take(order)


def encode_run_frame(batch: RecordBatch, cctx: zstandard.ZstdCompressor) -> bytes:
    """One frame of a spilled run: u32 length + zstd(raw records)."""
    comp = cctx.compress(bytes(batch.raw()))
    return _LEN.pack(len(comp)) + comp


def decode_run_frames(read) -> Iterator[RecordBatch]:
    """Frames of a run from a ``read(n)`` callable (a file-like's read)."""
    dctx = zstandard.ZstdDecompressor()
    while True:
        head = read(4)
        if not head:
            return
        if len(head) < 4:
            raise ValueError("truncated spill run")
        (n,) = _LEN.unpack(head)
        comp = b""
        while len(comp) < n:
            part = read(n - len(comp))
            if not part:
                raise ValueError("truncated spill run")
            comp += part
        raw = dctx.decompress(comp)
        offs, end = split_records(raw)
        yield RecordBatch(raw, offs)


def merge_sorted(runs: list[Iterable[RecordBatch]]) -> Iterator[RecordBatch]:
    """Merge sorted runs (each an iterable of sorted batches) into one sorted stream."""
    its = [iter(r) for r in runs]
    bufs: list[RecordBatch | None] = [None] * len(its)
    keys: list[np.ndarray | None] = [None] * len(its)
    cur = [0] * len(its)

    def refill(i):
        while True:
            b = next(its[i], None)
            if b is None:
                bufs[i] = None
                keys[i] = None
                return
            if len(b):
                bufs[i], keys[i], cur[i] = b, sort_keys(b.fixed()), 0
                return

    for i in range(len(its)):
        refill(i)
    while True:
        active = [i for i in range(len(its)) if bufs[i] is not None]
        if not active:
            return
        if len(active) == 1:
            i = active[0]
            b = bufs[i]
            yield b.slice(cur[i], len(b)) if cur[i] else b
            refill(i)
            while bufs[i] is not None:
                yield bufs[i]
                refill(i)
            return
        threshold = min(keys[i][-1] for i in active)
        pieces, pkeys, prun = [], [], []
        for i in active:
            k = keys[i]
            stop = int(np.searchsorted(k, threshold, side="right"))
            if stop > cur[i]:
                pieces.append(bufs[i].slice(cur[i], stop))
                pkeys.append(k[cur[i]:stop])
                prun.append(np.full(stop - cur[i], i, dtype=np.int64))
                cur[i] = stop
            if cur[i] >= len(bufs[i]):
                refill(i)
        merged = RecordBatch.concat(pieces)
        allk = np.concatenate(pkeys)
        allr = np.concatenate(prun)
        order = np.lexsort((np.arange(len(allk)), allr, allk))
        yield merged.take(order)


def sorted_header_text(text: str) -> str:
    """The header `samtools sort` writes: @HD SO:coordinate (GO/SS dropped; @HD added if absent)."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("@HD\t") or line == "@HD":
            fields = [f for f in line.split("\t")[1:] if not re.match(r"^(GO|SS):", f)]
            if any(f.startswith("SO:") for f in fields):
                fields = ["SO:coordinate" if f.startswith("SO:") else f for f in fields]
            else:
                fields.append("SO:coordinate")
            lines[i] = "\t".join(["@HD"] + fields)
            return "\n".join(lines)
    return "@HD\tVN:1.6\tSO:coordinate\n" + text


def header_sort_order(text: str) -> str | None:
    for line in text.split("\n"):
        if line.startswith("@HD\t"):
            for f in line.split("\t")[1:]:
                if f.startswith("SO:"):
                    return f[3:]
            return None
    return None


def parse_size(text: str) -> int:
    """'768M', '2G', '512K', '1000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"bad size {text!r} (use e.g. 512M, 2G)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)
