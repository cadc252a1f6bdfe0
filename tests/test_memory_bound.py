"""Issue #14: `convert -` on unsorted input keeps its data within ``--max-memory``, whatever the
input size. Checked with tracemalloc (numpy arrays and bytes are traced), so the figures are
byte counts of live buffers, not a timed or sampled RSS: the interpreter and libraries (the
other ~155 MiB of the benchmark's peak) are not in them."""

import struct
import tracemalloc

import numpy as np
import pytest

from bams3.convert import ExternalSorter
from bams3.stages import MAX_CHUNKS_IN_FLIGHT, chunks_in_flight
from bams3.store import open_store
from bams3core.bam import RecordBatch, sort_keys

MiB = 1 << 20


def _batches(total_bytes, seed=1, n=1000):
    """Unsorted batches of ``n`` records (150 bp, ~330 bytes each), made as they are consumed
    (the input is never whole)."""
    rng = np.random.default_rng(seed)
    made = i = 0
    while made < total_bytes:
        recs = []
        for j in range(n):
            name = b"read%08d\x00" % (i + j)
            body = struct.pack("<iiBBHHHiiii", int(rng.integers(0, 3)), int(rng.integers(0, 5_000_000)), len(name),
                               60, 4680, 1, 0, 150, -1, -1, i + j) + name
            body += struct.pack("<I", 150 << 4) + rng.integers(0, 256, 75, dtype=np.uint8).tobytes() \
                + (30 + rng.integers(0, 4, 150, dtype=np.uint8)).tobytes()
            recs.append(struct.pack("<i", len(body)) + body)
        i += n
        batch = RecordBatch.from_records(recs)
        made += len(batch.data)
        yield batch


def _sorted_peak(tmp_path, max_memory, total_bytes):
    """Peak traced bytes while sorting ``total_bytes`` of records, and whether the output is
    in order and complete."""
    with open_store(str(tmp_path / f"store-{total_bytes}")) as store:
        for _ in ExternalSorter(store, "warm", max_memory).sort(_batches(2 * max_memory)):
            pass  # the kernels and modules the sort loads are not its data
        sorter = ExternalSorter(store, "r", max_memory)
        tracemalloc.start()
        try:
            n = 0
            last = None
            ordered = True
            for b in sorter.sort(_batches(total_bytes)):
                k = sort_keys(b.fixed())
                ordered &= bool((np.diff(k) >= 0).all()) and (last is None or k[0] >= last)
                last = k[-1]
                n += len(b)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return peak, n, ordered, len(sorter.runs)


@pytest.mark.parametrize("max_memory", [4 * MiB, 8 * MiB])
def test_external_sort_stays_within_max_memory(tmp_path, max_memory):
    """Sorting 6x (and 18x: a multi-pass merge at 4 MiB) the budget: spilled runs, and the live
    buffers (the run, its index, its compressed frames, the merge's read-ahead and output, one
    input batch) stay within about --max-memory, flat in the input size."""
    small = _sorted_peak(tmp_path, max_memory, 6 * max_memory)
    big = _sorted_peak(tmp_path, max_memory, 18 * max_memory)
    for peak, n, ordered, runs in (small, big):
        assert ordered and n > 0
        assert runs >= 6
        # 1.5x: at these tiny budgets one input batch and a 64 KiB frame per run weigh in
        assert peak <= 1.5 * max_memory, f"sort held {peak / MiB:.1f} MiB with --max-memory {max_memory / MiB:.0f} MiB"
    assert big[0] <= 1.25 * small[0] + MiB, "the sort's memory grows with the input"


def test_chunks_in_flight_are_sized_from_max_memory():
    """Chunks held (uploading, queued and the one being assembled) take at most a quarter of
    --max-memory, down to one chunk whose upload is waited for."""
    assert chunks_in_flight(768 * MiB, 16 * MiB) == MAX_CHUNKS_IN_FLIGHT
    assert chunks_in_flight(128 * MiB, 16 * MiB) == 1
    assert chunks_in_flight(64 * MiB, 16 * MiB) == 0
    for m in (1, 8, 32, 64, 100, 768, 4096):
        for c in (1, 4, 16, 64):
            held = (chunks_in_flight(m * MiB, c * MiB) + 1) * c * MiB
            assert held <= max(m * MiB // 4, c * MiB)
