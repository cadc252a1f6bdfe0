"""Query planning (pure): which blocks a region needs, and how they coalesce into ranged reads."""

import zlib

import numpy as np

from bams3core.index import ENTRY_DTYPE, decode_index, encode_index, encode_index_pages, page_entries, select_pages
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


def test_index_pages_roundtrip_and_selection():
    n = 300
    rows = np.zeros(n, dtype=ENTRY_DTYPE)
    rows["ref_id"] = 0
    rows["first_start"] = np.arange(n) * 1000
    rows["last_start"] = rows["first_start"] + 900
    rows["max_end"] = rows["last_start"] + 150
    rows["max_end"][5] = 250_000  # a long (spliced) read early on: its page must be selected late
    rows["length"] = 100
    rows["offset"] = np.arange(n) * 100
    rows["n_records"] = 7
    data, pages = encode_index_pages(rows, per_page=64)
    assert [p.n_entries for p in pages] == [64, 64, 64, 64, 44]
    assert sum(p.length for p in pages) == len(data) and pages[0].offset == 0
    back = []
    for p in pages:
        frame = data[p.offset:p.offset + p.length]
        assert zlib.crc32(frame) == p.crc32
        back.append(decode_index(frame))  # every page decodes on its own
    assert np.concatenate(back).tobytes() == rows.tobytes()
    assert [p.first_start for p in pages] == [0, 64000, 128000, 192000, 256000]
    assert pages[0].max_end == 250_000
    # [200000, 201000): page 3 by position, page 0 through the long read
    assert select_pages(pages, 200_000, 201_000) == [0, 3]
    assert select_pages(pages, 260_000, 261_000) == [4]
    assert select_pages(pages, 10**9, 10**9 + 1) == []
    # the reference writer's policy: >= 64 entries a page, <= 32 pages a reference
    assert page_entries(10) == 64 and page_entries(64 * 32 + 1) == 65
    one, dir1 = encode_index_pages(rows[:10])
    assert len(dir1) == 1 and decode_index(one).tobytes() == rows[:10].tobytes()


def test_manifest_page_directory_json_roundtrip():
    from bams3core.index import Manifest, ObjectRef
    ref = ObjectRef(key="data/r/index/0.b3i", size=30, sha256="0" * 64, n_blocks=3, n_records=9, ref_id=0,
                    pages=[[0, 10, 2, 5, 900, 1], [10, 20, 1, 800, 1200, 2]])
    m = Manifest(references=[{"name": "c", "length": 2000}], header=ObjectRef("data/r/header.sam", 1, "1" * 64), chunks=[],
                 index=[ref], n_records=9, stats={}, run_id="r", created="now", tool="t",
                 block_bytes=1, chunk_bytes=1)
    text = m.to_json()
    assert b"[0, 10, 2, 5, 900, 1], [10, 20, 1, 800, 1200, 2]" in text  # one line per page
    assert b'"pages"' not in text.split(b'"index"')[0]  # chunk/header refs carry no directory
    back = Manifest.from_json(text)
    assert back.index[0].index_pages()[1].max_end == 1200 and back.header.pages is None
