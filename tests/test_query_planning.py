"""Query planning (pure): which blocks a region needs, and how they coalesce into ranged reads."""

import numpy as np

from bams3core.index import ENTRY_DTYPE, decode_index, encode_index
from bams3core.query import plan_reads, select_blocks
from bams3core.regions import Region


def _rows(spec):
    """spec: (chunk, offset, length, ref_id, first_start, last_start, max_end)"""
    rows = np.zeros(len(spec), dtype=ENTRY_DTYPE)
    for i, (c, o, ln, r, fs, ls, me) in enumerate(spec):
        rows[i]["chunk"], rows[i]["offset"], rows[i]["length"] = c, o, ln
        rows[i]["ref_id"], rows[i]["first_start"], rows[i]["last_start"], rows[i]["max_end"] = r, fs, ls, me
        rows[i]["n_records"] = 10
    return rows


ROWS = _rows([
    (0, 0, 100, 0, 0, 900, 1050),        # block 0
    (0, 100, 100, 0, 1000, 1900, 7000),  # block 1: a spliced read reaches 7000
    (0, 200, 100, 0, 2000, 2900, 3050),  # block 2
    (1, 0, 100, 0, 3000, 3900, 4050),    # block 3 (next chunk)
    (1, 100, 100, 0, 4000, 4900, 5050),  # block 4
])


def test_select_blocks_uses_max_end_not_last_start():
    assert select_blocks(ROWS, Region(0, 950, 960)).tolist() == [0]
    assert select_blocks(ROWS, Region(0, 1040, 1060)).tolist() == [0, 1]
    # 5000-5010 lies past block 1's last start, but its spliced read still overlaps
    assert select_blocks(ROWS, Region(0, 5000, 5010)).tolist() == [1, 4]
    assert select_blocks(ROWS, Region(0, 8000, 9000)).tolist() == []
    assert select_blocks(ROWS, Region(1, 0, 10)).tolist() == []


def test_plan_reads_coalesces_adjacent_blocks_per_chunk():
    reads = plan_reads(ROWS[[1, 2, 3, 4]])
    assert [(r.chunk, r.start, r.end, len(r.rows)) for r in reads] == [(0, 100, 300, 2), (1, 0, 200, 2)]
    reads = plan_reads(ROWS[[0, 2]])  # a gap: two ranges ...
    assert [(r.start, r.end) for r in reads] == [(0, 100), (200, 300)]
    reads = plan_reads(ROWS[[0, 2]], max_gap=100)  # ... or one read through the gap
    assert [(r.start, r.end) for r in reads] == [(0, 300)]
    assert plan_reads(ROWS[[]]) == []


def test_index_roundtrip():
    rng = np.random.default_rng(3)
    rows = np.zeros(500, dtype=ENTRY_DTYPE)
    for name in ENTRY_DTYPE.names:
        shape = (500,) + ENTRY_DTYPE[name].shape
        info = np.iinfo(ENTRY_DTYPE[name].base)
        rows[name] = rng.integers(max(info.min, -2**40), min(info.max, 2**40), size=shape)
    back = decode_index(encode_index(rows))
    assert back.tobytes() == rows.tobytes()
