"""Shared test data builders (imported by conftest fixtures and tests)."""

from __future__ import annotations

import os
import subprocess
import sys

import pysam

BAMS3 = [sys.executable, "-m", "bams3.cli"]


def run_cli(*args, stdin=None, input_bytes=None, check=True, env=None):
    """Run the real CLI in a subprocess; returns CompletedProcess (bytes)."""
    e = dict(os.environ)
    e.setdefault("BAMS3_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "bams3-test-cache"))
    if env:
        e.update(env)
    r = subprocess.run(BAMS3 + [str(a) for a in args], stdin=stdin, input=input_bytes, capture_output=True,
                       env=e, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"bams3 {' '.join(map(str, args))} failed ({r.returncode}): {r.stderr.decode()}")
    return r


def samtools_view(*args) -> str:
    return pysam.samtools.view(*[str(a) for a in args])


def samtools_sort(src, dst) -> str:
    pysam.samtools.sort("--no-PG", "-o", str(dst), str(src), catch_stdout=False)
    return str(dst)
