"""``--s3-concurrency`` bounds the reader's ranged GETs in flight (query, export, verify) and the
HTTP connection pool, as it bounds uploads; it can raise read parallelism above 2 x threads."""

from __future__ import annotations

import threading
import time

import pytest

from bams3.cli import main as bams3_main
from bams3.store.s3 import S3Store


@pytest.fixture(scope="module")
def sample_bam(tmp_path_factory) -> str:
    from bams3.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("conc"), 5000, 5)["bam"]


class InFlight:
    """Counts chunk GETs in flight in S3Store._get_object (request + body read)."""

    def __init__(self, monkeypatch):
        self.lock = threading.Lock()
        self.now = self.peak = self.total = 0
        orig = S3Store._get_object

        def counting(store, key, *a, **kw):
            if not key.endswith(".b3c"):
                return orig(store, key, *a, **kw)
            with self.lock:
                self.now += 1
                self.total += 1
                self.peak = max(self.peak, self.now)
            try:
                time.sleep(0.03)  # make overlapping requests overlap for sure
                return orig(store, key, *a, **kw)
            finally:
                with self.lock:
                    self.now -= 1

        monkeypatch.setattr(S3Store, "_get_object", counting)

    def reset(self):
        self.now = self.peak = self.total = 0


def run(*args) -> None:
    assert bams3_main([str(a) for a in args]) == 0


def test_s3_concurrency_bounds_reads(s3_env, sample_bam, tmp_path, monkeypatch, capsys):
    uri = s3_env.uri("ds")
    run("convert", "-q", "--chunk-size", "64K", "--block-size", "8K", sample_bam, uri)
    hook = InFlight(monkeypatch)
    commands = {"query": ["query", uri, "-o", tmp_path / "q.sam"],
                "export": ["export", uri, tmp_path / "e.bam"],
                "verify": ["verify", uri]}
    for name, args in commands.items():
        hook.reset()
        run(*args, "-@", "2", "--s3-concurrency", "1")
        assert hook.total >= 8, (name, hook.total)  # enough reads to run in parallel
        assert hook.peak == 1, (name, hook.peak)
    for name in commands:
        hook.reset()
        run(*commands[name], "-@", "2", "--s3-concurrency", "8")
        assert hook.peak > 4, (name, hook.peak)  # above 2 x threads


def test_connection_pool_follows_concurrency(s3_env):
    for n in (1, 8, 40):
        with S3Store(s3_env.bucket, "ds", concurrency=n) as st:
            assert st.client.meta.config.max_pool_connections >= n
