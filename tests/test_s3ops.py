"""Lifecycle at archive scale, storage classes, archived chunks and restores, and `bams3 cost`
(issue #12 items 4 and 5), on the moto S3 server where S3 is involved.

moto raises InvalidObjectState for a GET of a GLACIER object, records RestoreObject and
reports the restore in HeadObject's ``Restore`` header (completed at once: "in progress" is
covered by the pure :func:`bams3core.cost.restore_state` test).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics

import pytest

from bams3.cli import main as bams3_main
from bams3core import cost
from bams3core.htsindex import HtsIndexError, index_counts

GB = 2 ** 30


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = bams3_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def sample_bam(tmp_path_factory) -> str:
    from bams3.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("s3ops"), 2000, 11)["bam"]


def tags_of(client, bucket, key) -> dict:
    return {t["Key"]: t["Value"] for t in client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}


# ---------------------------------------------------------------------------------------------
# lifecycle
# ---------------------------------------------------------------------------------------------
def test_lifecycle_plan_for_2000_datasets_needs_few_rules():
    datasets = [f"archive/cohort{i % 40}/sample{i:05d}" for i in range(2000)]
    for versioned in (False, True):
        rules = cost.lifecycle_plan("archive", ia_days=30, glacier_ir_days=90, tmp_expire_days=7,
                                    abort_multipart_days=7, versioned=versioned)
        assert len(rules) <= 10 and len(rules) == (4 if versioned else 3)
        assert len({r["ID"] for r in rules}) == len(rules)
        assert any("NoncurrentVersionExpiration" in r for r in rules) == versioned
    transitions = [r for r in rules if "Transitions" in r]
    expirations = [r for r in rules if "Days" in r.get("Expiration", {})]
    for ds in datasets:  # every dataset (whatever its run id) is covered, its metadata never moves
        chunk = f"{ds}/data/{hash(ds) & 0xffff:x}/chunks/000003.b3c"
        assert [r["ID"] for r in transitions if cost.rule_applies(r, chunk, {"bams3-object": "chunk"})] == \
               ["bams3:chunks:archive"]
        for meta in (f"{ds}/manifest.json", f"{ds}/data/r1/header.sam", f"{ds}/data/r1/index/0.b3i"):
            assert not any(cost.rule_applies(r, meta, {}) for r in transitions + expirations), meta
        spill = f"{ds}/_tmp/r1/run-000000"
        assert [r["ID"] for r in expirations if cost.rule_applies(r, spill, {"bams3-object": "tmp"})] == \
               ["bams3:tmp:archive"]
        assert not any(cost.rule_applies(r, chunk, {"bams3-object": "chunk"}) for r in expirations)
    # outside the prefix nothing applies
    assert not any(cost.rule_applies(r, "archive2/x/data/r/chunks/0.b3c", {"bams3-object": "chunk"}) for r in rules)
    # the same 2,000 datasets planned by the old per-dataset rules would not fit in a bucket
    assert 2 * len(datasets) > cost.MAX_LIFECYCLE_RULES


def test_lifecycle_cli_dry_run_then_apply_merges(s3_env, capsys):
    c = s3_env.client()
    b = s3_env.bucket
    keep = {"ID": "keep-me", "Status": "Enabled", "Filter": {"Prefix": "logs/"}, "Expiration": {"Days": 365}}
    old = {"ID": "bams3:chunks:arch/ds1", "Status": "Enabled", "Filter": {"Prefix": "arch/ds1/data/OLDRUN/chunks/"},
           "Transitions": [{"Days": 30, "StorageClass": "STANDARD_IA"}]}
    elsewhere = {"ID": "bams3:tmp:other", "Status": "Enabled", "Filter": {"Prefix": "other/"},
                 "Expiration": {"Days": 3}}
    c.put_bucket_lifecycle_configuration(Bucket=b, LifecycleConfiguration={"Rules": [keep, old, elsewhere]})

    def bucket_rules():
        return {r["ID"]: r for r in c.get_bucket_lifecycle_configuration(Bucket=b)["Rules"]}

    rc, out, err = cli(capsys, "lifecycle", f"s3://{b}/arch", "--transition-glacier-ir-days", "120")
    assert rc == 0 and "dry run" in err and "--apply" in err
    plan = json.loads(out)
    assert plan["applied"] is False and plan["versioned"] is False
    assert [r["ID"] for r in plan["rules"]] == ["bams3:chunks:arch", "bams3:tmp:arch", "bams3:abort-multipart:arch"]
    assert plan["rules"][0]["Transitions"][1] == {"Days": 120, "StorageClass": "GLACIER_IR"}
    assert plan["changes"]["removed"] == ["bams3:chunks:arch/ds1"] and len(plan["changes"]["added"]) == 3
    assert set(bucket_rules()) == {"keep-me", "bams3:chunks:arch/ds1", "bams3:tmp:other"}  # untouched

    rc, out, err = cli(capsys, "lifecycle", f"s3://{b}/arch", "--apply", "--transition-glacier-ir-days", "120")
    assert rc == 0 and json.loads(out)["applied"] is True
    rules = bucket_rules()
    assert set(rules) == {"keep-me", "bams3:tmp:other", "bams3:chunks:arch", "bams3:tmp:arch",
                          "bams3:abort-multipart:arch"}
    assert rules["keep-me"] == keep and rules["bams3:tmp:other"]["Expiration"] == {"Days": 3}
    assert rules["bams3:chunks:arch"]["Filter"]["And"]["Tags"] == [{"Key": "bams3-object", "Value": "chunk"}]

    # versioned bucket: the plan adds the noncurrent-version rule; applying twice changes nothing more
    c.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    for _ in range(2):
        rc, out, _err = cli(capsys, "lifecycle", f"s3://{b}/arch", "--apply", "--transition-glacier-ir-days", "120",
                            "--expire-noncurrent-days", "14")
        assert rc == 0
    assert json.loads(out)["changes"]["added"] == []
    rules = bucket_rules()
    assert len(rules) == 6
    nc = rules["bams3:noncurrent:arch"]
    assert nc["NoncurrentVersionExpiration"]["NoncurrentDays"] == 14 and nc["Filter"] == {"Prefix": "arch/"}

    rc, _out, err = cli(capsys, "lifecycle", f"s3://{b}/arch", "--transition-ia-days", "10")
    assert rc == 1 and err.count("\n") == 1 and "--transition-ia-days" in err
    rc, _out, err = cli(capsys, "lifecycle", "/some/local/dir")
    assert rc == 1 and "S3 only" in err


# ---------------------------------------------------------------------------------------------
# storage classes
# ---------------------------------------------------------------------------------------------
def test_storage_class_applies_to_chunks_only(s3_env, sample_bam, capsys):
    c = s3_env.client()
    uri = s3_env.uri("ia")
    rc, _out, err = cli(capsys, "convert", "-q", "--chunk-size", "64K", "--s3-storage-class", "STANDARD_IA",
                        sample_bam, uri)
    assert rc == 0, err
    objs = c.list_objects_v2(Bucket=s3_env.bucket, Prefix="ia/")["Contents"]
    chunks = [o["Key"] for o in objs if "/chunks/" in o["Key"]]
    meta = [o["Key"] for o in objs if "/chunks/" not in o["Key"]]
    assert len(chunks) >= 2 and any(k.endswith("manifest.json") for k in meta)
    assert any(k.endswith("header.sam") for k in meta) and any(k.endswith(".b3i") for k in meta)
    for k in chunks:
        assert c.head_object(Bucket=s3_env.bucket, Key=k)["StorageClass"] == "STANDARD_IA"
        assert tags_of(c, s3_env.bucket, k) == {"bams3-object": "chunk"}
    for k in meta:
        assert c.head_object(Bucket=s3_env.bucket, Key=k).get("StorageClass", "STANDARD") == "STANDARD", k
        assert tags_of(c, s3_env.bucket, k) == {}, k


def test_invalid_storage_class_fails_before_any_upload(s3_env, sample_bam, capsys, flaky_proxy):
    rc, _out, err = cli(capsys, "convert", "-q", "--s3-storage-class", "GLACIER_DEEP", sample_bam, s3_env.uri("bad"))
    assert rc == 1 and err.count("\n") == 1
    assert "GLACIER_DEEP" in err and "valid classes: STANDARD, INTELLIGENT_TIERING, STANDARD_IA" in err
    assert flaky_proxy.stats["by_op"] == {}  # not one request
    assert "Contents" not in s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix="bad/")


def test_spill_objects_are_tagged_tmp(s3_env):
    from bams3.store import open_store

    with open_store(s3_env.uri("t"), storage_class="GLACIER_IR") as st:
        st.set("_tmp/r/run-000000", b"x" * 100, kind="tmp")
        st.set("data/r/header.sam", b"@HD\n")
    c = s3_env.client()
    assert tags_of(c, s3_env.bucket, "t/_tmp/r/run-000000") == {"bams3-object": "tmp"}
    head = c.head_object(Bucket=s3_env.bucket, Key="t/_tmp/r/run-000000")
    assert head.get("StorageClass", "STANDARD") == "STANDARD"  # only chunks take the class
    assert c.head_object(Bucket=s3_env.bucket, Key="t/data/r/header.sam").get("StorageClass", "STANDARD") == "STANDARD"


# ---------------------------------------------------------------------------------------------
# archived chunks and restore
# ---------------------------------------------------------------------------------------------
def test_restore_state_from_head():
    assert cost.restore_state("STANDARD_IA", None) == "readable"
    assert cost.restore_state(None, None) == "readable"
    assert cost.restore_state("GLACIER", None) == "not-requested"
    assert cost.restore_state("DEEP_ARCHIVE", 'ongoing-request="true"') == "in-progress"
    assert cost.restore_state("GLACIER", 'ongoing-request="false", expiry-date="Fri, 21 Dec 2012 00:00:00 GMT"') \
        == "restored"


def test_glacier_chunk_query_says_restore_and_restore_reports_progress(s3_env, sample_bam, capsys, flaky_proxy):
    c = s3_env.client()
    uri = s3_env.uri("cold")
    assert cli(capsys, "convert", "-q", "--chunk-size", "64K", sample_bam, uri)[0] == 0
    rc, out, _ = cli(capsys, "query", "-c", "--no-cache", uri)
    n_records = int(out)
    chunks = sorted(o["Key"] for o in c.list_objects_v2(Bucket=s3_env.bucket, Prefix="cold/")["Contents"]
                    if "/chunks/" in o["Key"])
    assert len(chunks) >= 3
    archived = chunks[:2]
    for k in archived:  # what a lifecycle transition to GLACIER does
        c.copy_object(Bucket=s3_env.bucket, Key=k, CopySource={"Bucket": s3_env.bucket, "Key": k},
                      StorageClass="GLACIER", MetadataDirective="COPY")

    # (`query -c` of the whole dataset reads no chunk since it counts from the manifest)
    rc, out, err = cli(capsys, "query", "--no-cache", uri)
    assert rc == 1 and err.count("\n") == 1, err
    assert "archived (storage class GLACIER)" in err and f"restore it with `bams3 restore {uri}`" in err
    assert "access denied" not in err

    flaky_proxy.reset()
    rc, out, err = cli(capsys, "restore", "--json", "--tier", "Bulk", "--days", "3", uri)
    assert rc == 0, err
    res = json.loads(out)
    assert res["objects"] == len(chunks) and res["readable"] == len(chunks) - 2
    assert res["requested"] == 2 and res["by_class"] == {"GLACIER": 2}
    assert flaky_proxy.stats["by_op"].get("RestoreObject") == 2
    for k in archived:
        assert c.head_object(Bucket=s3_env.bucket, Key=k).get("Restore")

    flaky_proxy.reset()
    rc, out, err = cli(capsys, "restore", uri)  # again: progress, no new request
    assert rc == 0 and "RestoreObject" not in flaky_proxy.stats["by_op"]
    assert "2 archived (2 in GLACIER): 2 restored, 0 in progress, 0 requested now" in out
    assert "0 not requested" in out
    rc, out, _ = cli(capsys, "query", "--no-cache", uri)
    assert rc == 0 and out.count("\n") == n_records

    rc, _out, err = cli(capsys, "restore", "/a/local/dataset")
    assert rc == 1 and "S3 only" in err


# ---------------------------------------------------------------------------------------------
# cost
# ---------------------------------------------------------------------------------------------
def test_index_counts_match_samtools_idxstats(sample_bam, tmp_path):
    import pysam

    rows = [ln.split("\t") for ln in pysam.idxstats(sample_bam).splitlines() if ln]
    total = sum(int(r[2]) + int(r[3]) for r in rows)
    bai = index_counts(open(sample_bam + ".bai", "rb").read())
    assert bai["format"] == "BAI" and bai["records"] == total
    assert bai["mapped"] == [int(r[2]) for r in rows if r[0] != "*"]
    csi_path = tmp_path / "x.bam.csi"
    pysam.samtools.index("-c", sample_bam, "-o", str(csi_path))
    csi = index_counts(csi_path.read_bytes())
    assert csi["format"] == "CSI" and (csi["mapped"], csi["unmapped"], csi["records"]) == \
           (bai["mapped"], bai["unmapped"], total)
    with pytest.raises(HtsIndexError):
        index_counts(b"not an index")


def test_cost_of_a_bam_before_migration(s3_env, sample_bam, tmp_path, capsys):
    import pysam

    size = os.path.getsize(sample_bam)
    records = sum(int(r.split("\t")[2]) + int(r.split("\t")[3]) for r in pysam.idxstats(sample_bam).splitlines() if r)
    rc, out, err = cli(capsys, "cost", "--json", sample_bam)
    assert rc == 0, err
    est = json.loads(out)
    assert est["kind"] == "source" and est["format"] == "bam" and est["records"] == records
    assert est["records_from"].startswith("BAI index")
    assert est["ratio"] == pytest.approx(26.66 / 65.85, rel=1e-3)  # the benchmark's 0.405x of BAM
    assert est["dataset_bytes"] == round(size * est["ratio"])
    assert est["monthly_usd"]["STANDARD"] == pytest.approx(
        (est["dataset_bytes"] + 3 * 4096) / GB * 0.023, rel=1e-9)
    assert est["monthly_usd"] == cost.estimate_costs(cost.estimate_dataset("bam", size, records, records_from="x"))[
        "monthly_usd"]
    # measured against the real conversion: within 2x of the estimate on this small sample
    assert cli(capsys, "convert", "-q", sample_bam, tmp_path / "ds")[0] == 0
    real = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "ds") for f in fs)
    assert 0.5 < est["dataset_bytes"] / real < 2.0, (est["dataset_bytes"], real)

    # unindexed: records estimated from the size; on S3: the same numbers as locally
    bare = tmp_path / "bare.bam"
    shutil.copy(sample_bam, bare)
    rc, out, _ = cli(capsys, "cost", "--json", bare)
    e2 = json.loads(out)
    assert e2["records_from"].startswith("estimated") and e2["dataset_bytes"] == est["dataset_bytes"]
    assert e2["records"] == round(est["dataset_bytes"] / cost.DATASET_BYTES_PER_RECORD)
    c = s3_env.client()
    c.upload_file(sample_bam, s3_env.bucket, "in/s.bam")
    c.upload_file(sample_bam + ".bai", s3_env.bucket, "in/s.bam.bai")
    rc, out, _ = cli(capsys, "cost", "--json", f"s3://{s3_env.bucket}/in/s.bam")
    e3 = json.loads(out)
    assert rc == 0 and (e3["records"], e3["dataset_bytes"]) == (records, est["dataset_bytes"])
    rc, out, _ = cli(capsys, "cost", sample_bam)  # text: states the ratio and where it comes from
    assert rc == 0 and f"{records:,} records" in out and "0.405x of BAM" in out and "benchmark" in out


def test_cost_of_a_dataset_matches_the_price_list(s3_env, sample_bam, capsys):
    from bams3.dataset import Dataset
    from bams3.store import open_store

    uri = s3_env.uri("priced")
    assert cli(capsys, "convert", "-q", "--chunk-size", "64K", "--s3-storage-class", "STANDARD_IA",
               sample_bam, uri)[0] == 0
    rc, out, err = cli(capsys, "cost", "--json", uri)
    assert rc == 0, err
    rep = json.loads(out)
    objs = s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix="priced/")["Contents"]
    ia = [o["Size"] for o in objs if o.get("StorageClass") == "STANDARD_IA"]
    std = [o["Size"] for o in objs if o.get("StorageClass", "STANDARD") == "STANDARD"]
    assert rep["objects"] == len(objs) and len(ia) == rep["chunks"] and rep["chunk_class"] == "STANDARD_IA"
    monthly = sum(std) / GB * 0.023 + sum(max(s, 128 * 1024) for s in ia) / GB * 0.0125
    assert rep["monthly_usd"] == pytest.approx(monthly, rel=1e-12)
    assert rep["by_class"]["STANDARD_IA"]["objects"] == len(ia)
    with open_store(uri, use_cache=False) as st:
        lengths = [int(x) for x in Dataset.open(st, refresh=True).all_rows()["length"]]
    med = int(statistics.median(lengths))
    warm = rep["region_query"]["warm"]
    assert (warm["requests"], warm["bytes"]) == (1, med)
    assert warm["usd"] == pytest.approx(0.001 / 1000 + med / GB * (0.01 + 0.09), rel=1e-12)  # IA: retrieval fee
    # a whole read fetches the manifest, header, index and chunks, not the snapshot copy of the manifest
    assert rep["whole_read"]["bytes"] == sum(o["Size"] for o in objs if not o["Key"].startswith("priced/snapshots/"))
    rc, out, _ = cli(capsys, "cost", "--egress", "same-region", "--json", uri)
    assert json.loads(out)["whole_read"]["egress_usd"] == 0
    rc, out, _ = cli(capsys, "cost", uri)
    assert rc == 0 and "STANDARD_IA: " in out and "1 kb region query" in out and "whole read" in out
    rc, _out, err = cli(capsys, "cost", s3_env.uri("nothing-here"))
    assert rc == 1 and err.count("\n") == 1


class _S3Ops:
    """The S3 operations (names) every client bams3 creates sends."""

    def __init__(self, monkeypatch):
        from bams3.store.s3 import S3Store

        self.ops: list[str] = []
        orig = S3Store._make_client

        def make_client(store, region):
            client = orig(store, region)
            client.meta.events.register("before-parameter-build.s3",
                                        lambda model=None, **_kw: self.ops.append(model.name))
            return client

        monkeypatch.setattr(S3Store, "_make_client", make_client)


def test_cost_counts_noncurrent_versions_in_a_versioned_bucket(s3_env, sample_bam, capsys, monkeypatch):
    """Issue #12 item 1: after --overwrite in a versioned bucket the replaced run's objects
    survive as noncurrent versions; `bams3 cost` counts them apart and in the total, which
    equals the bytes of every version under the prefix."""
    c = s3_env.client()
    ops = _S3Ops(monkeypatch)
    plain = s3_env.uri("plain")  # not versioned: no ListObjectVersions, output as before
    assert cli(capsys, "convert", "-q", "--chunk-size", "64K", sample_bam, plain)[0] == 0
    ops.ops.clear()
    rc, out, err = cli(capsys, "cost", "--json", plain)
    assert rc == 0, err
    rep = json.loads(out)
    assert "ListObjectVersions" not in ops.ops and "GetBucketVersioning" in ops.ops
    assert "noncurrent" not in rep and "total" not in rep
    assert "noncurrent" not in cli(capsys, "cost", plain)[1]

    c.put_bucket_versioning(Bucket=s3_env.bucket, VersioningConfiguration={"Status": "Enabled"})
    uri = s3_env.uri("ver")
    assert cli(capsys, "convert", "-q", "--chunk-size", "64K", sample_bam, uri)[0] == 0
    assert cli(capsys, "convert", "-q", "--overwrite", "--keep-snapshots", "0", "--chunk-size", "32K",
               sample_bam, uri)[0] == 0
    versions, markers = [], []
    for page in c.get_paginator("list_object_versions").paginate(Bucket=s3_env.bucket, Prefix="ver/"):
        versions += page.get("Versions", [])
        markers += page.get("DeleteMarkers", [])
    current = [v for v in versions if v["IsLatest"]]
    old = [v for v in versions if not v["IsLatest"]]
    assert old and markers  # the replaced run's objects: noncurrent, behind delete markers
    ops.ops.clear()
    rc, out, err = cli(capsys, "cost", "--json", uri)
    assert rc == 0, err
    assert "ListObjectVersions" in ops.ops
    rep = json.loads(out)
    assert (rep["objects"], rep["bytes"]) == (len(current), sum(v["Size"] for v in current))
    nc = rep["noncurrent"]
    assert (nc["versions"], nc["delete_markers"]) == (len(old), len(markers))
    assert nc["bytes"] == sum(v["Size"] for v in old) > 0
    assert nc["monthly_usd"] == pytest.approx(nc["bytes"] / GB * 0.023, rel=1e-12)
    assert nc["by_class"]["STANDARD"]["objects"] == len(old)
    assert rep["total"]["bytes"] == sum(v["Size"] for v in versions)  # what is stored
    assert rep["total"]["objects"] == len(versions)
    assert rep["total"]["monthly_usd"] == pytest.approx(sum(v["Size"] for v in versions) / GB * 0.023, rel=1e-12)
    rc, out, _ = cli(capsys, "cost", uri)
    assert rc == 0 and f"noncurrent versions (versioned bucket): {len(old)} version(s)" in out
    assert "total stored: " in out


def test_noncurrent_costs_price_versions_by_class_and_markers_at_zero():
    nc = cost.noncurrent_costs([("a", 1000, "STANDARD_IA", False), ("b", GB, None, False),
                                ("c", 0, "STANDARD", True), ("d", 0, "STANDARD", True)])
    assert (nc["versions"], nc["delete_markers"], nc["bytes"]) == (2, 2, GB + 1000)
    assert nc["by_class"]["STANDARD_IA"]["billable_bytes"] == 128 * 1024  # minimum billable size applies
    assert nc["monthly_usd"] == pytest.approx(0.023 + 128 * 1024 / GB * 0.0125, rel=1e-12)
    rep = cost.add_noncurrent({"objects": 3, "bytes": 10, "monthly_usd": 1.0}, nc)
    assert rep["total"] == {"objects": 5, "bytes": GB + 1010, "monthly_usd": pytest.approx(1.0 + nc["monthly_usd"])}
