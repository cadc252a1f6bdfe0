"""The external sort must equal a stable sort of the whole input (what samtools sort does),
whatever the run and batch boundaries — ties included."""

import random
import struct

import numpy as np
import pytest

from bams3core.bam import RecordBatch, sort_keys
from bams3core.sorting import merge_sorted, sort_batch, sorted_header_text


def _rec(refid, pos, flag, idx):
    name = b"r\x00"
    body = struct.pack("<iiBBHHHiiii", refid, pos, len(name), 0, 4680, 0, flag, 0, -1, -1, idx) + name
    return struct.pack("<i", len(body)) + body


def _idx(batch):
    return batch.fixed()["tlen"].tolist()


@pytest.mark.parametrize("seed", range(8))
def test_merge_equals_stable_sort(seed):
    rnd = random.Random(seed)
    n = rnd.randint(200, 2000)
    recs = [(rnd.choice([0, 0, 1, -1]), rnd.randint(0, 30), rnd.choice([0, 16, 256, 2048]), i) for i in range(n)]
    recs = [(r if r >= 0 else -1, p if r >= 0 else -1, f, i) for r, p, f, i in recs]
    whole = RecordBatch.from_records([_rec(*r) for r in recs])
    want = _idx(whole.take(np.argsort(sort_keys(whole.fixed()), kind="stable")))
    # runs in input order, each sorted, each split into small batches (ties cross batches)
    cuts = sorted(rnd.sample(range(1, n), rnd.randint(1, 12)))
    runs = []
    for a, b in zip([0] + cuts, cuts + [n]):
        run = sort_batch(whole.slice(a, b))
        run = RecordBatch(bytes(run.raw()), run.offsets - run.offsets[0])
        pieces, p = [], 0
        while p < len(run):
            q = min(len(run), p + rnd.randint(1, 40))
            pieces.append(run.slice(p, q))
            p = q
        runs.append(pieces)
    got = [i for b in merge_sorted(runs) for i in _idx(b)]
    assert got == want


def test_sorted_header_like_samtools():
    assert sorted_header_text("@SQ\tSN:c\tLN:1\n").startswith("@HD\tVN:1.6\tSO:coordinate\n")
    assert sorted_header_text("@HD\tVN:1.4\tSO:unsorted\tGO:query\n") == "@HD\tVN:1.4\tSO:coordinate\n"


def test_parse_size_is_the_one_size_parser():
    """The CLI, the flows and the benchmark all parse sizes with bams3core.sorting.parse_size."""
    from bams3core.sorting import parse_size
    from flows.common import parse_size as flow_size

    assert [parse_size(x) for x in ("768M", "2G", "512k", "1.5GiB", "2gib", "64MB", " 1000 ", 4096)] == \
        [768 << 20, 2 << 30, 512 << 10, 3 << 29, 2 << 30, 64 << 20, 1000, 4096]
    for bad in ("12X", "", "-5", "M"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert flow_size(None, "x") is None and flow_size("16M", "x") == 16 << 20
