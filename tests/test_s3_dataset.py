"""Datasets on a real HTTP S3 endpoint (moto server on 127.0.0.1), through the CLI.

convert from a file and from stdin, query/stats equal to the local dataset, multipart with a
small part size, failures absorbed by retries, an interrupted conversion that leaves no
committed dataset and no open multipart upload, request counts for query/stats, the ETag
cache, and one-line errors.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest_data import run_cli


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from bams3.sample import make_sample

    d = tmp_path_factory.mktemp("s3sample")
    paths = make_sample(d, n_pairs=15000, seed=9)
    local = d / "local"
    run_cli("convert", "-q", "--chunk-size", "1M", paths["bam"], local)
    return {"bam": paths["bam"], "local": local}


@pytest.fixture(scope="module")
def big_sample(tmp_path_factory):
    """Full-resolution qualities compress less: one chunk object > 10 MiB (with 5 MiB parts,
    above the multipart threshold of twice the part size: a multipart upload of three parts)."""
    from bams3.sample import make_sample

    d = tmp_path_factory.mktemp("s3big")
    paths = make_sample(d, n_pairs=70000, seed=4, qual_mode="full")
    local = d / "local"
    run_cli("convert", "-q", paths["bam"], local)
    return {"bam": paths["bam"], "local": local}


def _env(s3_env):
    return {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                       "AWS_DEFAULT_REGION", "BAMS3_CACHE_DIR") if k in os.environ}


def _same_answers(uri, local, env):
    for args in (["query"], ["query", "chr1:20000-40000", "chr2"], ["query", "-c", "*"],
                 ["stats", "--json"], ["query", "--no-PG", "-h", "chr1:1-5000"]):
        a = run_cli(*args[:1], uri, *args[1:], env=env).stdout
        b = run_cli(*args[:1], local, *args[1:]).stdout
        if args[0] == "stats":
            a, b = json.loads(a), json.loads(b)
            a, b = [{k: x[k] for k in ("records", "flagstat", "idxstats")} for x in (a, b)]
        assert a == b, args


def test_convert_file_to_s3_and_read_back(sample, s3_env):
    env = _env(s3_env)
    uri = s3_env.uri("file.bams3")
    r = run_cli("convert", "--chunk-size", "1M", sample["bam"], uri, env=env)
    assert b"chunk 0" in r.stderr  # progress per chunk on stderr
    _same_answers(uri, sample["local"], env)
    assert run_cli("verify", uri, env=env).returncode == 0


def test_convert_stdin_to_s3_unsorted_small_parts(big_sample, s3_env, flaky_proxy, tmp_path):
    """Aligner-order SAM on stdin, multipart with 5 MiB parts, spill runs in the bucket."""
    import pysam

    env = _env(s3_env)
    sample = big_sample
    text = pysam.samtools.view("--no-PG", "-h", sample["bam"])
    lines = text.splitlines(keepends=True)
    head = [line for line in lines if line.startswith("@")]
    body = [line for line in lines if not line.startswith("@")]
    body = body[1::2] + body[0::2]  # unsorted
    sam = "".join(head).replace("SO:coordinate", "SO:unsorted") + "".join(body)
    uri = s3_env.uri("stdin.bams3")
    run_cli("convert", "-q", "-m", "8M", "--s3-part-size", "5M", "-", uri, input_bytes=sam.encode(), env=env)
    ops = flaky_proxy.stats["by_op"]
    assert ops.get("UploadPart", 0) >= 2 and ops.get("CompleteMultipartUpload", 0) >= 1
    c = s3_env.client()
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=s3_env.bucket, Prefix="stdin.bams3/").get("Contents", [])]
    assert not [k for k in keys if "/_tmp/" in k]  # spill runs removed on commit
    # the oracle: samtools sort of the same unsorted input (ties keep input order)
    (tmp_path / "u.sam").write_text(sam)
    pysam.samtools.sort("--no-PG", "-o", str(tmp_path / "s.bam"), str(tmp_path / "u.sam"), catch_stdout=False)
    want = pysam.samtools.view("--no-PG", "-h", str(tmp_path / "s.bam"))
    assert run_cli("query", "--no-PG", "-h", uri, env=env).stdout.decode() == want
    a = json.loads(run_cli("stats", "--json", uri, env=env).stdout)
    b = json.loads(run_cli("stats", "--json", sample["local"]).stdout)
    assert a["flagstat"] == b["flagstat"] and a["idxstats"] == b["idxstats"]


def test_retries_absorb_throttling(sample, s3_env, flaky_proxy):
    env = _env(s3_env)
    flaky_proxy.fail_every(3, op="PutObject", count=4)  # 503 SlowDown on some uploads
    uri = s3_env.uri("flaky.bams3")
    run_cli("convert", "-q", "--chunk-size", "256K", sample["bam"], uri, env=env)
    assert flaky_proxy.stats["injected"] >= 1
    flaky_proxy.clear_faults()
    _same_answers(uri, sample["local"], env)


def test_interrupted_conversion_leaves_nothing(big_sample, s3_env, flaky_proxy):
    sample = big_sample
    env = dict(_env(s3_env), AWS_MAX_ATTEMPTS="2")
    flaky_proxy.fail_always(op="UploadPart")
    uri = s3_env.uri("broken.bams3")
    # one stream (--shards 1): its chunk is over twice the part size, so it goes multipart (shards'
    # smaller chunks would be single PUTs, which the fault does not touch)
    r = run_cli("convert", "-q", "--shards", "1", "--s3-part-size", "5M", sample["bam"], uri, env=env, check=False)
    flaky_proxy.clear_faults()
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode != 0 and len(err) == 1 and "Traceback" not in r.stderr.decode()
    c = s3_env.client()
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=s3_env.bucket, Prefix="broken.bams3/").get("Contents", [])]
    assert keys == []  # no manifest, no chunks, no spill runs
    assert c.list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads", []) == []
    r = run_cli("query", uri, env=env, check=False)
    assert r.returncode != 0 and b"no bams3 dataset" in r.stderr
    # a rerun of the same command restarts cleanly
    run_cli("convert", "-q", "--s3-part-size", "5M", sample["bam"], uri, env=env)
    _same_answers(uri, sample["local"], env)


def test_query_and_stats_request_counts(sample, s3_env, flaky_proxy):
    env = _env(s3_env)
    uri = s3_env.uri("counts.bams3")
    run_cli("convert", "-q", sample["bam"], uri, env=env)
    cache = os.environ["BAMS3_CACHE_DIR"]
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    flaky_proxy.reset()
    run_cli("stats", uri, env=env)
    assert flaky_proxy.stats["requests"] == 1  # the manifest, nothing else
    flaky_proxy.reset()
    run_cli("stats", uri, env=env)
    assert flaky_proxy.stats["requests"] == 0  # warm cache within its TTL
    shutil.rmtree(cache, ignore_errors=True)
    flaky_proxy.reset()
    run_cli("query", uri, "chr1:30000-31000", env=env)
    assert flaky_proxy.stats["requests"] <= 3  # manifest, index, data
    flaky_proxy.reset()
    run_cli("query", uri, "chr1:30000-31000", env=env)
    assert flaky_proxy.stats["requests"] == 1  # data only
    run_cli("query", uri, "chr1:30000-31000", "--no-cache", env=env)


def _paged_dataset(sample, s3_env, name):
    """Convert with small blocks (a paged index) to S3: (uri, env, chr1's index ObjectRef)."""
    from bams3.dataset import Dataset
    from bams3.store import open_store

    env = _env(s3_env)
    uri = s3_env.uri(name)
    run_cli("convert", "-q", "--block-size", "16K", sample["bam"], uri, env=env)
    with open_store(uri, use_cache=False) as st:
        ix = Dataset.open(st).manifest.index_for(0)
    assert len(ix.pages) > 3, ix.pages
    return uri, env, ix


def _one_index_range_read(proxy, ix):
    """The proxy saw exactly one GET of the index object, ranged and smaller than it."""
    idx = [r for r in proxy.records if r.path.endswith(ix.key)]
    assert len(idx) == 1 and idx[0].range is not None, [(r.path, r.range) for r in idx]
    assert 0 < idx[0].bytes_out < ix.size
    return idx


def test_region_query_reads_only_its_index_pages(sample, s3_env, flaky_proxy):
    """Small blocks make a paged index: a cold region query fetches the manifest, one byte
    range of the index (its pages, not the whole object) and the data; answers stay exact."""
    import shutil

    uri, env, ix = _paged_dataset(sample, s3_env, "paged.bams3")
    for region in ("chr1:30000-31000", "chr1:1-100", f"chr1:{ix.pages[-1][3] + 1}-{ix.pages[-1][3] + 500}"):
        shutil.rmtree(os.environ["BAMS3_CACHE_DIR"], ignore_errors=True)
        flaky_proxy.reset()
        got = run_cli("query", uri, region, env=env).stdout
        assert got == run_cli("query", sample["local"], region).stdout
        idx = _one_index_range_read(flaky_proxy, ix)
        other = [r.path for r in flaky_proxy.records if "/chunks/" not in r.path and r not in idx]
        assert len(other) == 1 and other[0].endswith("manifest.json"), other  # + data ranges only
    flaky_proxy.reset()
    run_cli("query", uri, region, env=env)  # warm: the page range comes from the cache
    assert all("/chunks/" in r.path for r in flaky_proxy.records)


def test_union_query_reads_only_the_index_pages_of_its_regions(sample, s3_env, flaky_proxy):
    """`query -M` over a paged index: one ranged GET spanning the pages its regions need
    (not the whole index object); the union is exact (as on the local dataset)."""
    uri, env, ix = _paged_dataset(sample, s3_env, "paged-union.bams3")
    regions = ["chr1:1-100", "chr1:20000-31000", "chr1:25000-26000"]
    flaky_proxy.reset()
    got = run_cli("query", "-M", uri, *regions, env=env).stdout
    assert got == run_cli("query", "-M", sample["local"], *regions).stdout
    assert got.count(b"\n") > 0
    _one_index_range_read(flaky_proxy, ix)


def test_rewritten_dataset_is_noticed(sample, s3_env):
    """A cached manifest whose chunks were replaced: the data GET's If-Match fails and the
    reader says so in one line (a rerun fetches the new manifest)."""
    env = _env(s3_env)
    uri = s3_env.uri("rewrite.bams3")
    run_cli("convert", "-q", sample["bam"], uri, env=env)
    run_cli("query", "-c", uri, "chr1:30000-31000", env=env)  # warms the cache
    run_cli("convert", "-q", "--overwrite", "--block-size", "64K", sample["bam"], uri, env=env)
    r = run_cli("query", "-c", uri, "chr1:30000-31000", env=env, check=False)
    if r.returncode != 0:
        assert len(r.stderr.decode().strip().splitlines()) == 1
    r = run_cli("query", "-c", uri, "chr1:30000-31000", env=env)
    want = run_cli("query", "-c", sample["local"], "chr1:30000-31000").stdout
    assert r.stdout == want


@pytest.mark.parametrize("case", ["no_bucket", "no_dataset", "unreachable"])
def test_s3_errors_are_one_line(case, s3_env, tmp_path):
    env = _env(s3_env)
    if case == "no_bucket":
        uri = "s3://no-such-bucket-here/x"
    elif case == "no_dataset":
        uri = s3_env.uri("nothing-here")
    else:
        uri = s3_env.uri("x")
        env = dict(env, AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_MAX_ATTEMPTS="1")
    r = run_cli("stats", uri, env=env, check=False)
    err = r.stderr.decode()
    assert r.returncode != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert ("no-such-bucket-here" in err) or ("nothing-here" in err) or ("127.0.0.1:9" in err), err
