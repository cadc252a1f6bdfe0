"""Shared pytest fixtures.

S3 fixtures (real HTTP moto server on 127.0.0.1; nothing leaves the machine):
- ``moto_server``  (session) -> endpoint URL of a moto S3 server
- ``s3_env``       -> AWS_* env pointing at moto with fake credentials, a fresh bucket,
                      and BAMS3_CACHE_DIR in tmp_path; yields an ``S3Env``
- ``flaky_proxy``  -> an ``S3Proxy`` in front of moto (counts and fails requests);
                      AWS_ENDPOINT_URL is switched to the proxy
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import pytest

_AWS_VARS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
             "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS",
             "AWS_CA_BUNDLE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
             "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
             "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
_bucket_ids = itertools.count()


@dataclass
class S3Env:
    endpoint: str  # where AWS_ENDPOINT_URL points (moto, or the proxy once flaky_proxy is used)
    moto_endpoint: str
    bucket: str
    cache_dir: str

    def client(self, endpoint: str | None = None):
        """A plain boto3 client for setup/assertions (talks to moto directly by default)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=endpoint or self.moto_endpoint,
                            region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing",
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"mode": "standard", "max_attempts": 2}))

    def uri(self, prefix: str = "ds") -> str:
        return f"s3://{self.bucket}/{prefix}"


@pytest.fixture(scope="session")
def moto_server():
    """Endpoint URL of a moto S3 server (HTTP, 127.0.0.1, ephemeral port) for the session."""
    pytest.importorskip("moto")
    from bams3.testing.s3server import start_moto_server

    server = start_moto_server()
    try:
        yield server.endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_server, monkeypatch, tmp_path):
    """Point boto3 at moto with fake credentials and create a fresh bucket."""
    for var in _AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cache_dir = str(tmp_path / "bams3-cache")
    monkeypatch.setenv("BAMS3_CACHE_DIR", cache_dir)
    env = S3Env(endpoint=moto_server, moto_endpoint=moto_server,
                bucket=f"bams3-test-{os.getpid()}-{next(_bucket_ids)}", cache_dir=cache_dir)
    env.client().create_bucket(Bucket=env.bucket)
    return env


@pytest.fixture
def flaky_proxy(s3_env, monkeypatch):
    """A counting/fault-injecting proxy in front of moto; AWS_ENDPOINT_URL points at it."""
    from bams3.testing.s3server import S3Proxy

    proxy = S3Proxy(s3_env.moto_endpoint).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    s3_env.endpoint = proxy.endpoint
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="session")
def dask_cluster():
    """One in-process Dask cluster (2 workers x 1 thread) for the session; yields its address."""
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                       dashboard_address=":0")
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()
