"""The conversion's stages (issue #11): sharded conversion of indexed BAMs, resume from the
ledger, Dask. samtools (pysam's bundled copy) is the oracle for the records."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pysam
import pytest

from bams3.convert import ConvertOptions, convert
from bams3.errors import StoreError
from bams3.stages import RESUME_AFTER, ShardSink, find_index, source_identity
from bams3.store import open_store
from bams3core import layout
from bams3core.htsindex import index_offsets
from bams3core.shards import UNPLACED_KEY, anchors, split
from conftest_data import samtools_view

CHUNK = 24 << 10  # small chunks: many per shard
BLOCK = 8 << 10


@pytest.fixture(scope="module")
def bams(tmp_path_factory):
    """A coordinate-sorted BAM with unplaced reads (+ .bai), its CSI-indexed and unindexed
    copies, and a name-sorted copy (the external sort path)."""
    from bams3.sample import make_sample

    d = tmp_path_factory.mktemp("stages")
    bam = make_sample(d, 2500, 11)["bam"]
    csi = str(d / "csi.bam")
    shutil.copy(bam, csi)
    pysam.index("-c", csi)
    plain = str(d / "plain.bam")
    shutil.copy(bam, plain)
    byname = str(d / "byname.bam")
    pysam.samtools.sort("-n", "--no-PG", "-o", byname, bam, catch_stdout=False)
    return {"bam": bam, "csi": csi, "plain": plain, "byname": byname, "dir": d}


def opts(**kw) -> ConvertOptions:
    return ConvertOptions(block_bytes=BLOCK, chunk_bytes=CHUNK, **kw)


def cli(*args) -> int:
    from bams3.cli import main

    return main([str(a) for a in args])


def query(ds, *regions) -> str:
    """`bams3 query` (in this process: no interpreter start, no JIT warm-up per call)."""
    out = pathlib.Path(str(ds) + "-q.sam")
    assert cli("query", "--no-cache", ds, *regions, "-o", out) == 0
    text = out.read_text()
    out.unlink()
    return text


def convert_local(src, dest, **kw):
    with open_store(str(dest)) as st:
        return convert(src, st, opts(**kw))


# -- the plan ------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["bam", "csi"])
def test_split_covers_every_key_once(bams, which):
    src = bams[which]
    with open(find_index(src), "rb") as f:
        offs = index_offsets(f.read())
    assert len(offs["refs"]) == pysam.AlignmentFile(src).nreferences
    assert sum(r["beg"] is not None for r in offs["refs"]) >= 2
    anch = anchors(offs, pysam.AlignmentFile(src).tell())
    assert all(a[1] <= b[1] for a, b in zip(anch, anch[1:])) and [a[0] for a in anch] == sorted({a[0] for a in anch})
    size = os.path.getsize(src)
    for n in (2, 3, 8):
        ranges = split(anch, n, size)
        assert ranges[0].lo == 0 and ranges[-1].hi is None and ranges[-1].lo == UNPLACED_KEY
        assert all(a.hi == b.lo for a, b in zip(ranges, ranges[1:]))
        assert len(ranges) == n + 1  # n placed ranges (the index is fine enough here) + unplaced
        assert all(r.voffset >> 16 < size for r in ranges)


# -- sharded == one shard == samtools ------------------------------------------------------------
def spy_pools(monkeypatch) -> list:
    """The ShardPools this process starts (their process counts), as they start."""
    from bams3 import shardpool

    seen = []
    real = shardpool.ShardPool.__init__

    def init(self, processes, **kw):
        seen.append(processes)
        real(self, processes, **kw)

    monkeypatch.setattr(shardpool.ShardPool, "__init__", init)
    return seen


@pytest.mark.parametrize("which,shards,processes", [("bam", 5, 1), ("csi", 3, 1), ("bam", 4, 2), ("csi", 7, 3)])
def test_sharded_equals_one_shard_and_samtools(bams, tmp_path, capsys, monkeypatch, which, shards, processes):
    src = bams[which]
    pools = spy_pools(monkeypatch)
    one = convert_local(src, tmp_path / "one", shards=1, processes=processes)
    assert pools == []  # one stream shard: in this process
    many = convert_local(src, tmp_path / "many", shards=shards, processes=processes)
    assert pools == ([] if processes == 1 else [processes])  # the shards ran on worker processes
    assert one.shards == 1 and many.shards == shards + 1
    assert many.records == one.records == int(pysam.samtools.view("-c", src))
    want = samtools_view(src)
    assert query(tmp_path / "many") == query(tmp_path / "one") == want
    name = pysam.AlignmentFile(src).references[1]
    for region in (f"{name}:1000-40000", "*"):
        assert query(tmp_path / "many", region) == samtools_view(src, region)
    # export writes the same records back (header included)
    out = tmp_path / "x.bam"
    assert cli("export", tmp_path / "many", out) == 0
    assert pysam.samtools.view("--no-PG", "-h", str(out)) == pysam.samtools.view("--no-PG", "-h", src)
    stats = []
    for d in ("one", "many"):
        capsys.readouterr()
        assert cli("stats", "--json", "--no-cache", tmp_path / d) == 0
        st = json.loads(capsys.readouterr().out)
        stats.append({k: v for k, v in st.items() if k not in ("dataset", "bytes", "chunks", "blocks")})
    assert stats[0] == stats[1] and stats[0]["records"] == one.records
    # chunk keys of shard s are s * 1000000 + j: inside the layout
    chunks = sorted(p.name for p in (tmp_path / "many").glob("data/*/chunks/*.b3c"))
    assert any(len(c) > len("000000.b3c") for c in chunks)
    assert all(layout.classify(str(p.relative_to(tmp_path / "many"))) for p in (tmp_path / "many").rglob("*")
               if p.is_file())


def test_cli_dask_cluster(bams, tmp_path, capsys, dask_cluster):
    assert cli("convert", "--dask", dask_cluster, "-@", "1", "--shards", "3", "--chunk-size", "24K",
               "--block-size", "8K", bams["bam"], tmp_path / "dask") == 0
    assert "shard 4/4" in capsys.readouterr().err
    assert query(tmp_path / "dask") == samtools_view(bams["bam"])
    for bad in ("nowhere", "local:0", "local:x"):
        assert cli("convert", "--dask", bad, bams["bam"], tmp_path / "x") == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.splitlines()) == 1 and "--dask" in err
    assert not (tmp_path / "x").exists()
    from bams3.cluster import parse_dask

    assert parse_dask("local:3") == ("local", 3) and parse_dask("tcp://h:8786") == ("tcp://h:8786", None)


# -- resume --------------------------------------------------------------------------------------
class Boom(StoreError):
    pass


def fail_after(monkeypatch, k: int) -> dict:
    """Make the (k+1)-th chunk upload fail (a transient store error), as a kill would."""
    real = ShardSink.upload
    seen = {"n": 0}

    def upload(self, chunk, stats):
        seen["n"] += 1
        if seen["n"] > k:
            raise Boom("s3://x: S3 server error (InternalError); retry later")
        return real(self, chunk, stats)

    monkeypatch.setattr(ShardSink, "upload", upload)
    return seen


def _ledgers(dest: pathlib.Path) -> list:
    return sorted(dest.glob("_tmp/*/chunk-*.json"))


@pytest.mark.parametrize("which,shards", [("bam", 3), ("plain", None), ("byname", None)])
def test_resume_reencodes_only_the_rest(bams, tmp_path, monkeypatch, which, shards):
    src, dest = bams[which], tmp_path / "ds"
    full = convert_local(src, tmp_path / "full", shards=shards)
    k = int(len(full.chunks) * 0.6)
    fail_after(monkeypatch, k)
    with pytest.raises(Boom):
        convert_local(src, dest, shards=shards, resume=True)
    monkeypatch.undo()
    assert not (dest / "manifest.json").exists()
    assert len(_ledgers(dest)) >= k - 2  # uploads in flight when it failed may be missing
    leases = list(dest.glob("runs/*.json"))
    assert len(leases) == 1 and b'"failed": true' in leases[0].read_bytes()
    res = convert_local(src, dest, shards=shards, resume=True)
    assert res.resumed and res.reused_chunks >= k - 2
    assert res.encoded_records <= 0.6 * res.records
    assert res.records == full.records
    assert query(dest) == query(tmp_path / "full")
    if which == "bam":
        assert query(dest) == samtools_view(src)
    # the same chunks as an uninterrupted run, and no leftovers of the failed one
    m = {p.name: p.read_bytes() for p in (tmp_path / "full").glob("data/*/chunks/*.b3c")}
    assert {p.name: p.read_bytes() for p in dest.glob("data/*/chunks/*.b3c")} == m
    assert not list(dest.glob("_tmp/*")) and not list(dest.glob("runs/*"))


def test_changed_source_or_options_never_resume(bams, tmp_path, monkeypatch):
    src = str(tmp_path / "in.bam")
    shutil.copy(bams["bam"], src)
    shutil.copy(bams["bam"] + ".bai", src + ".bai")
    dest = tmp_path / "ds"
    fail_after(monkeypatch, 4)
    with pytest.raises(Boom):
        convert_local(src, dest, shards=3, resume=True)
    monkeypatch.undo()
    before = source_identity(src)
    os.utime(src, ns=(before["mtime"] + 10**9, before["mtime"] + 10**9))  # same bytes, touched
    res = convert_local(src, dest, shards=3, resume=True)
    assert not res.resumed and res.reused_chunks == 0 and res.encoded_records == res.records
    assert query(dest) == samtools_view(src)
    # other options: a new run too
    dest2 = tmp_path / "ds2"
    fail_after(monkeypatch, 4)
    with pytest.raises(Boom):
        convert_local(src, dest2, shards=3, resume=True)
    monkeypatch.undo()
    with open_store(str(dest2)) as st:
        res = convert(src, st, ConvertOptions(block_bytes=BLOCK, chunk_bytes=CHUNK * 2, shards=3, resume=True))
    assert not res.resumed and res.encoded_records == res.records


def test_without_resume_a_failure_cleans_up(bams, tmp_path, monkeypatch):
    dest = tmp_path / "ds"
    fail_after(monkeypatch, 3)
    with pytest.raises(Boom):
        convert_local(bams["bam"], dest, shards=3)
    assert [p for p in dest.rglob("*") if p.is_file()] == []


def test_live_run_is_not_taken_over(bams, tmp_path, monkeypatch):
    """A run whose lease is fresh and whose process lives (here: this one) is never resumed."""
    import json

    from bams3 import stages

    dest = tmp_path / "ds"
    fail_after(monkeypatch, 3)
    with pytest.raises(Boom):
        convert_local(bams["bam"], dest, shards=3, resume=True)
    monkeypatch.undo()
    lease = next(dest.glob("runs/*.json"))
    body = json.loads(lease.read_bytes())
    run_id = body["run_id"]
    del body["failed"]
    lease.write_text(json.dumps(body))  # as if it were still running, in this (live) process
    with open_store(str(dest)) as st:
        assert stages._lease_dead(st, run_id) is False
        body["heartbeat"] -= RESUME_AFTER + 5
        lease.write_text(json.dumps(body))
        assert stages._lease_dead(st, run_id) is True
        body["heartbeat"] += RESUME_AFTER + 5
        body["pid"] = 2 ** 22 + 12345  # no such process on this host
        lease.write_text(json.dumps(body))
        assert stages._lease_dead(st, run_id) is True


def test_layout_knows_the_ledger():
    r = "0123456789abcdef"
    assert layout.classify(f"_tmp/{r}/chunk-000000.json") == layout.KeyKind("object", r)
    assert layout.classify(f"_tmp/{r}/chunk-3000012.json") == layout.KeyKind("object", r)
    assert layout.classify(f"_tmp/{r}/resume.json") == layout.KeyKind("object", r)
    assert layout.classify(f"_tmp/{r}/chunk-12.json") is None
    assert layout.classify(f"data/{r}/chunks/3000012.b3c") == layout.KeyKind("object", r)


def test_cli_resume_flag(bams, tmp_path, capsys, monkeypatch):
    # -@ 1: the shards run in this process, where the failure is injected (tests/test_shardpool.py
    # resumes a run whose worker processes were killed)
    fail_after(monkeypatch, 3)
    assert cli("convert", "-@", "1", "--resume", "--shards", "2", "--chunk-size", "24K", bams["bam"],
               tmp_path / "ds") != 0
    assert "InternalError" in capsys.readouterr().err
    monkeypatch.undo()
    assert cli("convert", "--resume", "--shards", "2", "--chunk-size", "24K", bams["bam"], tmp_path / "ds") == 0
    assert "resumed a previous run: 3 chunks reused" in capsys.readouterr().err
    assert query(tmp_path / "ds") == samtools_view(bams["bam"])
    with pytest.raises(SystemExit) as e:
        cli("convert", "--shards", "0", bams["bam"], tmp_path / "y")
    assert e.value.code == 2
