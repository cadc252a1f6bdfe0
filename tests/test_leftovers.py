"""Nothing bams3 does deletes what it did not write, and two writers never destroy each other.

Local directories and the moto S3 endpoint: user files next to (or instead of) a dataset
survive, a non-dataset destination is refused, only dead runs' objects and uploads are
removed (by a conversion's sweep or `bams3 cleanup`), and of two concurrent conversions
exactly one commits while the other fails in one line and leaves nothing behind.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time

import pytest

from conftest_data import run_cli

DEAD = "0123456789abcdef"
LIVE = "fedcba9876543210"


@pytest.fixture(scope="module")
def small_bam(tmp_path_factory):
    from bams3.sample import make_sample

    d = tmp_path_factory.mktemp("leftovers")
    return make_sample(d, n_pairs=2000, seed=3)


def _one_line(r, *needles) -> str:
    err = r.stderr.decode()
    assert r.returncode == 1, (r.returncode, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _write(root, rel, data=b"x", age=0.0):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    if age:
        t = time.time() - age
        os.utime(p, (t, t))
    return p


def _files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


# ---------------------------------------------------------------------------------------------
# the key layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,kind,run", [
    ("manifest.json", "manifest", None),
    (f"data/{DEAD}/header.sam", "object", DEAD),
    (f"data/{DEAD}/index/0.b3i", "object", DEAD),
    (f"data/{DEAD}/index/17.b3i", "object", DEAD),
    (f"data/{DEAD}/index/unplaced.b3i", "object", DEAD),
    (f"data/{DEAD}/chunks/000000.b3c", "object", DEAD),
    (f"data/{DEAD}/chunks/1234567.b3c", "object", DEAD),
    (f"_tmp/{DEAD}/run-000003", "object", DEAD),
    (f"runs/{DEAD}.json", "lease", DEAD),
    (f"data/{DEAD}/chunks/.tmp-ab_d3f9z", "temp", DEAD),
    (".tmp-abcdefgh", "temp", None),
    (".manifest.json.lock", "lock", None),
    (f"snapshots/{DEAD}.json", "snapshot", DEAD),
    ("snapshots/.tmp-abcdefgh", "temp", None),
])
def test_layout_names_what_bams3_writes(key, kind, run):
    from bams3core.layout import classify

    c = classify(key)
    assert c is not None and (c.kind, c.run_id) == (kind, run)


@pytest.mark.parametrize("key", [
    "data/mystudy/results.csv", "_tmp/s.txt", f"data/{DEAD}/chunks/notes.txt", f"data/{DEAD}/chunks/0.b3c",
    f"data/{DEAD.upper()}/header.sam", f"data/{DEAD}x/header.sam", f"data/{DEAD}/index/01.b3i",
    f"_tmp/{DEAD}/run-0", f"runs/{DEAD}.json.bak", "runs/other.json", f"sub/data/{DEAD}/header.sam",
    "manifest.json.bak", ".tmp-abc", "README.md",
])
def test_layout_rejects_everything_else(key):
    from bams3core.layout import classify, upload_run

    assert classify(key) is None and upload_run(key) is None


# ---------------------------------------------------------------------------------------------
# compare-and-swap of the manifest
# ---------------------------------------------------------------------------------------------
def _check_swap(st, big: bytes) -> None:
    from bams3.errors import PreconditionFailed

    st.set("manifest.json", b'{"v": 1}', if_none_match=True)
    data, info = st.get_with_info("manifest.json")
    st.set("manifest.json", b'{"v": 2}', if_match=info.etag)  # still the version read: replaced
    with pytest.raises(PreconditionFailed):
        st.set("manifest.json", b'{"v": 3}', if_match=info.etag)  # no longer the version read
    assert st.get("manifest.json") == b'{"v": 2}'
    _, info2 = st.get_with_info("manifest.json")
    st.set("manifest.json", big, if_match=info2.etag)  # beyond the part size: still one request
    assert st.get("manifest.json") == big
    with pytest.raises(PreconditionFailed):
        st.set("gone.json", b"{}", if_match=info2.etag)  # nothing there to replace
    assert not st.exists("gone.json")


def test_local_compare_and_swap(tmp_path):
    from bams3.store import LocalStore

    st = LocalStore(str(tmp_path / "ds"))
    _check_swap(st, b"{" + b" " * 100 + b"}")
    assert sorted(os.listdir(tmp_path / "ds")) == [".manifest.json.lock", "manifest.json"]


def test_s3_compare_and_swap_sends_if_match(s3_env, flaky_proxy):
    """moto 5.2.5 enforces If-Match on PutObject (412), as S3 does: the test relies on it."""
    from bams3.store import open_store

    with open_store(s3_env.uri("ds"), part_size=5 << 20, use_cache=False) as st:
        _check_swap(st, b"{" + b" " * (6 << 20) + b"}")
    ops = [r.op for r in flaky_proxy.records]
    assert ops.count("PutObject") == 5 and "CreateMultipartUpload" not in ops, ops


# ---------------------------------------------------------------------------------------------
# local directories
# ---------------------------------------------------------------------------------------------
def test_user_files_survive_and_non_dataset_dir_is_refused(small_bam, tmp_path):
    """The issue's repro: files older than an hour under DEST/data/ and DEST/_tmp/ are the
    user's, not leftovers: the conversion is refused (one line, rc 1) and they survive."""
    v = tmp_path / "V"
    mine = [_write(v, "data/mystudy/results.csv", b"x\n", 7200), _write(v, "_tmp/s.txt", b"y\n", 7200)]
    r = run_cli("convert", "-q", small_bam["bam"], v, check=False)
    _one_line(r, "not a bams3 dataset", "empty")
    assert [p.read_bytes() for p in mine] == [b"x\n", b"y\n"]
    assert _files(v) == {"data/mystudy/results.csv", "_tmp/s.txt"}
    # next to an existing dataset, --overwrite leaves them alone too
    ds = tmp_path / "ds"
    run_cli("convert", "-q", small_bam["bam"], ds)
    theirs = [_write(ds, "data/mystudy/results.csv", b"x\n", 7200), _write(ds, "_tmp/s.txt", b"y\n", 7200),
              _write(ds, f"data/{DEAD}/notes.txt", b"z\n", 7200)]
    run_cli("convert", "-q", "--overwrite", small_bam["bam"], ds)
    assert all(p.exists() for p in theirs)
    run_cli("cleanup", ds)
    assert all(p.exists() for p in theirs)
    assert run_cli("verify", ds).returncode == 0


def test_existing_dataset_message_hints_overwrite_locally(small_bam, tmp_path):
    """Two conversions racing to create the same local dataset: the one that loses the
    conditional manifest write says "--overwrite" (like S3) in one line and leaves nothing."""
    from bams3.dataset import DatasetWriter

    ds = tmp_path / "ds"
    codes, errs = _race(small_bam, [str(ds)], [str(ds)], DatasetWriter.commit)
    assert sorted(codes) == [0, 1], (codes, errs)
    assert len(errs) == 1 and "--overwrite" in errs[0] and "already exists" in errs[0], errs
    _only_committed_run(_files(ds))


def test_dead_run_leftovers_are_removed_by_the_next_conversion(small_bam, tmp_path):
    ds = tmp_path / "ds"
    other = "00000000000000aa"
    dead = [_write(ds, f"data/{DEAD}/chunks/000000.b3c", age=7200), _write(ds, f"_tmp/{DEAD}/run-000000", age=7200),
            _write(ds, f"data/{DEAD}/chunks/.tmp-abcdefgh", age=7200),
            # a run whose lease stopped being refreshed 20 minutes ago: dead, however young its objects
            _write(ds, f"runs/{other}.json", b"{}", age=1200), _write(ds, f"data/{other}/chunks/000000.b3c")]
    run_cli("convert", "-q", small_bam["bam"], ds)
    assert [p for p in dead if p.exists()] == []
    _only_committed_run(_files(ds))
    assert run_cli("verify", ds).returncode == 0


def test_live_run_survives_a_second_conversion_and_cleanup(small_bam, tmp_path):
    """A run with a fresh lease keeps its objects, however old (a long conversion's first
    chunk); a run whose lease is stale loses them, to the next conversion or to cleanup."""
    ds = tmp_path / "ds"
    run_cli("convert", "-q", small_bam["bam"], ds)
    live = [_write(ds, f"runs/{LIVE}.json", b"{}"), _write(ds, f"data/{LIVE}/chunks/000000.b3c", age=7200),
            _write(ds, f"_tmp/{LIVE}/run-000000", age=7200)]
    run_cli("convert", "-q", "--overwrite", small_bam["bam"], ds)
    assert all(p.exists() for p in live)
    dead = [_write(ds, f"runs/{DEAD}.json", b"{}", age=1200), _write(ds, f"data/{DEAD}/chunks/000000.b3c"),
            _write(ds, f"data/{DEAD}/index/0.b3i")]
    r = run_cli("cleanup", "--dry-run", ds)
    listed = set(r.stdout.decode().split())
    assert listed == {str(p) for p in dead}, listed
    assert all(p.exists() for p in dead + live)
    assert b"would remove 3 objects" in r.stderr
    r = run_cli("cleanup", ds)
    assert set(r.stdout.decode().split()) == listed
    assert [p for p in dead if p.exists()] == [] and all(p.exists() for p in live)
    assert run_cli("verify", ds).returncode == 0
    r = run_cli("cleanup", ds)  # nothing left to do
    assert r.stdout == b"" and b"removed 0 objects" in r.stderr


def test_cleanup_of_a_missing_directory_is_one_line(tmp_path):
    _one_line(run_cli("cleanup", tmp_path / "nope", check=False), "no such directory")


def test_a_run_keeps_its_lease_fresh_and_will_not_commit_without_it(small_bam, tmp_path, monkeypatch):
    """The lease is refreshed while the run lives; a run whose lease lapsed (so that others
    may have removed its objects) refuses to commit and removes what it wrote."""
    from bams3.convert import ConvertOptions, convert
    from bams3.errors import DatasetError
    from bams3.store import LocalStore
    from bams3core import layout

    monkeypatch.setattr(layout, "LEASE_TTL", 2.0)  # a refresh every 0.1 s
    ds = tmp_path / "ds"
    beats = []

    def commit(writer, results):
        lease = ds / "runs" / f"{writer.run_id}.json"
        first = json.loads(lease.read_text())["heartbeat"]
        time.sleep(0.5)
        beats.append(json.loads(lease.read_text())["heartbeat"] - first)
        writer.lease.stop()
        writer.lease.last_beat -= 1.5  # as if the last refresh were 1.5 s (> TTL / 2) ago
        return writer.commit()

    with pytest.raises(DatasetError, match="lease"):
        convert(str(small_bam["bam"]), LocalStore(str(ds)), ConvertOptions(), commit=commit)
    assert beats and beats[0] > 0
    assert _files(ds) == set()


def _only_committed_run(files: set[str]) -> None:
    """Only committed runs' objects (the current one and, after an overwrite, the snapshot it
    replaced: FORMAT.md §2.6), their snapshot manifests, the manifest and its lock are left."""
    assert "manifest.json" in files, files
    runs = {f.split("/")[1] for f in files if f.startswith("data/")}
    snaps = {f.split("/")[1][:-len(".json")] for f in files if f.startswith("snapshots/")}
    assert runs == snaps and 1 <= len(runs) <= 2, files
    assert {f for f in files if not f.startswith(("data/", "snapshots/"))} <= {"manifest.json",
                                                                              ".manifest.json.lock"}, files


# ---------------------------------------------------------------------------------------------
# two writers at once
# ---------------------------------------------------------------------------------------------
def _race(small_bam, args_a, args_b, real_commit):
    """Run two `bams3 convert` (in threads of this process) that both reach their commit
    before either commits; returns their exit codes and their stderr lines."""
    from bams3 import cli
    from bams3.dataset import DatasetWriter

    barrier = threading.Barrier(2, timeout=60)

    def commit(self):
        barrier.wait()
        return real_commit(self)

    codes = [None, None]

    def run(i, extra):
        codes[i] = cli.main(["convert", "-q", str(small_bam["bam"]), *extra])

    orig = DatasetWriter.commit
    DatasetWriter.commit = commit
    try:
        threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate((args_a, args_b))]
        with _ThreadStderr() as buf:
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
    finally:
        DatasetWriter.commit = orig
    return codes, [line for line in buf.getvalue().splitlines() if line.strip()]


class _ThreadStderr:
    """Collect what every thread writes to sys.stderr."""

    def __enter__(self):
        import io
        import sys

        self._old, self._buf = sys.stderr, io.StringIO()
        sys.stderr = self._buf
        return self

    def __exit__(self, *exc):
        import sys

        sys.stderr = self._old

    def getvalue(self) -> str:
        return self._buf.getvalue()


def test_two_concurrent_overwrites_local(small_bam, tmp_path):
    from bams3.dataset import DatasetWriter

    ds = tmp_path / "ds"
    run_cli("convert", "-q", small_bam["bam"], ds)
    first = json.loads((ds / "manifest.json").read_text())["run_id"]  # kept as the previous snapshot
    codes, errs = _race(small_bam, ["--overwrite", str(ds)], ["--overwrite", str(ds)], DatasetWriter.commit)
    assert sorted(codes) == [0, 1], (codes, errs)
    assert len(errs) == 1 and "another conversion replaced the dataset" in errs[0], errs
    files = _files(ds)
    _only_committed_run(files)
    winner = json.loads((ds / "manifest.json").read_text())["run_id"]
    assert all(winner in f or first in f for f in files if f.startswith(("data/", "snapshots/")))
    assert run_cli("verify", ds).returncode == 0


# ---------------------------------------------------------------------------------------------
# S3 (moto)
# ---------------------------------------------------------------------------------------------
def _env(s3_env):
    return {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                       "AWS_DEFAULT_REGION", "BAMS3_CACHE_DIR") if k in os.environ}


def _age_s3(bucket: str, key: str, seconds: float) -> None:
    """Make an object look ``seconds`` older (the moto server runs in this process)."""
    from moto.s3.models import s3_backends

    for regions in s3_backends.values():
        for backend in regions.values():
            if bucket in backend.buckets:
                obj = backend.buckets[bucket].keys[key]
                obj.last_modified = obj.last_modified - datetime.timedelta(seconds=seconds)
                return
    raise AssertionError(f"no moto bucket {bucket}")


def _keys(c, bucket, prefix=""):
    return sorted(o["Key"] for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                  for o in page.get("Contents", []))


def _uploads(c, bucket):
    return sorted(u["Key"] for u in c.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def test_bucket_root_user_objects_and_uploads_survive(small_bam, s3_env):
    """DEST = the bucket root: user objects under data/ and _tmp/ make it a non-dataset
    prefix (refused, untouched); next to a dataset at the root, --overwrite aborts only the
    uploads of dead bams3 runs, never unrelated ones elsewhere in the bucket."""
    env = _env(s3_env)
    c = s3_env.client()
    b = s3_env.bucket
    for k in ("data/mystudy/results.csv", "_tmp/s.txt"):
        c.put_object(Bucket=b, Key=k, Body=b"x")
        _age_s3(b, k, 7200)
    r = run_cli("convert", "-q", small_bam["bam"], f"s3://{b}", env=env, check=False)
    _one_line(r, "not a bams3 dataset", f"s3://{b}")
    assert _keys(c, b) == ["_tmp/s.txt", "data/mystudy/results.csv"]

    root = f"root-{b}"[:63]
    c.create_bucket(Bucket=root)
    run_cli("convert", "-q", small_bam["bam"], f"s3://{root}", env=env)
    for k in ("elsewhere/big.bin", "data/mystudy/big.bin", f"{DEAD}/chunks/000000.b3c",
              f"data/{DEAD}/chunks/000001.b3c"):
        c.create_multipart_upload(Bucket=root, Key=k)
    c.put_object(Bucket=root, Key="data/mystudy/results.csv", Body=b"x")
    _age_s3(root, "data/mystudy/results.csv", 7200)
    run_cli("convert", "-q", "--overwrite", small_bam["bam"], f"s3://{root}", env=env)
    # moto reports every upload as initiated in 2010: the dead run's is aborted, the rest kept
    assert _uploads(c, root) == sorted(["elsewhere/big.bin", "data/mystudy/big.bin", f"{DEAD}/chunks/000000.b3c"])
    assert "data/mystudy/results.csv" in _keys(c, root)
    assert run_cli("verify", f"s3://{root}", env=env).returncode == 0


def test_s3_live_run_kept_dead_run_removed(small_bam, s3_env):
    env = _env(s3_env)
    c = s3_env.client()
    b = s3_env.bucket
    uri = s3_env.uri("ds")
    # only a dead run's leftovers: the conversion goes ahead and removes them
    for k in (f"ds/data/{DEAD}/chunks/000000.b3c", f"ds/_tmp/{DEAD}/run-000000"):
        c.put_object(Bucket=b, Key=k, Body=b"x")
        _age_s3(b, k, 7200)
    run_cli("convert", "-q", small_bam["bam"], uri, env=env)
    assert not [k for k in _keys(c, b, "ds/") if DEAD in k]
    # a live run (fresh lease, old objects) and a dead one (lease 20 minutes stale)
    live = [f"ds/runs/{LIVE}.json", f"ds/data/{LIVE}/chunks/000000.b3c"]
    dead = [f"ds/runs/{DEAD}.json", f"ds/data/{DEAD}/chunks/000000.b3c", f"ds/data/{DEAD}/header.sam"]
    for k in live + dead:
        c.put_object(Bucket=b, Key=k, Body=b"{}")
    _age_s3(b, live[1], 7200)
    _age_s3(b, dead[0], 1200)
    c.create_multipart_upload(Bucket=b, Key=f"ds/data/{DEAD}/chunks/000001.b3c")
    c.create_multipart_upload(Bucket=b, Key=f"ds/data/{LIVE}/chunks/000001.b3c")
    r = run_cli("cleanup", "--dry-run", uri, env=env)
    out = r.stdout.decode().split("\n")
    assert {line for line in out if line} == {f"s3://{b}/{k}" for k in dead} | {
        f"s3://{b}/ds/data/{DEAD}/chunks/000001.b3c (unfinished upload)"}
    assert set(live + dead) <= set(_keys(c, b, "ds/"))
    run_cli("convert", "-q", "--overwrite", small_bam["bam"], uri, env=env)  # the sweep
    keys = set(_keys(c, b, "ds/"))
    assert set(live) <= keys and not (set(dead) & keys)
    assert _uploads(c, b) == [f"ds/data/{LIVE}/chunks/000001.b3c"]
    r = run_cli("cleanup", uri, env=env)
    assert r.stdout == b"" and set(live) <= set(_keys(c, b, "ds/"))
    assert run_cli("verify", uri, env=env).returncode == 0


def test_two_concurrent_overwrites_s3(small_bam, s3_env):
    from bams3.dataset import DatasetWriter

    env = _env(s3_env)
    c = s3_env.client()
    uri = s3_env.uri("race")
    run_cli("convert", "-q", small_bam["bam"], uri, env=env)
    first = json.loads(c.get_object(Bucket=s3_env.bucket, Key="race/manifest.json")["Body"].read())["run_id"]
    codes, errs = _race(small_bam, ["--overwrite", uri], ["--overwrite", uri], DatasetWriter.commit)
    assert sorted(codes) == [0, 1], (codes, errs)
    assert len(errs) == 1 and "another conversion replaced the dataset" in errs[0], errs
    keys = _keys(c, s3_env.bucket, "race/")
    winner = json.loads(c.get_object(Bucket=s3_env.bucket, Key="race/manifest.json")["Body"].read())["run_id"]
    # the winner's run and the one it replaced (kept as the previous snapshot, FORMAT.md §2.6)
    kept = tuple(f"race/{d}{r}" for r in (winner, first) for d in ("data/", "snapshots/"))
    assert keys and all(k == "race/manifest.json" or k.startswith(kept) for k in keys), keys
    assert any(k.startswith(f"race/data/{winner}/") for k in keys)
    assert _uploads(c, s3_env.bucket) == []
    assert run_cli("verify", uri, env=env).returncode == 0


def test_sweep_of_a_prefix_found_empty_lists_only_uploads(tmp_path):
    """prepare() found the prefix empty before writing its lease: everything listed now is
    younger than that, so the sweep asks only for unfinished uploads (no listing of runs/,
    data/, _tmp/, snapshots/, no manifest read); an upload it finds sends it the usual way."""
    from bams3.runs import find_leftovers
    from bams3.store import LocalStore

    calls = []

    class Recording(LocalStore):
        def list_prefix(self, prefix=""):
            calls.append(("list", prefix))
            return super().list_prefix(prefix)

        def incomplete_uploads(self, prefix=""):
            calls.append(("uploads", prefix))
            return super().incomplete_uploads(prefix)

        def get(self, key, *a, **kw):
            calls.append(("get", key))
            return super().get(key, *a, **kw)

    root = tmp_path / "ds"
    _write(root, f"runs/{LIVE}.json", b"{}")  # a run that started after the listing
    store = Recording(str(root))
    assert not find_leftovers(store, own={DEAD}, empty_before=True)
    assert calls == [("uploads", "")]
    # a dead run's temporary file (an unfinished upload, locally): the full sweep judges it
    _write(root, f"data/{DEAD}/chunks/.tmp-ab_d3f9z", age=7200)
    calls.clear()
    plan = find_leftovers(store, empty_before=True)
    assert [u.key for u in plan.uploads] == [f"data/{DEAD}/chunks/.tmp-ab_d3f9z"]
    assert ("list", "runs/") in calls and ("get", "manifest.json") in calls


def test_s3_dead_upload_in_an_empty_prefix_is_aborted(small_bam, s3_env):
    """A prefix with no object but a dead run's unfinished upload (moto dates every upload
    2010): the conversion into it aborts that upload."""
    env = _env(s3_env)
    c = s3_env.client()
    b = s3_env.bucket
    c.create_multipart_upload(Bucket=b, Key=f"empty/data/{DEAD}/chunks/000001.b3c")
    run_cli("convert", "-q", small_bam["bam"], s3_env.uri("empty"), env=env)
    assert not [k for k in _uploads(c, b) if k.startswith("empty/")]
    assert run_cli("verify", s3_env.uri("empty"), env=env).returncode == 0
