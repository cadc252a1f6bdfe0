"""The Prefect flows (convert-to-s3, verify-dataset, storage-report) against a moto S3 server.

Flows run in-process under ONE ``prefect_test_harness`` (a temporary Prefect server) for the
whole session; S3 is the moto HTTP server from conftest (``s3_env``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import pathlib
import statistics
import time

import pytest

pytest.importorskip("moto")
pytest.importorskip("prefect")

from bams3.cli import main as bams3_main  # noqa: E402
from bams3.dataset import Dataset, DatasetWriter  # noqa: E402
from bams3.errors import DatasetError, InputError, NotFound, PreconditionFailed, StoreError  # noqa: E402
from bams3.store import open_store  # noqa: E402
from bams3core import cost  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CHUNK = "64K"  # small chunks: several chunk objects from a small BAM
SECRET_KEY_ID = "AKIDBAMS3TESTONLY0001"
SECRET = "bams3-test-secret-do-not-log-Zq9x"


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server (SQLite in tmp) for every flow test in the session."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings(updates={PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=60):
            yield


def _make_bam_with_pysam(outdir: pathlib.Path) -> str:
    """A small coordinate-sorted, indexed BAM (fallback if bams3.sample is unavailable)."""
    import random

    import pysam

    path = str(outdir / "sample.bam")
    header = {"HD": {"VN": "1.6", "SO": "coordinate"},
              "SQ": [{"SN": "chr1", "LN": 200_000}, {"SN": "chr2", "LN": 100_000}]}
    rnd = random.Random(7)
    recs = []
    for i in range(4000):
        ref = 0 if i < 2600 else 1
        recs.append((ref, rnd.randrange(0, 90_000 if ref else 190_000), i))
    recs.sort()
    with pysam.AlignmentFile(path, "wb", header=header) as out:
        for ref, pos, i in recs:
            a = pysam.AlignedSegment()
            a.query_name = f"read{i:05d}"
            a.query_sequence = "".join(rnd.choice("ACGT") for _ in range(100))
            a.flag = 0 if i % 3 else 16
            a.reference_id = ref
            a.reference_start = pos
            a.mapping_quality = 60
            a.cigarstring = "100M"
            a.query_qualities = pysam.qualitystring_to_array("I" * 100)
            a.set_tag("NM", i % 4)
            out.write(a)
    pysam.index(path)
    return path


@pytest.fixture(scope="session")
def sample_bam(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("sample")
    try:
        from bams3.sample import make_sample

        return make_sample(out, 2000, 7)["bam"]
    except Exception:  # noqa: BLE001 - bams3.sample may still be in progress
        return _make_bam_with_pysam(out)


@pytest.fixture
def fast_retries(monkeypatch):
    """Retry the flows' I/O tasks after ~0 s instead of 2, 4, 8... s."""
    from tasks import pipeline, storage

    for t in (pipeline.shard, pipeline.verify_shard, pipeline.verify, pipeline.commit, storage.inventory,
              storage.profile,
              storage.find_datasets, storage.lifecycle):
        monkeypatch.setattr(t, "retry_delay_seconds", [0.01] * max(1, t.retries))


@pytest.fixture
def creds_block(prefect_harness):
    """A prefect-aws AwsCredentials block with recognisable fake keys (moto accepts any)."""
    from prefect_aws import AwsCredentials

    AwsCredentials(aws_access_key_id=SECRET_KEY_ID, aws_secret_access_key=SECRET,
                   region_name="us-east-1").save("bams3-test-creds", overwrite=True)
    return "bams3-test-creds"


def cli(*args: str) -> int:
    return bams3_main([str(a) for a in args])


def manifest_of(uri: str):
    with open_store(uri, use_cache=False) as st:
        return Dataset.open(st, refresh=True).manifest


def query_text(uri: str, tmp_path, *regions: str) -> bytes:
    out = tmp_path / f"q-{hashlib.sha1((uri + '|'.join(regions)).encode()).hexdigest()[:10]}.sam"
    assert cli("query", "--no-cache", uri, *regions, "-o", out) == 0
    return out.read_bytes()


def flow_run_id(state):
    return state.state_details.flow_run_id


def task_runs(run_id, *, name: str | None = None, want=None, timeout: float = 15.0):
    """Task runs of a flow run (task run states are recorded asynchronously: poll)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.time() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        if name is not None:
            runs = [r for r in runs if r.name == name]
        if want is None or want(runs) or time.time() > deadline:
            return runs
        time.sleep(0.25)


def artifacts(run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))


def run_logs(run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return "\n".join(l.message for l in logs)


# ---------------------------------------------------------------------------------------------
# pure parts: retry classification, cost model, lifecycle rules
# ---------------------------------------------------------------------------------------------
def test_retry_only_transient_errors():
    from tasks.retry import is_transient

    assert is_transient(StoreError("s3://b/k: S3 server error (InternalError); retry later"))
    assert is_transient(ConnectionResetError("reset"))
    assert is_transient(TimeoutError())
    for exc in (InputError("bad BAM"), DatasetError("corrupt"), NotFound("missing"),
                PreconditionFailed("exists"), ValueError("bug"), KeyError("bug"), None):
        assert not is_transient(exc), exc


def test_tasks_configuration():
    from prefect.cache_policies import NONE

    from tasks import commit, plan, retry_on_transient, shard, verify, verify_shard

    assert {"bams3-s3-upload", "bams3-encode"} <= set(shard.tags) and "bams3-s3-read" in verify_shard.tags
    for t in (plan, shard, verify_shard, verify, commit):
        assert type(t.cache_policy) is type(NONE) and t.persist_result is False
    for t in (shard, verify_shard, verify, commit):
        assert t.retries >= 3 and t.retry_condition_fn is retry_on_transient and t.retry_jitter_factor
        d = t.retry_delay_seconds
        assert all(b == 2 * a for a, b in zip(d, d[1:])), d  # exponential


def test_bams3core_cost_is_pure():
    tree = ast.parse((REPO / "bams3core" / "cost.py").read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not mods & {"boto3", "botocore", "prefect", "prefect_aws", "bams3"}, mods


def test_cost_model_by_hand():
    gb = 2 ** 30
    r = cost.monthly_storage_cost([(gb, "STANDARD"), (2 * gb, None), (1000, "STANDARD_IA"), (gb, "GLACIER_IR"),
                                   (gb, "DEEP_ARCHIVE")])
    assert r["objects"] == 5 and r["bytes"] == 5 * gb + 1000
    bc = r["by_class"]
    assert bc["STANDARD_IA"]["billable_bytes"] == 128 * 1024  # minimum billable object size
    assert bc["STANDARD_IA"]["usd"] == pytest.approx(128 * 1024 / gb * 0.0125)
    assert bc["DEEP_ARCHIVE"]["billable_bytes"] == gb + 32 * 1024
    assert bc["STANDARD"]["billable_bytes"] == 3 * gb + 8 * 1024  # archive overhead at STANDARD rate
    expected = ((3 * gb + 8192) * 0.023 + 131072 * 0.0125 + gb * 0.004 + (gb + 32768) * 0.00099) / gb
    assert r["usd"] == pytest.approx(expected)
    q = cost.read_cost(1000, gb, "STANDARD_IA", egress="internet")
    assert q["usd"] == pytest.approx(0.001 + 0.01 + 0.09)
    assert cost.read_cost(5, gb, "STANDARD", egress="same-region")["usd"] == pytest.approx(5 * 0.0004 / 1000)
    assert cost.read_cost(1, 1, "GLACIER") is None and cost.read_cost(1, 1, "DEEP_ARCHIVE") is None
    io = cost.region_query_io([10, 30, 20], manifest_bytes=500, index_bytes=[100, 300])
    assert io["warm"] == {"requests": 1, "bytes": 20} and io["cold"] == {"requests": 3, "bytes": 20 + 500 + 200}
    assert cost.transition_cost(2000, "GLACIER_IR") == pytest.approx(0.04)


def test_lifecycle_rules_and_merge():
    rules = cost.lifecycle_plan("proj", ia_days=30, glacier_ir_days=120, tmp_expire_days=3, abort_multipart_days=7)
    chunks, tmp, mpu = rules
    assert chunks["Filter"] == {"And": {"Prefix": "proj/", "Tags": [{"Key": "bams3-object", "Value": "chunk"}]}}
    assert chunks["Transitions"] == [{"Days": 30, "StorageClass": "STANDARD_IA"},
                                     {"Days": 120, "StorageClass": "GLACIER_IR"}]
    assert tmp["Filter"]["And"]["Tags"] == [{"Key": "bams3-object", "Value": "tmp"}] and tmp["Expiration"] == {"Days": 3}
    assert mpu["Filter"] == {"Prefix": "proj/"} and mpu["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 7}
    whole = cost.lifecycle_plan("", ia_days=None, glacier_ir_days=1, tmp_expire_days=None, abort_multipart_days=None)
    assert whole[0]["Filter"] == {"Tag": {"Key": "bams3-object", "Value": "chunk"}}
    with pytest.raises(ValueError):
        cost.lifecycle_plan("p", ia_days=10)  # S3: >= 30 days before STANDARD_IA
    with pytest.raises(ValueError):
        cost.lifecycle_plan("p", ia_days=30, glacier_ir_days=45)  # 30 days in IA first
    with pytest.raises(ValueError):
        cost.lifecycle_plan("p", abort_multipart_days=0)
    other = {"ID": "someone-elses", "Status": "Enabled", "Filter": {"Prefix": "logs/"}, "Expiration": {"Days": 9}}
    # a per-dataset rule of an older bams3 under the prefix is superseded; one elsewhere is kept
    old = {"ID": "bams3:chunks:proj/ds1", "Status": "Enabled", "Filter": {"Prefix": "proj/ds1/data/OLDRUN/chunks/"},
           "Transitions": [{"Days": 30, "StorageClass": "STANDARD_IA"}]}
    elsewhere = dict(old, ID="bams3:chunks:projX/ds", Filter={"Prefix": "projX/ds/data/R/chunks/"})
    merged = cost.merge_lifecycle_rules([other, old, elsewhere], rules, replace_under="proj")
    assert [r["ID"] for r in merged] == ["someone-elses", "bams3:chunks:projX/ds", chunks["ID"], tmp["ID"], mpu["ID"]]
    assert merged[0] == other
    assert cost.merge_lifecycle_rules(merged, rules, replace_under="proj") == merged  # idempotent
    ch = cost.lifecycle_changes([other, old, elsewhere], merged)
    assert ch["removed"] == [old["ID"]] and ch["added"] == [chunks["ID"], tmp["ID"], mpu["ID"]]
    assert ch["unchanged"] == ["someone-elses", "bams3:chunks:projX/ds"] and ch["replaced"] == []


# ---------------------------------------------------------------------------------------------
# convert-to-s3
# ---------------------------------------------------------------------------------------------
def test_convert_to_s3_matches_cli(prefect_harness, s3_env, sample_bam, creds_block, tmp_path, capsys):
    from flows import convert_to_s3

    cli_uri, flow_uri = s3_env.uri("cli"), s3_env.uri("flow")
    assert cli("convert", "-q", "--chunk-size", CHUNK, sample_bam, cli_uri) == 0
    state = convert_to_s3(source=sample_bam, destination=flow_uri, chunk_size=CHUNK,
                          aws_credentials_block=creds_block, return_state=True)
    assert state.is_completed(), state
    summary = state.result()

    a, b = manifest_of(cli_uri), manifest_of(flow_uri)
    assert len(a.chunks) >= 3
    assert [c.sha256 for c in b.chunks] == [c.sha256 for c in a.chunks]
    assert [(c.size, c.n_blocks, c.n_records) for c in b.chunks] == [(c.size, c.n_blocks, c.n_records) for c in a.chunks]
    assert [i.sha256 for i in b.index] == [i.sha256 for i in a.index]
    assert b.header.sha256 == a.header.sha256
    assert (b.n_records, b.stats, b.references, b.sorted_by, b.source, b.block_bytes, b.chunk_bytes) == \
           (a.n_records, a.stats, a.references, a.sorted_by, a.source, a.block_bytes, a.chunk_bytes)
    # the same record stream from `bams3 query`, whole and by region
    assert query_text(flow_uri, tmp_path) == query_text(cli_uri, tmp_path)
    assert len(query_text(flow_uri, tmp_path)) > 0
    region = f"{a.references[0]['name']}:20000-60000"
    assert query_text(flow_uri, tmp_path, region) == query_text(cli_uri, tmp_path, region)
    assert cli("verify", flow_uri) == 0
    stats = []
    for uri in (cli_uri, flow_uri):
        capsys.readouterr()
        assert cli("stats", "--json", "--no-cache", uri) == 0
        stats.append({k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "dataset"})
    assert stats[0] == stats[1] and stats[0]["records"] == a.n_records

    assert summary["records"] == b.n_records and summary["chunks"] == len(b.chunks)
    assert summary["input_bytes"] == os.path.getsize(sample_bam) and summary["ratio"] > 0

    run_id = flow_run_id(state)
    arts = {x.key: x for x in artifacts(run_id)}
    md = next(x for x in arts.values() if x.type == "markdown")
    assert f"{b.n_records:,}" in md.data and "Size / input" in md.data
    prog = next(x for x in arts.values() if x.type == "progress")
    assert float(prog.data) == pytest.approx(100.0)
    # the credentials block's secrets appear nowhere: not in artifacts, parameters or logs
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        params = json.dumps(client.read_flow_run(run_id).parameters)
    text = params + "\n".join(str(x.data) for x in arts.values()) + run_logs(run_id)
    assert creds_block in params
    assert SECRET not in text and SECRET_KEY_ID not in text


def test_convert_from_s3_source(prefect_harness, s3_env, sample_bam, tmp_path):
    from flows import convert_to_s3

    s3_env.client().upload_file(sample_bam, s3_env.bucket, "inputs/sample.bam")
    src = f"s3://{s3_env.bucket}/inputs/sample.bam"
    local = tmp_path / "cli-local"
    assert cli("convert", "-q", "--chunk-size", CHUNK, sample_bam, local) == 0
    summary = convert_to_s3(source=src, destination=s3_env.uri("from-s3"), chunk_size=65536)
    a, b = manifest_of(str(local)), manifest_of(s3_env.uri("from-s3"))
    assert [c.sha256 for c in b.chunks] == [c.sha256 for c in a.chunks]
    assert b.source == src and summary["input_bytes"] == os.path.getsize(sample_bam)


def test_upload_retried_on_transient_store_error(prefect_harness, s3_env, sample_bam, fast_retries, monkeypatch):
    from bams3.store.s3 import S3Store
    from flows import convert_to_s3

    attempts: dict[str, int] = {}
    real_set = S3Store.set

    def flaky_set(self, key, data, **kw):
        if key.endswith("chunks/000001.b3c"):
            attempts[key] = attempts.get(key, 0) + 1
            if attempts[key] <= 2:
                raise StoreError(f"s3://{self.bucket}/{key}: S3 server error (InternalError) after 8 attempts; "
                                 "retry later")
        return real_set(self, key, data, **kw)

    uploads: dict[str, int] = {}

    def counting_set(self, key, data, **kw):
        if "/chunks/" in key:
            uploads[key] = uploads.get(key, 0) + 1
        return flaky_set(self, key, data, **kw)

    monkeypatch.setattr(S3Store, "set", counting_set)
    uri = s3_env.uri("retried")
    state = convert_to_s3(source=sample_bam, destination=uri, chunk_size=CHUNK, return_state=True)
    assert state.is_completed(), state
    assert list(attempts.values()) == [3]  # failed twice, succeeded on the third run of the task
    runs = task_runs(flow_run_id(state), name="shard-0000",
                     want=lambda rs: rs and rs[0].run_count == 3 and rs[0].state_type.value == "COMPLETED")
    assert len(runs) == 1 and runs[0].run_count == 3
    # the retries reused the chunk the failed attempts had uploaded (the ledger): chunk 0 once
    first = next(k for k in uploads if k.endswith("chunks/000000.b3c"))
    assert uploads[first] == 1 and len(uploads) >= 3
    monkeypatch.setattr(S3Store, "set", real_set)
    assert cli("verify", uri) == 0


def test_bad_input_fails_fast(prefect_harness, s3_env, tmp_path, sample_bam, fast_retries, monkeypatch):
    from flows import convert_to_s3

    junk = tmp_path / "junk.bam"
    junk.write_bytes(b"this is not a BAM file\n" * 10)
    t = time.time()
    with pytest.raises(InputError):
        convert_to_s3(source=str(junk), destination=s3_env.uri("junk"))
    with pytest.raises(InputError):
        convert_to_s3(source=str(tmp_path / "missing.bam"), destination=s3_env.uri("junk"))

    # a task failing with a permanent error runs once: no retries, and nothing is committed
    calls: dict[int, int] = {}

    def bad_upload(self, planned, stats):
        calls[planned.number] = calls.get(planned.number, 0) + 1
        raise InputError("refusing this chunk (test)")

    from bams3.stages import ShardSink

    monkeypatch.setattr(ShardSink, "upload", bad_upload)
    state = convert_to_s3(source=sample_bam, destination=s3_env.uri("bad"), chunk_size=CHUNK, return_state=True)
    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), InputError)
    assert calls and set(calls.values()) == {1}, calls
    assert time.time() - t < 30
    runs = task_runs(flow_run_id(state), want=lambda rs: any(r.name.startswith("shard-") and
                                                             r.state_type.value == "FAILED" for r in rs))
    ups = [r for r in runs if r.name.startswith("shard-") and r.state_type.value == "FAILED"]
    assert ups and all(r.run_count == 1 for r in ups)
    listing = s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix="bad/")
    assert listing.get("KeyCount", 0) == 0  # the failed run removed what it wrote


def _corrupt_after_upload(monkeypatch, number: int = 1):
    """Replace chunk ``number`` right after its upload by other bytes of the same size (a new
    ETag): what a read-back or a HEAD must catch, and what the upload alone cannot."""
    from bams3.stages import ShardSink

    real = ShardSink.upload

    def upload(self, planned, stats):
        ref = real(self, planned, stats)
        if planned.number == number:
            data = bytearray(self.store.get(ref.key))
            data[len(data) // 2] ^= 0xFF
            self.store.set(ref.key, bytes(data), kind="chunk")
        return ref

    monkeypatch.setattr(ShardSink, "upload", upload)


def test_verify_modes(prefect_harness, s3_env, sample_bam, fast_retries, monkeypatch, tmp_path):
    """``upload`` (the default) adds no task run and no read; ``head`` and ``read`` catch an object
    replaced after its upload (nothing committed); ``upload`` does not (docs/PREFECT.md says so),
    and ``bams3 verify`` finds it afterwards."""
    from flows import convert_to_s3

    state = convert_to_s3(source=sample_bam, destination=s3_env.uri("v-upload"), chunk_size=CHUNK,
                          return_state=True)
    assert state.is_completed(), state
    runs = task_runs(flow_run_id(state), want=lambda rs: any(r.name.startswith("commit") and
                                                             r.state_type.value == "COMPLETED" for r in rs))
    names = sorted(r.name.split("-")[0] for r in runs)
    assert names == ["commit", "plan", "shard"], names  # no verify-shard task run
    assert query_text(s3_env.uri("v-upload"), tmp_path).decode() == __import__("pysam").samtools.view(sample_bam)

    _corrupt_after_upload(monkeypatch)
    for mode in ("read", "head"):
        uri = s3_env.uri(f"v-{mode}")
        state = convert_to_s3(source=sample_bam, destination=uri, chunk_size=CHUNK, verify_mode=mode,
                              return_state=True)
        assert state.is_failed(), (mode, state)
        err = state.result(raise_on_failure=False)
        assert isinstance(err, DatasetError), (mode, err)
        assert ("SHA-256" if mode == "read" else "ETag") in str(err)
        listing = s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix=f"v-{mode}/")
        assert listing.get("KeyCount", 0) == 0  # a corrupt upload: nothing committed, nothing kept
    uri = s3_env.uri("v-blind")
    state = convert_to_s3(source=sample_bam, destination=uri, chunk_size=CHUNK, return_state=True)
    assert state.is_completed()  # the replacement came after the upload: beyond what it proves
    monkeypatch.undo()
    assert cli("verify", uri) != 0  # the verify-dataset check (full read) finds it


def test_upload_mode_checks_reused_chunks(prefect_harness, s3_env, sample_bam, fast_retries, monkeypatch):
    """A resumed run did not upload the chunks it reuses: ``upload`` mode checks them by HEAD
    against the ledger (size, ETag), and a replaced one stops the commit."""
    from bams3.store.s3 import S3Store
    from flows import convert_to_s3

    real_set = S3Store.set

    def failing_set(self, key, data, **kw):
        if key.endswith("chunks/000002.b3c"):
            raise StoreError(f"s3://{self.bucket}/{key}: S3 server error (InternalError); retry later")
        return real_set(self, key, data, **kw)

    monkeypatch.setattr(S3Store, "set", failing_set)
    uri = s3_env.uri("v-resume")
    state = convert_to_s3(source=sample_bam, destination=uri, chunk_size=CHUNK, return_state=True)
    assert state.is_failed()
    monkeypatch.setattr(S3Store, "set", real_set)
    c = s3_env.client()
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=s3_env.bucket, Prefix="v-resume/")["Contents"]]
    chunk0 = next(k for k in keys if k.endswith("chunks/000000.b3c"))  # kept for a resume
    body = bytearray(c.get_object(Bucket=s3_env.bucket, Key=chunk0)["Body"].read())
    body[100] ^= 0xFF
    c.put_object(Bucket=s3_env.bucket, Key=chunk0, Body=bytes(body))
    state = convert_to_s3(source=sample_bam, destination=uri, chunk_size=CHUNK, return_state=True)
    assert state.is_failed()
    err = state.result(raise_on_failure=False)
    assert isinstance(err, DatasetError) and "ETag" in str(err) and "000000.b3c" in str(err)
    with pytest.raises((NotFound, DatasetError)):
        manifest_of(uri)  # nothing committed


# ---------------------------------------------------------------------------------------------
# verify-dataset
# ---------------------------------------------------------------------------------------------
def test_verify_dataset_flags_corrupt_chunk(prefect_harness, s3_env, sample_bam, fast_retries):
    from flows import verify_dataset_flow

    good, bad = s3_env.uri("proj/good"), s3_env.uri("proj/bad")
    for uri in (good, bad):
        assert cli("convert", "-q", "--chunk-size", CHUNK, sample_bam, uri) == 0

    reports = verify_dataset_flow(dataset=good)
    assert [r["ok"] for r in reports] == [True] and reports[0]["records_checked"] == manifest_of(good).n_records
    n = len(manifest_of(good).chunks)
    sampled = verify_dataset_flow(dataset=good, sample_fraction=0.5, seed=1)
    assert sampled[0]["ok"] and sampled[0]["sampled"] and sampled[0]["chunks_checked"] == math.ceil(n / 2)

    # flip one byte of one chunk object
    m = manifest_of(bad)
    key = f"proj/bad/{m.chunks[1].key}"
    c = s3_env.client()
    data = bytearray(c.get_object(Bucket=s3_env.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    c.put_object(Bucket=s3_env.bucket, Key=key, Body=bytes(data))

    state = verify_dataset_flow(dataset=s3_env.uri("proj"), return_state=True)
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, DatasetError) and "1 of 2" in str(exc)
    md = next(a for a in artifacts(flow_run_id(state)) if a.type == "markdown").data
    assert "CORRUPT" in md and "proj/bad" in md and m.chunks[1].key in md
    assert md.count("| OK |") == 1


# ---------------------------------------------------------------------------------------------
# storage-report
# ---------------------------------------------------------------------------------------------
def test_storage_report_by_hand_and_lifecycle(prefect_harness, s3_env, sample_bam, fast_retries):
    from flows import storage_report

    uri = s3_env.uri("cohort/ds")
    assert cli("convert", "-q", "--chunk-size", CHUNK, sample_bam, uri) == 0
    c = s3_env.client()
    m = manifest_of(uri)
    ia_key = f"cohort/ds/{m.chunks[0].key}"  # one chunk already moved to STANDARD_IA
    c.copy_object(Bucket=s3_env.bucket, Key=ia_key, CopySource={"Bucket": s3_env.bucket, "Key": ia_key},
                  StorageClass="STANDARD_IA", MetadataDirective="COPY")
    keep = {"ID": "keep-me", "Status": "Enabled", "Filter": {"Prefix": "logs/"}, "Expiration": {"Days": 365}}
    c.put_bucket_lifecycle_configuration(Bucket=s3_env.bucket, LifecycleConfiguration={"Rules": [keep]})

    res = storage_report(dataset=uri)  # dry run by default
    assert [r["ID"] for r in c.get_bucket_lifecycle_configuration(Bucket=s3_env.bucket)["Rules"]] == ["keep-me"]
    assert res["lifecycle"]["applied"] is False

    # --- by hand: list objects, price them
    objs = c.list_objects_v2(Bucket=s3_env.bucket, Prefix="cohort/ds/")["Contents"]
    gb = 2 ** 30
    std = sum(o["Size"] for o in objs if o.get("StorageClass", "STANDARD") == "STANDARD")
    ia = [o["Size"] for o in objs if o.get("StorageClass") == "STANDARD_IA"]
    assert len(ia) == 1 and ia[0] < 128 * 1024
    monthly = std / gb * 0.023 + 128 * 1024 / gb * 0.0125
    (d,) = res["datasets"]
    assert d["objects"] == len(objs) and d["bytes"] == std + ia[0]
    assert d["monthly_usd"] == pytest.approx(monthly, rel=1e-12)
    assert res["total"]["monthly_usd"] == pytest.approx(monthly, rel=1e-12)
    assert d["by_class"]["STANDARD_IA"]["objects"] == 1

    with open_store(uri, use_cache=False) as st:
        ds = Dataset.open(st, refresh=True)
        lengths = [int(x) for x in ds.all_rows()["length"]]
    med = int(statistics.median(lengths))
    rq = d["region_query"]
    assert rq["median_block_bytes"] == med
    assert (rq["warm"]["requests"], rq["warm"]["bytes"]) == (1, med)
    assert rq["warm"]["usd"] == pytest.approx(0.0004 / 1000 + med / gb * 0.09, rel=1e-12)
    man_size = next(o["Size"] for o in objs if o["Key"].endswith("manifest.json"))
    idx_sizes = [i.size for i in m.index]
    page_sizes = [p[1] for i in m.index for p in i.pages]  # a small query reads one index page
    assert rq["cold"]["requests"] == 3
    assert rq["cold"]["bytes"] == med + man_size + int(statistics.median(page_sizes))
    # whole read: each (small) chunk in one ranged GET, plus manifest, header and index objects
    wr = d["whole_read"]
    assert wr["requests"] == len(m.chunks) + 2 + len(m.index)
    wbytes = sum(ch.size for ch in m.chunks) + man_size + m.header.size + sum(idx_sizes)
    assert wr["bytes"] == wbytes
    assert wr["usd"] == pytest.approx(wr["requests"] * 0.0004 / 1000 + wbytes / gb * 0.09, rel=1e-12)
    other = sum(o["Size"] for o in objs) - sum(ch.size for ch in m.chunks)
    proj = sum(max(ch.size, 131072) for ch in m.chunks) / gb * 0.0125 + other / gb * 0.023
    assert d["projected_monthly_usd"]["STANDARD_IA"] == pytest.approx(proj, rel=1e-12)

    # --- apply: our rules land on the bucket next to the existing one
    res = storage_report(dataset=uri, apply_lifecycle=True, transition_ia_days=30, transition_glacier_ir_days=90,
                         expire_tmp_days=3, abort_multipart_days=5)
    assert res["lifecycle"]["applied"]
    rules = {r["ID"]: r for r in c.get_bucket_lifecycle_configuration(Bucket=s3_env.bucket)["Rules"]}
    assert set(rules) == {"keep-me", "bams3:chunks:cohort/ds", "bams3:tmp:cohort/ds", "bams3:abort-multipart:cohort/ds"}
    ch = rules["bams3:chunks:cohort/ds"]
    assert ch["Filter"]["And"] == {"Prefix": "cohort/ds/", "Tags": [{"Key": "bams3-object", "Value": "chunk"}]}
    assert [(t["Days"], t["StorageClass"]) for t in ch["Transitions"]] == [(30, "STANDARD_IA"), (90, "GLACIER_IR")]
    assert rules["bams3:tmp:cohort/ds"]["Expiration"]["Days"] == 3
    assert rules["bams3:tmp:cohort/ds"]["Filter"]["And"]["Tags"] == [{"Key": "bams3-object", "Value": "tmp"}]
    assert rules["bams3:abort-multipart:cohort/ds"]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 5
    # the rules select the dataset's chunks (tagged at upload), never its metadata
    for k in [c.key for c in m.chunks] + ["manifest.json", m.header.key] + [i.key for i in m.index]:
        tags = {t["Key"]: t["Value"] for t in c.get_object_tagging(Bucket=s3_env.bucket, Key=f"cohort/ds/{k}")["TagSet"]}
        assert cost.rule_applies(ch, f"cohort/ds/{k}", tags) == k.startswith(f"data/{m.run_id}/chunks/"), k
    assert rules["keep-me"]["Expiration"]["Days"] == 365
    # again: same rules, replaced by ID, none added
    storage_report(dataset=uri, apply_lifecycle=True, expire_tmp_days=3, abort_multipart_days=5)
    assert len(c.get_bucket_lifecycle_configuration(Bucket=s3_env.bucket)["Rules"]) == 4

    with pytest.raises(InputError):
        storage_report(dataset=uri, transition_ia_days=7)


def test_storage_report_counts_noncurrent_versions(prefect_harness, s3_env, sample_bam, fast_retries, monkeypatch):
    """Issue #12 item 1: in a versioned bucket the report counts noncurrent versions and delete
    markers (apart, and in the total, which then equals what is stored); a non-versioned bucket
    gets no ListObjectVersions."""
    from bams3.store.s3 import S3Store
    from flows import storage_report

    ops = []
    orig = S3Store._make_client

    def make_client(store, region):
        client = orig(store, region)
        client.meta.events.register("before-parameter-build.s3", lambda model=None, **_kw: ops.append(model.name))
        return client

    monkeypatch.setattr(S3Store, "_make_client", make_client)
    c = s3_env.client()
    uri = s3_env.uri("cohort/ds")
    assert cli("convert", "-q", "--chunk-size", CHUNK, sample_bam, uri) == 0
    ops.clear()
    res = storage_report(dataset=s3_env.uri("cohort"))
    assert "GetBucketVersioning" in ops and "ListObjectVersions" not in ops
    assert set(res["total"]) == {"objects", "bytes", "monthly_usd"} and "noncurrent" not in res["datasets"][0]
    assert "noncurrent" not in res["other"]

    c.put_bucket_versioning(Bucket=s3_env.bucket, VersioningConfiguration={"Status": "Enabled"})
    assert cli("convert", "-q", "--overwrite", "--keep-snapshots", "0", "--chunk-size", "32K", sample_bam, uri) == 0
    versions, markers = [], []
    for page in c.get_paginator("list_object_versions").paginate(Bucket=s3_env.bucket, Prefix="cohort/"):
        versions += page.get("Versions", [])
        markers += page.get("DeleteMarkers", [])
    current = [v for v in versions if v["IsLatest"]]
    old = [v for v in versions if not v["IsLatest"]]
    assert old and markers
    ops.clear()
    res = storage_report(dataset=s3_env.uri("cohort"))
    assert "ListObjectVersions" in ops
    (d,) = res["datasets"]
    assert (d["objects"], d["bytes"]) == (len(current), sum(v["Size"] for v in current))
    nc = d["noncurrent"]
    assert (nc["versions"], nc["bytes"], nc["delete_markers"]) == (len(old), sum(v["Size"] for v in old), len(markers))
    assert nc["monthly_usd"] == pytest.approx(nc["bytes"] / 2 ** 30 * 0.023, rel=1e-12)
    stored = sum(v["Size"] for v in versions)
    assert res["total"]["bytes"] == d["total"]["bytes"] == stored  # what is stored
    assert res["total"]["objects"] == len(versions)
    assert res["total"]["monthly_usd"] == pytest.approx(stored / 2 ** 30 * 0.023, rel=1e-12)
    assert res["total"]["current"]["bytes"] == d["bytes"]
    assert res["total"]["noncurrent"]["bytes"] == nc["bytes"]
    assert res["lifecycle"]["versioned"] is True


# ---------------------------------------------------------------------------------------------
# the stages on other task runners (issue #11)
# ---------------------------------------------------------------------------------------------
def test_convert_to_s3_on_a_dask_cluster(prefect_harness, s3_env, sample_bam, dask_cluster, tmp_path):
    """The same flow, its shard and verify tasks on Dask workers (plain values in and out)."""
    from prefect_dask import DaskTaskRunner

    from flows import convert_to_s3

    uri, ref = s3_env.uri("dask"), s3_env.uri("threads")
    on_dask = convert_to_s3.with_options(task_runner=DaskTaskRunner(address=dask_cluster))
    # verify_mode="read": the verify_shard tasks run on the workers too (the default adds none)
    state = on_dask(source=sample_bam, destination=uri, chunk_size=CHUNK, shards=3, verify_mode="read",
                    return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    assert summary["shards"] == 4 and summary["reused_chunks"] == 0
    convert_to_s3(source=sample_bam, destination=ref, chunk_size=CHUNK, shards=3)
    a, b = manifest_of(ref), manifest_of(uri)
    assert [c.sha256 for c in a.chunks] == [c.sha256 for c in b.chunks]  # same plan, same bytes
    import pysam

    assert query_text(uri, tmp_path).decode() == pysam.samtools.view(sample_bam)
    runs = task_runs(flow_run_id(state), want=lambda rs: sum(r.name.startswith("shard-") and
                                                              r.state_type.value == "COMPLETED" for r in rs) == 4)
    names = sorted(r.name for r in runs)
    assert [n for n in names if n.startswith("shard-")] == [f"shard-{i:04d}" for i in range(4)]
    assert any(n.startswith("verify-shard-") for n in names)
    assert any(n.startswith("commit") for n in names) and any(n.startswith("plan") for n in names)
    assert cli("verify", uri) == 0


def test_convert_to_s3_shards_on_worker_processes(prefect_harness, s3_env, sample_bam, tmp_path):
    """On the flow's own thread pool, the shard tasks hand their jobs to ``threads`` worker
    processes of the flow run, as `bams3 convert` does; the dataset is the CLI's, chunk for
    chunk. With threads=1 (or a credentials block, or Dask/Ray) they run in the task's thread."""
    import pysam

    from bams3 import shardpool
    from flows import convert_to_s3

    uri, cli_uri = s3_env.uri("procs"), s3_env.uri("procs-cli")
    assert cli("convert", "-q", "--chunk-size", CHUNK, "--shards", "3", sample_bam, cli_uri) == 0
    state = convert_to_s3(source=sample_bam, destination=uri, chunk_size=CHUNK, shards=3, return_state=True)
    assert state.is_completed(), state
    logs = run_logs(flow_run_id(state))
    assert logs.count("on a worker process") == 4 and "on the task's thread" not in logs, logs
    a, b = manifest_of(cli_uri), manifest_of(uri)
    assert [c.sha256 for c in a.chunks] == [c.sha256 for c in b.chunks]
    assert query_text(uri, tmp_path).decode() == pysam.samtools.view(sample_bam)
    assert shardpool._serving == {}  # the pool went with the run
    state = convert_to_s3(source=sample_bam, destination=s3_env.uri("procs-1"), chunk_size=CHUNK, shards=3,
                          threads=1, return_state=True)
    assert state.is_completed(), state
    logs = run_logs(flow_run_id(state))
    assert logs.count("on the task's thread") == 4 and "on a worker process" not in logs, logs
    assert [c.sha256 for c in manifest_of(s3_env.uri("procs-1")).chunks] == [c.sha256 for c in a.chunks]


def test_convert_to_s3_on_ray(prefect_harness, s3_env, sample_bam, tmp_path):
    """The same flow on prefect-ray's RayTaskRunner (a local Ray instance of 2 CPUs, started and
    stopped by the task runner): its shard tasks run in Ray worker processes, and the dataset is
    the thread pool's, record for record and chunk for chunk."""
    pytest.importorskip("prefect_ray")
    from prefect_ray import RayTaskRunner

    from flows import convert_to_s3

    uri, ref = s3_env.uri("ray"), s3_env.uri("ray-threads")
    ray = RayTaskRunner(init_kwargs={"num_cpus": 2, "include_dashboard": False, "object_store_memory": 100 << 20})
    state = convert_to_s3.with_options(task_runner=ray)(source=sample_bam, destination=uri, chunk_size=CHUNK,
                                                        shards=3, return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    assert summary["shards"] == 4 and summary["reused_chunks"] == 0
    convert_to_s3(source=sample_bam, destination=ref, chunk_size=CHUNK, shards=3)
    assert query_text(uri, tmp_path) == query_text(ref, tmp_path)  # `bams3 query`: record for record
    import pysam

    assert query_text(uri, tmp_path).decode() == pysam.samtools.view(sample_bam)
    a, b = manifest_of(ref), manifest_of(uri)
    assert [c.sha256 for c in a.chunks] == [c.sha256 for c in b.chunks]  # same plan, same bytes
    runs = task_runs(flow_run_id(state), want=lambda rs: sum(r.name.startswith("shard-") and
                                                              r.state_type.value == "COMPLETED" for r in rs) == 4)
    assert sorted(r.name for r in runs if r.name.startswith("shard-")) == [f"shard-{i:04d}" for i in range(4)]
    assert cli("verify", uri) == 0


def test_shard_failure_is_read_from_the_final_state_not_the_api():
    """A shard future that prefect.futures.wait(timeout=) reports done may not have its final
    state set yet; its ``state`` then comes from the API and may still say Running. That must
    not count as a failure (it once stopped the remaining shards: the commit was refused)."""
    from prefect.states import Completed, Failed, Running

    from flows.convert import _failed

    class Finished:
        def __init__(self, final):
            self.final, self.waited = final, False

        def wait(self, timeout=None):
            self.waited = True

        @property
        def state(self):
            return self.final if self.waited else Running()  # the API's lagging view

    assert _failed(Finished(Completed())) is False
    assert _failed(Finished(Failed())) is True
