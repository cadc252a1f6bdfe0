"""Sharded conversion of an indexed BAM on S3 (issue #11 item 3): the plan finds the .bai/.csi
next to the object, the shards read their byte ranges with ranged GETs (If-Match the ETag the
plan saw), and the dataset equals the one-shard dataset and `samtools view` of the source.
moto behind the counting proxy (tests/conftest.py); samtools (pysam) is the oracle."""

from __future__ import annotations

import functools
import io
import os
import pathlib
import random

import pysam
import pytest

from bams3 import s3source, stages
from bams3.convert import ConvertOptions, convert
from bams3.errors import InputError
from bams3.inputs import BgzfReader
from bams3.store import open_store
from conftest_data import samtools_view

CHUNK = 24 << 10
BLOCK = 8 << 10


@pytest.fixture(scope="module")
def bams(tmp_path_factory):
    """A coordinate-sorted BAM with unplaced reads (+ .bai, + a CSI-indexed copy), and a stale
    index: the .bai of the same BAM without its unplaced reads (same BGZF blocks up to there,
    so its offsets are valid in the full BAM, but it counts fewer records)."""
    from bams3.sample import make_sample

    d = tmp_path_factory.mktemp("s3shards")
    raw = make_sample(d, 12000, 5)["bam"]
    bam = str(d / "full.bam")
    pysam.samtools.view("-b", "--no-PG", "-o", bam, raw, catch_stdout=False)
    pysam.index(bam)
    csi = str(d / "csi.bam")
    pysam.samtools.view("-b", "--no-PG", "-o", csi, raw, catch_stdout=False)
    pysam.index("-c", csi)
    placed = str(d / "placed.bam")
    refs = list(pysam.AlignmentFile(bam).references)
    pysam.samtools.view("-b", "--no-PG", "-o", placed, bam, *refs, catch_stdout=False)
    pysam.index(placed)
    return {"bam": bam, "csi": csi, "placed": placed, "stale_bai": placed + ".bai", "dir": d}


def cli(*args) -> int:
    from bams3.cli import main

    return main([str(a) for a in args])


def query(ds, *regions) -> str:
    out = pathlib.Path(str(ds) + "-q.sam")
    assert cli("query", "--no-cache", ds, *regions, "-o", out) == 0
    text = out.read_text()
    out.unlink()
    return text


def run(src, dest, **kw):
    with open_store(str(dest)) as st:
        return convert(src, st, ConvertOptions(block_bytes=BLOCK, chunk_bytes=CHUNK, **kw))


def upload(s3_env, path, key, index=None, index_key=None) -> str:
    c = s3_env.client()
    c.upload_file(str(path), s3_env.bucket, key)
    if index:
        c.upload_file(str(index), s3_env.bucket, index_key)
    return f"s3://{s3_env.bucket}/{key}"


def plan_of(src, shards=None):
    job = dict(threads=1, block_bytes=BLOCK, chunk_bytes=CHUNK)
    return stages.plan(src, job=job, store=stages.store_spec("unused"), run_id="r", shards=shards)


# -- the pieces ----------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["bam", "csi"])
def test_header_voffset_is_htslibs(bams, which):
    with open(bams[which], "rb") as f:
        header, hv = s3source.read_header(f, bams[which])
    with pysam.AlignmentFile(bams[which]) as a:
        assert hv == a.tell()
        assert [r.name for r in header.references] == list(a.references)


def test_range_file_reads_like_a_file(bams, s3_env, flaky_proxy):
    data = pathlib.Path(bams["bam"]).read_bytes()
    src = upload(s3_env, bams["bam"], "in/f.bam")
    with s3source.S3Source(src, None, stages.open_spec) as s:
        assert (s.size, s.identity) == (len(data), {"uri": src, "size": len(data), "etag": s.etag})
        flaky_proxy.reset()
        f = s.open(read_ahead=100_000)
        rng = random.Random(3)
        for _ in range(40):
            a = rng.randrange(len(data) + 10)
            n = rng.randrange(1, 300_000)
            f.seek(a)
            assert f.read(n) == data[a:a + n] and f.tell() == min(len(data), a + n)
        f.seek(-5, io.SEEK_END)
        assert f.read() == data[-5:]
        f.close()
        gets = [r for r in flaky_proxy.records if r.op == "GetObject"]
        assert gets and all(r.range and r.range.startswith("bytes=") for r in gets)
        assert all(hi - lo <= 100_000 for lo, hi in f.ranges)
        # the object is replaced: the next ranged GET (If-Match) fails with one line
        f = s.open(read_ahead=100_000)
        assert f.read(10) == data[:10]
        s3_env.client().put_object(Bucket=s3_env.bucket, Key="in/f.bam", Body=b"other" * 100_000)
        f.seek(400_000)
        with pytest.raises(InputError, match="changed while it was being converted"):
            f.read(10)
        f.close()


def test_index_lookup_one_get_per_name(bams, s3_env, flaky_proxy):
    c = s3_env.client()
    src = upload(s3_env, bams["bam"], "in/x.bam", bams["csi"] + ".csi", "in/x.csi")
    with s3source.S3Source(src, None, stages.open_spec) as s:
        flaky_proxy.reset()
        key, data = s3source.find_index(s.store, s.key)
        assert key == "in/x.csi" and data == pathlib.Path(bams["csi"] + ".csi").read_bytes()
        assert [r.path.rsplit("/", 1)[1] for r in flaky_proxy.records] == ["x.bam.bai", "x.bam.csi", "x.bai", "x.csi"]
        assert [r.status for r in flaky_proxy.records] == [404, 404, 404, 200]
        c.upload_file(bams["bam"] + ".bai", s3_env.bucket, "in/x.bam.bai")
        flaky_proxy.reset()
        assert s3source.find_index(s.store, s.key)[0] == "in/x.bam.bai" and flaky_proxy.stats["requests"] == 1
    # identity: size + ETag, no time; an unindexed object is one stream shard
    p = plan_of(upload(s3_env, bams["bam"], "in/plain.bam"))
    assert not p.sharded and set(p.identity) == {"uri", "size", "etag"} and p.jobs[0].source_etag


# -- sharded from S3 == one shard == samtools ------------------------------------------------------
@pytest.mark.parametrize("which,index_name,shards", [("bam", "{key}.bai", 4), ("csi", "{base}.csi", 3)])
def test_s3_sharded_equals_one_shard_and_samtools(bams, s3_env, flaky_proxy, tmp_path, monkeypatch,
                                                  which, index_name, shards):
    path = bams[which]
    index = path + (".bai" if which == "bam" else ".csi")
    key = f"in/{which}.bam"
    src = upload(s3_env, path, key, index, index_name.format(key=key, base=key[:-4]))
    size = os.path.getsize(path)
    # small ranges, so that "each shard reads its byte range" shows on a small BAM
    monkeypatch.setattr(s3source, "READ_AHEAD", 64 << 10)
    monkeypatch.setattr(s3source, "TAIL_READ", 16 << 10)
    monkeypatch.setattr(stages, "BgzfReader", functools.partial(BgzfReader, group=4))  # inflate batches
    p = plan_of(src, shards)
    local = stages.plan(path, job=dict(threads=1, block_bytes=BLOCK, chunk_bytes=CHUNK),
                        store=stages.store_spec("unused"), run_id="r", shards=shards)
    assert [(j.lo, j.hi, j.voffset, j.est_bytes) for j in p.jobs] == \
        [(j.lo, j.hi, j.voffset, j.est_bytes) for j in local.jobs]  # planned exactly as the local file
    assert p.index_records == local.index_records == int(pysam.samtools.view("-c", path))

    flaky_proxy.reset()
    many = run(src, tmp_path / "many", shards=shards)
    assert many.shards == shards + 1
    gets = [r for r in flaky_proxy.records if r.op == "GetObject" and r.path.endswith("/" + key)]
    assert all(r.range for r in gets)  # ranged reads only
    starts = {int(r.range[6:].split("-")[0]) for r in gets}
    assert {j.voffset >> 16 for j in p.jobs} <= starts  # each shard starts at its own block
    read = sum(r.bytes_out for r in gets)
    # every shard reading from its start to the end would be sum(size - start); they read less
    assert read < sum(size - (j.voffset >> 16) for j in p.jobs) and read >= size

    flaky_proxy.reset()
    one = run(src, tmp_path / "one", shards=1)
    assert one.shards == 1 and many.records == one.records == p.index_records
    want = samtools_view(path)
    assert query(tmp_path / "many") == query(tmp_path / "one") == want
    name = pysam.AlignmentFile(path).references[1]
    for region in (f"{name}:1000-40000", "*"):
        assert query(tmp_path / "many", region) == samtools_view(path, region)


def test_cli_from_s3_sharded(bams, s3_env, tmp_path, capsys):
    src = upload(s3_env, bams["bam"], "cli/s.bam", bams["bam"] + ".bai", "cli/s.bam.bai")
    assert cli("convert", "--shards", "3", "--chunk-size", "24K", "--block-size", "8K", src, tmp_path / "ds") == 0
    chunks = sorted(p.name for p in (tmp_path / "ds").glob("data/*/chunks/*.b3c"))
    assert any(c.startswith("3000000") for c in chunks)  # shard 3 (the unplaced reads) wrote its own chunks
    assert query(tmp_path / "ds") == samtools_view(bams["bam"])


def test_dask_workers_read_their_own_ranges(bams, s3_env, tmp_path, capsys, dask_cluster):
    """The workers open the source's bucket from the plain spec in the job (no client shipped)."""
    src = upload(s3_env, bams["csi"], "dask/s.bam", bams["csi"] + ".csi", "dask/s.bam.csi")
    assert cli("convert", "--dask", dask_cluster, "-@", "1", "--shards", "3", "--chunk-size", "24K",
               "--block-size", "8K", src, tmp_path / "dask") == 0
    assert "shard 4/4" in capsys.readouterr().err
    assert query(tmp_path / "dask") == samtools_view(bams["csi"])


def test_resume_from_s3_by_etag(bams, s3_env, tmp_path):
    """A failed sharded run from S3 is taken over (same size + ETag); a replaced object is not."""
    from bams3.errors import StoreError
    from bams3.stages import ShardSink

    src = upload(s3_env, bams["bam"], "re/s.bam", bams["bam"] + ".bai", "re/s.bam.bai")
    real = ShardSink.upload
    seen = {"n": 0}

    def upload_then_fail(self, chunk, cs):
        seen["n"] += 1
        if seen["n"] > 20:
            raise StoreError("s3://x: S3 server error (InternalError); retry later")
        return real(self, chunk, cs)

    for dest, replace in (("ds", False), ("ds2", True)):
        seen["n"] = 0
        with pytest.MonkeyPatch.context() as mp, pytest.raises(StoreError):
            mp.setattr(ShardSink, "upload", upload_then_fail)
            run(src, tmp_path / dest, shards=3, resume=True)
        want = bams["bam"]
        if replace:  # another object (ETag) under the same key: never resumed
            want = bams["placed"]
            upload(s3_env, want, "re/s.bam", want + ".bai", "re/s.bam.bai")
        res = run(src, tmp_path / dest, shards=3, resume=True)
        assert res.resumed != replace and (res.reused_chunks >= 15) != replace
        assert query(tmp_path / dest) == samtools_view(want)


# -- checks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("stale", ["offsets", "counts"])
def test_stale_index_commits_nothing(bams, s3_env, tmp_path, capsys, stale):
    if stale == "offsets":  # the index of another file: its last offset is inside a block here
        index = bams["stale_bai"]
        what = "no such BGZF block: a stale index?"
    else:  # offsets right, but one more unplaced read counted than the file has (n_no_coor)
        data = bytearray(pathlib.Path(bams["bam"] + ".bai").read_bytes())
        data[-8:] = (int.from_bytes(data[-8:], "little") + 1).to_bytes(8, "little")
        index = tmp_path / "counts.bai"
        index.write_bytes(bytes(data))
        what = "its index counts"
    src = upload(s3_env, bams["bam"], "st/s.bam", index, "st/s.bam.bai")
    assert cli("convert", "-q", "--shards", "3", src, tmp_path / "ds") == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert what in err and "nothing was committed" in err
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_source_changed_during_the_run(bams, s3_env, tmp_path, monkeypatch):
    src = upload(s3_env, bams["bam"], "ch/s.bam", bams["bam"] + ".bai", "ch/s.bam.bai")
    real = stages.plan

    def plan_then_replace(*a, **kw):
        p = real(*a, **kw)
        s3_env.client().upload_file(bams["placed"], s3_env.bucket, "ch/s.bam")  # another object
        return p

    monkeypatch.setattr(stages, "plan", plan_then_replace)
    for shards in (3, 1):  # range shards, and the one stream shard
        s3_env.client().upload_file(bams["bam"], s3_env.bucket, "ch/s.bam")
        with pytest.raises(InputError, match="changed while it was being converted"):
            run(src, tmp_path / f"ds{shards}", shards=shards)
        assert not (tmp_path / f"ds{shards}" / "manifest.json").exists()


def test_missing_object_is_one_line(s3_env, tmp_path, capsys):
    assert cli("convert", "-q", f"s3://{s3_env.bucket}/nope/s.bam", tmp_path / "ds") == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no such object" in err and "Traceback" not in err
    assert not (tmp_path / "ds").exists()
