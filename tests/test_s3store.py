"""S3Store against a real HTTP moto server on 127.0.0.1 (plus a counting/failing proxy)."""

from __future__ import annotations

import os
import pickle
import socket
import time

import pytest

pytest.importorskip("moto")

import botocore.exceptions as bce  # noqa: E402

from bams3.errors import InputError, NotFound, PreconditionFailed, StoreError  # noqa: E402
from bams3.store import open_store  # noqa: E402
from bams3.store.cache import MetadataCache  # noqa: E402
from bams3.store.s3 import (  # noqa: E402
    MiB,
    S3Store,
    _coalesce,
    effective_part_size,
    range_header,
    translate_error,
)
from bams3.testing import classify_s3_op  # noqa: E402


def make_store(env, prefix="ds", **kw) -> S3Store:
    kw.setdefault("region", "us-east-1")
    return S3Store(env.bucket, prefix, **kw)


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text
    return text


def ops(proxy, *, skip_injected=False):
    return [r.op for r in proxy.records if not (skip_injected and r.injected)]


# --------------------------------------------------------------------------------------------
# units
# --------------------------------------------------------------------------------------------
def test_range_header_formatting():
    assert range_header(0, 1) == "bytes=0-0"
    assert range_header(10, 20) == "bytes=10-19"
    with pytest.raises(ValueError):
        range_header(5, 5)


def test_coalesce_adjacent_ranges():
    groups = _coalesce([(10, 20), (0, 10), (30, 40), (20, 25)], gap=0, max_len=1 << 30)
    assert groups == [((0, 25), [1, 0, 3]), ((30, 40), [2])]
    assert len(_coalesce([(0, 10), (15, 20)], gap=5, max_len=100)) == 1
    assert len(_coalesce([(0, 10), (10, 20)], gap=0, max_len=15)) == 2


def test_part_size_limits():
    with pytest.raises(InputError, match="5 MiB"):
        S3Store("bkt", "p", part_size=1 * MiB)
    with pytest.raises(InputError, match="5 GiB"):
        S3Store("bkt", "p", part_size=6 * 1024 * MiB)
    assert effective_part_size(12 * MiB, 5 * MiB) == 5 * MiB
    big = effective_part_size(100 * 1024 * MiB, 5 * MiB)  # 100 GiB would be 20480 parts
    assert big % MiB == 0 and -(-100 * 1024 * MiB // big) <= 10_000


def test_retry_config(s3_env):
    with make_store(s3_env, concurrency=6, max_attempts=5) as st:
        cfg = st.client.meta.config
        assert cfg.retries == {"mode": "standard", "total_max_attempts": 5}  # 1 try + 4 retries
        assert cfg.max_pool_connections >= 6 + 4
        assert cfg.tcp_keepalive is True
        assert cfg.s3 == {"addressing_style": "path"}  # custom endpoint -> path style
    with make_store(s3_env, retry_mode="adaptive") as st:
        assert st.client.meta.config.retries["mode"] == "adaptive"


def test_classify_ops():
    assert classify_s3_op("PUT", "/b/k", "partNumber=1&uploadId=x") == "UploadPart"
    assert classify_s3_op("POST", "/b/k", "uploads") == "CreateMultipartUpload"
    assert classify_s3_op("GET", "/b", "list-type=2&prefix=ds/") == "ListObjectsV2"
    assert classify_s3_op("POST", "/b", "delete") == "DeleteObjects"


def test_translate_error_messages():
    redirect = bce.ClientError({"Error": {"Code": "PermanentRedirect", "Message": "x"},
                                "ResponseMetadata": {"HTTPStatusCode": 301, "HTTPHeaders": {
                                    "x-amz-bucket-region": "eu-west-1"}}}, "GetObject")
    msg = one_line(translate_error(redirect, bucket="bkt", key="ds/m.json", region="us-east-1"))
    assert "s3://bkt/ds/m.json" in msg and "eu-west-1" in msg and "--s3-region" in msg
    slow = bce.ClientError({"Error": {"Code": "SlowDown", "Message": "Please\nreduce"},
                            "ResponseMetadata": {"HTTPStatusCode": 503, "RetryAttempts": 7}},
                           "PutObject")
    msg = one_line(translate_error(slow, bucket="bkt", key="k"))
    assert "after 8 attempts" in msg and "--s3-concurrency" in msg
    glacier = bce.ClientError({"Error": {"Code": "InvalidObjectState",
                                         "StorageClass": "GLACIER"}}, "GetObject")
    assert "restore" in one_line(translate_error(glacier, bucket="bkt", key="k"))
    conflict = bce.ClientError({"Error": {"Code": "ConditionalRequestConflict"},
                                "ResponseMetadata": {"HTTPStatusCode": 409}}, "PutObject")
    err = translate_error(conflict, bucket="bkt", key="ds/manifest.json", writing=True)
    assert isinstance(err, PreconditionFailed) and "--overwrite" in one_line(err)
    creds = translate_error(bce.NoCredentialsError(), bucket="bkt", key="k")
    assert "AWS_ACCESS_KEY_ID" in one_line(creds)


# --------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------
def test_roundtrip(s3_env):
    st = open_store(s3_env.uri("ds"), region="us-east-1")
    assert isinstance(st, S3Store)
    with st:
        info = st.set("a/x.bin", b"0123456789")
        assert info.key == "a/x.bin" and info.size == 10 and info.etag
        st.set("a/y.bin", b"yy")
        st.set("m.json", b"{}")
        assert st.get("a/x.bin") == b"0123456789"
        assert st.get("a/x.bin", (2, 5)) == b"234"
        assert st.get("a/x.bin", (4, 4)) == b""
        assert st.get("a/x.bin", (8, 100)) == b"89"
        assert st.get("a/x.bin", (50, 60)) == b""  # past the end: empty, like a local file
        assert st.get_ranges("a/x.bin", [(5, 7), (0, 2), (9, 10)]) == [b"56", b"01", b"9"]
        data, winfo = st.get_with_info("a/x.bin")
        assert data == b"0123456789" and winfo.etag == info.etag and winfo.size == 10
        h = st.head("a/x.bin")
        assert (h.key, h.size, h.etag, h.storage_class) == ("a/x.bin", 10, info.etag, "STANDARD")
        assert st.exists("a/x.bin") and not st.exists("nope")
        assert st.get("a/x.bin", if_match=info.etag) == b"0123456789"
        with pytest.raises(PreconditionFailed) as ei:
            st.get("a/x.bin", (0, 2), if_match="0" * 32)
        assert "s3://" in one_line(ei.value)
        assert sorted(o.key for o in st.list_prefix()) == ["a/x.bin", "a/y.bin", "m.json"]
        assert [o.key for o in st.list_prefix("a/")] == ["a/x.bin", "a/y.bin"]
        listed = {o.key: o for o in st.list_prefix()}
        assert listed["a/x.bin"].etag == info.etag and listed["a/x.bin"].storage_class
        with st.open_read("a/x.bin") as f:
            assert f.read(3) == b"012" and f.read() == b"3456789"
        # a sibling prefix sharing the name's start is not listed
        s3_env.client().put_object(Bucket=s3_env.bucket, Key="ds2/z", Body=b"z")
        assert all(not o.key.startswith("2") for o in st.list_prefix())
        st.delete(["a/y.bin", "missing"])
        assert not st.exists("a/y.bin")
        assert st.delete_prefix("") == 2
        assert list(st.list_prefix()) == []
        assert st.get_ranges("m", []) == []


def test_get_ranges_parallel_in_order(s3_env, flaky_proxy):
    blob = bytes(range(256)) * 64
    with make_store(s3_env, concurrency=4) as st:
        st.set("c.bin", blob)
        flaky_proxy.reset()
        ranges = [(1000, 1100), (0, 10), (5000, 5100), (1100, 1200), (9000, 9001)]
        out = st.get_ranges("c.bin", ranges)
        assert out == [blob[s:e] for s, e in ranges]
        # (1000,1100)+(1100,1200) are adjacent -> one GET; 4 GETs in all
        assert flaky_proxy.stats["by_op"] == {"GetObject": 4}
        assert {r.range for r in flaky_proxy.records} == {
            "bytes=1000-1199", "bytes=0-9", "bytes=5000-5099", "bytes=9000-9000"}


def test_no_region_discovery_request(s3_env, flaky_proxy):
    """No HeadBucket up front: the first request is the operation itself (botocore's region
    redirector follows buckets in other regions on real S3); --s3-region pins it."""
    c = s3_env.client()
    bucket = s3_env.bucket + "-eu"
    c.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    with S3Store(bucket, "ds") as st:
        st.set("k", b"v")
    assert ops(flaky_proxy) == ["PutObject"]
    flaky_proxy.reset()
    with S3Store(bucket, "ds", region="eu-west-1") as st:
        assert st.get("k") == b"v" and st.region == "eu-west-1"
    assert ops(flaky_proxy) == ["GetObject"]


# --------------------------------------------------------------------------------------------
# writes: multipart, conditional, options
# --------------------------------------------------------------------------------------------
def test_multipart_upload(s3_env, flaky_proxy):
    data = os.urandom(12 * MiB + 123)
    with make_store(s3_env, part_size=5 * MiB, concurrency=4, storage_class="STANDARD_IA",
                    sse="AES256") as st:
        info = st.set("big.bin", data, kind="chunk")  # the storage class applies to chunks only
        assert info.etag.endswith("-3") and info.size == len(data)
        by_op = flaky_proxy.stats["by_op"]
        assert by_op == {"CreateMultipartUpload": 1, "UploadPart": 3,
                         "CompleteMultipartUpload": 1}  # no extra HEAD for the ETag
        assert st.get("big.bin") == data
        assert st.head("big.bin").etag == info.etag
        head = s3_env.client().head_object(Bucket=s3_env.bucket, Key="ds/big.bin")
        assert head["StorageClass"] == "STANDARD_IA"
        assert head["ServerSideEncryption"] == "AES256"
        tags = s3_env.client().get_object_tagging(Bucket=s3_env.bucket, Key="ds/big.bin")["TagSet"]
        assert tags == [{"Key": "bams3-object", "Value": "chunk"}]  # multipart uploads carry the tag too
        with st.open_read("big.bin") as f:
            assert f.read(5) == data[:5]
            assert f.read() == data[5:]


def test_multipart_threshold(s3_env, flaky_proxy):
    # up to twice the part size: one PutObject (a 16 MiB chunk with 10 MiB parts is one
    # request, not create + 2 parts + complete); above it: multipart in part-size parts
    with make_store(s3_env, part_size=5 * MiB) as st:
        assert st.multipart_threshold == 10 * MiB
        small, big = os.urandom(10 * MiB), os.urandom(10 * MiB + 1)
        info = st.set("ten.bin", small, kind="chunk")
        assert flaky_proxy.stats["by_op"] == {"PutObject": 1} and info.size == len(small)
        flaky_proxy.reset()
        info = st.set("more.bin", big, kind="chunk")
        assert flaky_proxy.stats["by_op"] == {"CreateMultipartUpload": 1, "UploadPart": 3,
                                              "CompleteMultipartUpload": 1}
        assert info.etag.endswith("-3") and st.get("more.bin") == big and st.get("ten.bin") == small
    with make_store(s3_env, part_size=5 * MiB, multipart_threshold=5 * MiB) as st:
        flaky_proxy.reset()
        st.set("six.bin", os.urandom(6 * MiB))
        assert flaky_proxy.stats["by_op"]["UploadPart"] == 2


def test_put_sends_checksum(s3_env, flaky_proxy):
    with make_store(s3_env) as st:
        st.set("small.bin", b"x" * 1000)
    head = s3_env.client().head_object(Bucket=s3_env.bucket, Key="ds/small.bin",
                                       ChecksumMode="ENABLED")
    assert head.get("ChecksumCRC32")  # S3 (moto) received and stored the CRC32


def test_conditional_set(s3_env):
    with make_store(s3_env, part_size=5 * MiB) as st:
        st.set("manifest.json", b'{"v": 1}', if_none_match=True)
        with pytest.raises(PreconditionFailed) as ei:
            st.set("manifest.json", b'{"v": 2}', if_none_match=True)
        msg = one_line(ei.value)
        assert f"s3://{s3_env.bucket}/ds/manifest.json" in msg and "--overwrite" in msg
        assert st.get("manifest.json") == b'{"v": 1}'
        st.set("manifest.json", b'{"v": 3}')  # unconditional overwrite
        assert st.get("manifest.json") == b'{"v": 3}'
        # above the multipart threshold a conditional write is still one atomic PutObject
        assert st.multipart_threshold < 11 * MiB
        st.set("big", b"\0" * (11 * MiB), if_none_match=True)
        with pytest.raises(PreconditionFailed):
            st.set("big", b"\1" * (11 * MiB), if_none_match=True)


# --------------------------------------------------------------------------------------------
# retries and failures
# --------------------------------------------------------------------------------------------
def test_retries_absorb_slowdown(s3_env, flaky_proxy):
    with make_store(s3_env) as st:
        st.set("k", b"hello")
        flaky_proxy.reset()
        flaky_proxy.fail_next(2, status=503, code="SlowDown")
        assert st.get("k") == b"hello"
        recs = flaky_proxy.records
        assert [(r.op, r.status, bool(r.injected)) for r in recs] == [
            ("GetObject", 503, True), ("GetObject", 503, True), ("GetObject", 200, False)]


def test_retries_absorb_failed_upload_parts(s3_env, flaky_proxy):
    data = os.urandom(12 * MiB)
    with make_store(s3_env, part_size=5 * MiB) as st:
        flaky_proxy.fail_every(2, op="UploadPart", count=2, status=503, code="SlowDown")
        flaky_proxy.fail_next(1, op="CompleteMultipartUpload", mode="drop")
        info = st.set("big.bin", data)
        stats = flaky_proxy.stats
        assert stats["injected"] == 3
        assert stats["by_op"]["UploadPart"] == 3 + 2
        assert st.get("big.bin") == data and info.etag.endswith("-3")


def test_body_read_errors_are_retried(s3_env, flaky_proxy):
    data = os.urandom(300_000)
    with make_store(s3_env) as st:
        st.set("k", data)
        flaky_proxy.reset()
        flaky_proxy.fail_next(1, op="GetObject", mode="truncate")
        assert st.get("k") == data
        assert [r.injected for r in flaky_proxy.records] == ["truncate", None]
        # streaming reader resumes from where the body broke, same version
        flaky_proxy.reset()
        flaky_proxy.fail_next(1, op="GetObject", mode="truncate")
        with st.open_read("k") as f:
            assert f.read() == data
        recs = flaky_proxy.records
        assert recs[0].injected == "truncate" and recs[1].range == f"bytes={len(data) // 2}-"


def test_multipart_permanent_failure_is_aborted(s3_env, flaky_proxy):
    with make_store(s3_env, part_size=5 * MiB, max_attempts=2) as st:
        flaky_proxy.fail_always(op="UploadPart", status=500, code="InternalError")
        with pytest.raises(StoreError) as ei:
            st.set("big.bin", b"\0" * (11 * MiB))
        msg = one_line(ei.value)
        assert f"s3://{s3_env.bucket}/ds/big.bin" in msg and "retry later" in msg
        assert flaky_proxy.count("AbortMultipartUpload") == 1
    uploads = s3_env.client().list_multipart_uploads(Bucket=s3_env.bucket)
    assert not uploads.get("Uploads")
    assert not st.exists("big.bin")


def test_slowdown_exhausted_message(s3_env, flaky_proxy):
    with make_store(s3_env, max_attempts=2) as st:
        st.set("k", b"v")
        flaky_proxy.fail_always(op="GetObject")
        with pytest.raises(StoreError) as ei:
            st.get("k")
        msg = one_line(ei.value)
        assert "SlowDown" in msg and "after 2 attempts" in msg and s3_env.bucket in msg


def test_access_denied_message(s3_env, flaky_proxy):
    with make_store(s3_env) as st:
        flaky_proxy.fail_next(1, op="GetObject", status=403, code="AccessDenied",
                              message="Access Denied")
        with pytest.raises(StoreError) as ei:
            st.get("k")
        msg = one_line(ei.value)
        assert f"s3://{s3_env.bucket}/ds/k" in msg and "s3:GetObject" in msg


def test_cleanup_incomplete(s3_env):
    c = s3_env.client()
    c.create_multipart_upload(Bucket=s3_env.bucket, Key="ds/part.bin")
    c.create_multipart_upload(Bucket=s3_env.bucket, Key="ds/sub/other.bin")
    c.create_multipart_upload(Bucket=s3_env.bucket, Key="elsewhere/keep.bin")
    with make_store(s3_env) as st:
        assert st.cleanup_incomplete() == 2
        assert st.cleanup_incomplete() == 0
    left = [u["Key"] for u in c.list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads", [])]
    assert left == ["elsewhere/keep.bin"]


# --------------------------------------------------------------------------------------------
# metadata cache
# --------------------------------------------------------------------------------------------
def test_get_small_cache(s3_env, flaky_proxy):
    with make_store(s3_env, cache_ttl=300) as st:
        info = st.set("manifest.json", b'{"v": 1}')
        flaky_proxy.reset()
        data, got = st.get_small("manifest.json")
        assert data == b'{"v": 1}' and got.etag == info.etag
        assert flaky_proxy.stats["requests"] == 1
        # within the TTL: zero requests, also from another store (another process)
        flaky_proxy.reset()
        with make_store(s3_env) as other:
            assert other.get_small("manifest.json")[0] == b'{"v": 1}'
        assert st.get_small("manifest.json")[1].etag == info.etag
        assert flaky_proxy.stats["requests"] == 0
        # past the TTL: one conditional GET answered 304
        data, got = st.get_small("manifest.json", max_age=0)
        assert data == b'{"v": 1}' and got.etag == info.etag
        assert [(r.op, r.status) for r in flaky_proxy.records] == [("GetObject", 304)]
        assert flaky_proxy.stats["bytes_out"] == 0
        # the 304 refreshed the validation time
        flaky_proxy.reset()
        st.get_small("manifest.json")
        assert flaky_proxy.stats["requests"] == 0
        # the object changes behind our back: stale within TTL, new after revalidation
        s3_env.client().put_object(Bucket=s3_env.bucket, Key="ds/manifest.json", Body=b'{"v": 2}')
        assert st.get_small("manifest.json")[0] == b'{"v": 1}'
        data, got = st.get_small("manifest.json", max_age=0)
        assert data == b'{"v": 2}' and got.etag != info.etag
        assert st.get_small("manifest.json")[0] == b'{"v": 2}'
        # invalidate(): the next read is an unconditional GET
        flaky_proxy.reset()
        st.invalidate("manifest.json")
        assert st.get_small("manifest.json")[0] == b'{"v": 2}'
        assert [(r.op, r.status) for r in flaky_proxy.records] == [("GetObject", 200)]
        # our own overwrite keeps the cached copy current
        st.set("manifest.json", b'{"v": 3}')
        flaky_proxy.reset()
        assert st.get_small("manifest.json")[0] == b'{"v": 3}'
        assert flaky_proxy.stats["requests"] == 0
        # deleting drops the cached copy
        st.delete(["manifest.json"])
        with pytest.raises(NotFound):
            st.get_small("manifest.json")


def test_get_small_ttl_expiry(s3_env, flaky_proxy):
    with make_store(s3_env, cache_ttl=0.3) as st:
        st.set("h", b"header")
        st.get_small("h")
        flaky_proxy.reset()
        st.get_small("h")
        assert flaky_proxy.stats["requests"] == 0
        time.sleep(0.35)
        assert st.get_small("h")[0] == b"header"
        assert [(r.op, r.status) for r in flaky_proxy.records] == [("GetObject", 304)]


def test_get_small_without_cache(s3_env, flaky_proxy):
    with make_store(s3_env, use_cache=False) as st:
        st.set("m", b"x")
        flaky_proxy.reset()
        for _ in range(3):
            assert st.get_small("m")[0] == b"x"
        assert flaky_proxy.stats["by_op"] == {"GetObject": 3}
    assert not os.path.exists(os.path.join(s3_env.cache_dir, "s3-v1", "objects"))


def test_corrupt_cache_entry_is_ignored(s3_env, flaky_proxy):
    with make_store(s3_env) as st:
        st.set("m", b"payload")
        st.get_small("m")
        objdir = os.path.join(s3_env.cache_dir, "s3-v1", "objects")
        paths = [os.path.join(d, f) for d, _, fs in os.walk(objdir) for f in fs]
        assert len(paths) == 1
        with open(paths[0], "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"XYZ")
        flaky_proxy.reset()
        assert st.get_small("m")[0] == b"payload"
        assert [(r.op, r.status) for r in flaky_proxy.records] == [("GetObject", 200)]
        with open(paths[0], "wb") as f:
            f.write(b"garbage")
        assert st.get_small("m", max_age=0)[0] == b"payload"


def test_cache_is_size_bounded(tmp_path):
    cache = MetadataCache(str(tmp_path), max_bytes=40_000)
    for i in range(10):
        assert cache.store("ep", "bkt", f"k{i}", bytes(8000), etag=f"e{i}")
        time.sleep(0.01)  # distinct mtimes for LRU order
    assert cache.total_bytes() <= 40_000
    assert cache.load("ep", "bkt", "k9") is not None
    assert cache.load("ep", "bkt", "k0") is None  # least recently used went first
    assert not cache.store("ep", "bkt", "huge", bytes(20_000), etag="e")  # > max/4: not cached
    assert cache.load("ep", "bkt", "k9", etag="other") is None  # ETag-keyed lookup


def test_unwritable_cache_dir_is_not_fatal(s3_env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with make_store(s3_env, cache_dir=str(blocker / "sub")) as st:
        st.set("m", b"x")
        assert st.get_small("m")[0] == b"x"
        assert st.get_small("m")[0] == b"x"


# --------------------------------------------------------------------------------------------
# error translation against the server
# --------------------------------------------------------------------------------------------
def test_missing_bucket(s3_env):
    with S3Store(s3_env.bucket + "-nope", "ds") as st:  # region discovery hits it first
        with pytest.raises(NotFound) as ei:
            st.get("manifest.json")
        msg = one_line(ei.value)
        assert f"s3://{s3_env.bucket}-nope" in msg and "bucket does not exist" in msg
    with make_store(s3_env) as st0:
        st = S3Store(s3_env.bucket + "-nope", "ds", region="us-east-1")
        for call in (lambda: st.get("k"), lambda: list(st.list_prefix()), lambda: st.head("k")):
            with pytest.raises(NotFound) as ei:
                call()
            assert "bucket does not exist" in one_line(ei.value)
        st0.close()


def test_missing_key(s3_env):
    with make_store(s3_env) as st:
        for call in (lambda: st.get("nope.bin"), lambda: st.head("nope.bin"),
                     lambda: st.get_small("nope.bin"), lambda: st.open_read("nope.bin")):
            with pytest.raises(NotFound) as ei:
                call()
            msg = one_line(ei.value)
            assert f"s3://{s3_env.bucket}/ds/nope.bin" in msg and "no such object" in msg


def test_endpoint_unreachable(s3_env):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t0 = time.monotonic()
    with S3Store(s3_env.bucket, "ds", region="us-east-1", max_attempts=1, connect_timeout=0.5,
                 read_timeout=0.5, endpoint_url=f"http://127.0.0.1:{port}") as st:
        with pytest.raises(StoreError) as ei:
            st.get("k")
    msg = one_line(ei.value)
    assert f"127.0.0.1:{port}" in msg and "AWS_ENDPOINT_URL" in msg and s3_env.bucket in msg
    # no hang: one attempt with 0.5 s timeouts (botocore's defaults, 60 s timeouts and retries
    # with backoff, would take far longer); generous, as a loaded 2-core machine is slow
    assert time.monotonic() - t0 < 20


def test_no_credentials(s3_env, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with make_store(s3_env, max_attempts=1) as st:
        with pytest.raises(StoreError) as ei:
            st.get("manifest.json")
    msg = one_line(ei.value)
    assert "no AWS credentials found" in msg and s3_env.bucket in msg
    assert "AWS_PROFILE" in msg


def test_pickle_roundtrip(s3_env):
    with make_store(s3_env) as st:
        st.set("k", b"v")
        clone = pickle.loads(pickle.dumps(st))
    with clone:
        assert clone.get("k") == b"v"


def test_proxy_counts_and_control_endpoint(s3_env, flaky_proxy):
    import json
    import urllib.request

    with make_store(s3_env) as st:
        st.set("k", b"12345")
        st.get("k", (1, 3))
    stats = flaky_proxy.stats
    assert stats["requests"] == 2 and stats["by_method"] == {"PUT": 1, "GET": 1}
    assert stats["bytes_in"] >= 5 and stats["bytes_out"] == 2
    with urllib.request.urlopen(flaky_proxy.endpoint + "/__proxy__/stats") as resp:
        assert json.load(resp)["requests"] == 2
    req = urllib.request.Request(flaky_proxy.endpoint + "/__proxy__/reset", method="POST")
    urllib.request.urlopen(req).read()
    assert flaky_proxy.stats["requests"] == 0
