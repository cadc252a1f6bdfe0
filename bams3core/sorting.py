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


def encode_run_frames(batches: list[RecordBatch], cctx: zstandard.ZstdCompressor, threads: int = 1) -> bytes:
    """:func:`encode_run_frame` of each batch, concatenated; compressed on ``threads`` threads."""
    if threads <= 1 or len(batches) < 2:
        return b"".join(encode_run_frame(b, cctx) for b in batches)
    comp = cctx.multi_compress_to_buffer([b.raw() for b in batches], threads=threads)  # views: no copy
    out = []
    for i in range(len(comp)):
        seg = comp[i].tobytes()
        out.append(_LEN.pack(len(seg)))
        out.append(seg)
    return b"".join(out)


def decode_run_frames(read, dctx: zstandard.ZstdDecompressor | None = None,
                      wide: bool = False) -> Iterator[RecordBatch]:
    """Frames of a run from a ``read(n)`` callable (a file-like's read). Runs merged by one
    thread can share ``dctx`` (a context per run would cost memory per run). ``wide``: the
    run holds wide records (:data:`bams3core.bam.WIDE_FIXED_DTYPE`)."""
    dctx = dctx or zstandard.ZstdDecompressor()
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
        yield RecordBatch(raw, offs, wide)


def merge_sorted(runs: list[Iterable[RecordBatch]]) -> Iterator[RecordBatch]:
    """Merge sorted runs (each an iterable of sorted batches) into one sorted stream.

    Equal keys come out in run order (runs are in input order), so the result is the stable
    sort of the whole input, as `samtools sort` produces. With T the smallest last key among
    the runs' buffers, records with key < T are final everywhere; records with key == T are
    final only once every run whose buffer ends at T is exhausted (else it is extended first).
    """
    its = [iter(r) for r in runs]
    bufs: list[RecordBatch | None] = [None] * len(its)
    keys: list[np.ndarray | None] = [None] * len(its)
    done = [False] * len(its)

    def load(i):
        """Append the run's next non-empty batch to what is left of its buffer."""
        while True:
            b = next(its[i], None)
            if b is None:
                done[i] = True
                return
            if len(b):
                break
        k = sort_keys(b.fixed())
        b.forget_fixed()  # buffered until merged: its bytes only
        if bufs[i] is None or len(bufs[i]) == 0:
            bufs[i], keys[i] = b, k
        else:
            bufs[i] = RecordBatch.concat([bufs[i], b])
            keys[i] = np.concatenate([keys[i], k])

    def emit(limits):
        """Take records [0, limit) from each run's buffer, merged stably."""
        pieces, pkeys, prun = [], [], []
        for i, stop in limits:
            if stop > 0:
                pieces.append(bufs[i].slice(0, stop))
                pkeys.append(keys[i][:stop])
                prun.append(np.full(stop, i, dtype=np.int64))
                rest = bufs[i].slice(stop, len(bufs[i]))
                bufs[i], keys[i] = RecordBatch(rest.data, rest.offsets, rest.wide), keys[i][stop:]
        if not pieces:
            return None
        if len(pieces) == 1:
            return pieces[0]
        merged = RecordBatch.concat(pieces)
        allk = np.concatenate(pkeys)
        allr = np.concatenate(prun)
        return merged.take(np.lexsort((np.arange(len(allk)), allr, allk)))

    for i in range(len(its)):
        load(i)
    while True:
        active = [i for i in range(len(its)) if bufs[i] is not None and len(bufs[i])]
        for i in range(len(its)):
            if i not in active and not done[i]:
                load(i)
        active = [i for i in range(len(its)) if bufs[i] is not None and len(bufs[i])]
        if not active:
            return
        if len(active) == 1 and all(done[j] or j == active[0] for j in range(len(its))):
            i = active[0]
            yield bufs[i]
            bufs[i] = None
            while not done[i]:
                load(i)
                if bufs[i] is not None and len(bufs[i]):
                    yield bufs[i]
                    bufs[i] = None
            continue
        t = min(int(keys[i][-1]) for i in active)
        out = emit([(i, int(np.searchsorted(keys[i], t, side="left"))) for i in active])
        if out is not None and len(out):
            yield out
        owners = [i for i in active if int(keys[i][-1]) == t and not done[i]]
        if owners:
            for i in owners:
                load(i)
            continue
        out = emit([(i, int(np.searchsorted(keys[i], t, side="right"))) for i in active])
        if out is not None and len(out):
            yield out


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


def parse_size(text: int | str) -> int:
    """Bytes from a size: an int, or text such as '768M', '2G', '512K', '1.5GiB', '1000'
    (binary units K/M/G/T, optional 'B' or 'iB', any case). The one parser of sizes for the
    CLI, the flows and the benchmark."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(?:[iI]?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"bad size {text!r} (use e.g. 512M, 2G)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)
