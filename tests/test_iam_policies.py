"""The IAM policies in docs/iam/ allow exactly the S3 actions bams3 performs.

Every S3 API operation the code calls is recorded (a botocore ``before-parameter-build`` hook on
each client bams3 creates) while a reader, a writer and an admin scenario run on the local S3
endpoint; the operations are mapped to IAM actions and compared with the policy of the role:
an action the code needs that the policy lacks fails, and so does an action the policy grants
that the scenario never used.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from bams3.cli import main as bams3_main
from bams3.store.s3 import S3Store

IAM_DIR = os.path.join(os.path.dirname(__file__), "..", "docs", "iam")

# S3 API operation -> IAM actions it needs (docs.aws.amazon.com/AmazonS3/latest/API/ and the
# Service Authorization Reference for Amazon S3)
OPERATION_ACTIONS = {
    "GetObject": {"s3:GetObject"},
    "HeadObject": {"s3:GetObject"},
    "ListObjectsV2": {"s3:ListBucket"},
    "HeadBucket": {"s3:ListBucket"},
    "PutObject": {"s3:PutObject"},
    "CreateMultipartUpload": {"s3:PutObject"},
    "UploadPart": {"s3:PutObject"},
    "CompleteMultipartUpload": {"s3:PutObject"},
    "AbortMultipartUpload": {"s3:AbortMultipartUpload"},
    "ListMultipartUploads": {"s3:ListBucketMultipartUploads"},
    "ListParts": {"s3:ListMultipartUploadParts"},
    "DeleteObject": {"s3:DeleteObject"},
    "DeleteObjects": {"s3:DeleteObject"},
    "GetBucketLocation": {"s3:GetBucketLocation"},
    "GetBucketVersioning": {"s3:GetBucketVersioning"},
    "ListObjectVersions": {"s3:ListBucketVersions"},
    "GetBucketLifecycleConfiguration": {"s3:GetLifecycleConfiguration"},
    "PutBucketLifecycleConfiguration": {"s3:PutLifecycleConfiguration"},
    "RestoreObject": {"s3:RestoreObject"},
    "GetObjectTagging": {"s3:GetObjectTagging"},
    "PutObjectTagging": {"s3:PutObjectTagging"},
}
# actions on the bucket ARN; every other s3 action is on object ARNs (bucket/prefix/*)
BUCKET_ACTIONS = {"s3:ListBucket", "s3:ListBucketMultipartUploads", "s3:ListBucketVersions", "s3:GetBucketLocation",
                  "s3:GetBucketVersioning", "s3:GetLifecycleConfiguration",
                  "s3:PutLifecycleConfiguration"}
FAKE_RUN = "0123456789abcdef"  # a crashed conversion's run: its leftovers are cleaned up


class Recorder:
    """Every S3 operation of every client S3Store creates, as IAM actions."""

    def __init__(self, monkeypatch):
        self.lock = threading.Lock()
        self.ops: set[str] = set()
        self.actions: set[str] = set()
        orig = S3Store._make_client

        def make_client(store, region):
            client = orig(store, region)
            client.meta.events.register("before-parameter-build.s3", self._on_call)
            return client

        monkeypatch.setattr(S3Store, "_make_client", make_client)

    def _on_call(self, params=None, model=None, **_kw):
        name = model.name
        assert name in OPERATION_ACTIONS, f"map S3 operation {name} to its IAM actions"
        acts = set(OPERATION_ACTIONS[name])
        if name in ("PutObject", "CreateMultipartUpload") and (params or {}).get("Tagging"):
            acts.add("s3:PutObjectTagging")  # tags set on upload need this permission too
        with self.lock:
            self.ops.add(name)
            self.actions |= acts

    def take(self) -> tuple[set[str], set[str]]:
        with self.lock:
            out = (self.ops, self.actions)
            self.ops, self.actions = set(), set()
        return out


def load_policy(name: str) -> dict:
    with open(os.path.join(IAM_DIR, f"{name}.json")) as f:
        return json.load(f)


def allowed_actions(policy: dict) -> set[str]:
    """The s3 actions a policy allows, checking that each is granted on the right resource."""
    assert policy["Version"] == "2012-10-17"
    out = set()
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow", st
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        for a in actions:
            assert "*" not in a, f"{a}: name each action"
            if not a.startswith("s3:"):
                continue  # kms:... (SSE-KMS), documented alongside
            out.add(a)
            for r in resources:
                assert r.startswith("arn:aws:s3:::BUCKET"), r
                if a in BUCKET_ACTIONS:
                    assert r == "arn:aws:s3:::BUCKET", (a, r)
                else:
                    assert r == "arn:aws:s3:::BUCKET/PREFIX/*", (a, r)
    return out


def check(policy_name: str, needed: set[str], ops: set[str]) -> None:
    allowed = allowed_actions(load_policy(policy_name))
    missing = needed - allowed
    extra = allowed - needed
    assert not missing, f"{policy_name}.json lacks {sorted(missing)} (operations {sorted(ops)})"
    assert not extra, f"{policy_name}.json grants {sorted(extra)} that bams3 never uses here"


def run(*args) -> None:
    assert bams3_main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def sample_bam(tmp_path_factory) -> str:
    from bams3.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("iam"), 1500, 9)["bam"]


def test_policies_are_valid_json_with_placeholders():
    for name in ("reader", "writer", "admin"):
        p = load_policy(name)
        assert allowed_actions(p)
        assert all(st.get("Sid") for st in p["Statement"])


def test_policies_match_the_operations_bams3_calls(s3_env, sample_bam, tmp_path, monkeypatch, capsys):
    rec = Recorder(monkeypatch)
    uri = s3_env.uri("ds")
    c = s3_env.client()

    # writer: convert (one object big enough for a multipart upload), overwrite, cleanup of a
    # crashed run's leftovers (an object and an unfinished multipart upload), cost; in a
    # versioned bucket (`cost` lists the noncurrent versions there)
    c.put_bucket_versioning(Bucket=s3_env.bucket, VersioningConfiguration={"Status": "Enabled"})
    run("convert", "-q", "--chunk-size", "64K", "--block-size", "16K", sample_bam, uri)
    run("convert", "-q", "--overwrite", "--chunk-size", "6M", "--s3-part-size", "5M", sample_bam, uri)
    c.put_object(Bucket=s3_env.bucket, Key=f"ds/data/{FAKE_RUN}/chunks/000000.b3c", Body=b"x")
    c.create_multipart_upload(Bucket=s3_env.bucket, Key=f"ds/data/{FAKE_RUN}/chunks/000001.b3c")
    monkeypatch.setattr(S3Store, "now", lambda self: time.time() + 7200)  # the run is long dead
    run("cleanup", "--dry-run", uri)
    run("cleanup", uri)
    assert not c.list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads")
    run("cost", uri)
    ops, needed = rec.take()
    assert "ListObjectVersions" in ops, ops
    assert {"PutObject", "DeleteObjects", "AbortMultipartUpload", "ListMultipartUploads"} <= ops, ops
    check("writer", needed, ops)

    # reader: query, stats, export, verify, cost; with a cold and a warm cache
    for _ in range(2):
        run("query", uri, "-o", tmp_path / "q.sam")
        run("query", uri, "chr1:1000-2000", "-o", tmp_path / "r.sam")
        run("stats", uri)
        run("export", uri, tmp_path / "e.bam")
        run("verify", uri)
        run("cost", uri)
    ops, needed = rec.take()
    assert "ListObjectVersions" in ops, ops
    check("reader", needed, ops)

    # admin: lifecycle --apply on the bucket, restore of archived chunks
    run("convert", "-q", "--s3-storage-class", "GLACIER", sample_bam, s3_env.uri("cold"))
    rec.take()  # (that conversion is the writer's)
    run("lifecycle", uri, "--apply")
    run("restore", s3_env.uri("cold"))
    run("restore", s3_env.uri("cold"))  # again: progress
    ops, needed = rec.take()
    assert {"PutBucketLifecycleConfiguration", "RestoreObject"} <= ops, ops
    check("admin", needed, ops)


def test_s3_md_shows_the_policies():
    import re

    with open(os.path.join(IAM_DIR, "..", "S3.md")) as f:
        blocks = []
        for b in re.findall(r"```json\n(.*?)```", f.read(), re.S):
            try:
                blocks.append(json.loads(b))
            except ValueError:
                pass  # a fragment (one statement to add)
    for name in ("reader", "writer", "admin"):
        assert load_policy(name) in blocks, f"docs/S3.md does not show docs/iam/{name}.json as it is"
