"""A local S3 for the benchmark: ``python -m bams3.testing.s3server`` (a moto server with the
counting proxy in front of it) in a child process that we stop by its handle.

Everything measured goes through the proxy; the harness's own housekeeping (bucket creation,
uploading the BAM, listing and deleting datasets) talks to moto directly so it is never counted.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from . import util
from .util import log

BUCKET = "bench"
ACCESS_KEY = "bench-access-key"
SECRET_KEY = "bench-secret-key"
REGION = "us-east-1"


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if the harness dies without stopping it (e.g. SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
    except (OSError, AttributeError):
        pass


def base_env() -> dict:
    """The environment every measured process gets: this repo's bams3, fake credentials."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "HTS_S3_", "BAMS3_"))}
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
               AWS_DEFAULT_REGION=REGION, AWS_EC2_METADATA_DISABLED="true",
               PYTHONPATH=os.pathsep.join(filter(None, [str(util.REPO), env.get("PYTHONPATH")])))
    return env


class S3Env:
    def __init__(self, workdir: Path, *, startup_timeout: float = 60):
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.moto_endpoint = self.proxy_endpoint = None
        self._log = None
        self._startup_timeout = startup_timeout
        self.client = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "S3Env":
        self._log = open(self.workdir / "s3server.log", "wb")
        cmd = [sys.executable, "-u", "-m", "bams3.testing.s3server"]
        util.debug("$ " + util.fmt_cmd(cmd) + "  (local S3: moto + counting proxy)")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log,
                                     env=base_env(), cwd=self.workdir, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        lines: queue.Queue = queue.Queue()

        def reader():
            for raw in self.proc.stdout:
                lines.put(raw.decode(errors="replace"))
            lines.put(None)

        threading.Thread(target=reader, daemon=True, name="s3server-stdout").start()
        deadline = time.monotonic() + self._startup_timeout
        while self.moto_endpoint is None or self.proxy_endpoint is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                err = (self.workdir / "s3server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"local S3 server did not start:\n{err}")
            parts = line.split()
            if parts and parts[0] == "moto:":
                self.moto_endpoint = parts[1]
            elif parts and parts[0] == "proxy:":
                self.proxy_endpoint = parts[1]
        import boto3
        from botocore.config import Config

        self.client = boto3.client(
            "s3", endpoint_url=self.moto_endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name=REGION,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}))
        self.client.create_bucket(Bucket=BUCKET)
        log(f"local S3: moto {self.moto_endpoint}, counting proxy {self.proxy_endpoint} "
            f"(pid {self.proc.pid})")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            util.stop(self.proc)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- proxy counters -------------------------------------------------------------------
    def _control(self, what: str, method: str) -> dict:
        req = urllib.request.Request(f"{self.proxy_endpoint}/__proxy__/{what}", method=method,
                                     data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def stats(self, settle: float = 0.1, max_wait: float = 10.0) -> dict:
        """The proxy's counters once they stop changing.

        The proxy records a request when its handler finishes, which for a GET the client
        abandoned (htslib drops open-ended GETs) can be shortly after the client exited.
        """
        prev = self._control("stats", "GET")
        deadline = time.monotonic() + max_wait
        while time.monotonic() < deadline:
            time.sleep(settle)
            cur = self._control("stats", "GET")
            if cur == prev:
                return cur
            prev = cur
        return prev

    def reset(self) -> None:
        """Zero the counters, after in-flight requests of the previous measurement settled."""
        self.stats()
        self._control("reset", "POST")

    # -- housekeeping (direct to moto, uncounted) ---------------------------------------
    def upload(self, path: Path, key: str) -> None:
        from boto3.s3.transfer import TransferConfig

        self.client.upload_file(str(path), BUCKET, key,
                                Config=TransferConfig(multipart_threshold=1 << 30))

    def objects(self, prefix: str) -> list[tuple[str, int]]:
        prefix = prefix.rstrip("/") + "/"
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                          Prefix=prefix):
            out += [(o["Key"], o["Size"]) for o in page.get("Contents", [])]
        return out

    def prefix_size(self, prefix: str) -> tuple[int, int]:
        objs = self.objects(prefix)
        return sum(s for _, s in objs), len(objs)

    def delete_prefix(self, prefix: str) -> None:
        keys = [k for k, _ in self.objects(prefix)]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=BUCKET, Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
        # abandoned multipart uploads would keep their parts in moto's memory
        ups = self.client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])
        for u in ups:
            self.client.abort_multipart_upload(Bucket=BUCKET, Key=u["Key"], UploadId=u["UploadId"])

    # -- environments for the measured programs ------------------------------------------
    def bams3_env(self, cache_dir: Path | None = None) -> dict:
        env = base_env()
        env["AWS_ENDPOINT_URL"] = self.proxy_endpoint
        if cache_dir is not None:
            env["BAMS3_CACHE_DIR"] = str(cache_dir)
        return env

    def htslib_env(self) -> dict:
        env = base_env()
        env["HTS_S3_HOST"] = self.proxy_endpoint.removeprefix("http://")
        env["HTS_S3_ADDRESS_STYLE"] = "path"
        return env

    @staticmethod
    def htslib_url(key: str) -> str:
        return f"s3+http://{BUCKET}/{key}"

    @staticmethod
    def s3_uri(prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"
