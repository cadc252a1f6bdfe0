"""Start-up (issue #14): what a command imports, and `bams3 warmup` filling numba's cache.

Structural checks only (modules in sys.modules, numba's cache hit/miss counters), no timings.
Every command runs in a fresh process with its own NUMBA_CACHE_DIR.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pysam
import pytest

from bams3.warmup import write_sam

ROOT = Path(__file__).resolve().parent.parent

# Runs the CLI in-process, then records which top-level packages it imported and how many kernel
# signatures numba compiled (cache misses) or loaded from its cache (hits).
PROBE = """
import json, os, sys
from bams3 import cli
sys.stdout = open(os.devnull, "w")
rc = cli.main(sys.argv[1:])
mods = sorted({m.split(".")[0] for m in sys.modules})
from bams3.warmup import cache_counts
json.dump(dict(rc=rc, mods=mods, **cache_counts()), open(os.environ["PROBE_OUT"], "w"))
"""

HEAVY = {"prefect", "flows", "tasks", "boto3", "botocore", "s3transfer", "matplotlib", "moto", "psutil"}


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "AWS_"))}
    env.update(NUMBA_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    return env


def _probe(tmp: Path, cache: Path, *argv: str) -> dict:
    out = tmp / "probe.json"
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], env=dict(_env(cache), PROBE_OUT=str(out)),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["rc"] == 0, r.stderr[-2000:]
    return res


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    """A fresh numba cache filled by `bams3 warmup`, and a small local dataset."""
    tmp = tmp_path_factory.mktemp("startup")
    cache = tmp / "numba"
    r = subprocess.run([sys.executable, "-m", "bams3.cli", "warmup", "--json"], env=_env(cache),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    sam = tmp / "in.sam"
    write_sam(str(sam), pairs=120, seed=3)
    conv = _probe(tmp, cache, "convert", "-q", str(sam), str(tmp / "ds"))
    return dict(tmp=tmp, cache=cache, report=rep, sam=sam, ds=tmp / "ds", convert=conv)


def test_warmup_fills_a_fresh_cache(warmed):
    rep = warmed["report"]
    assert rep["loaded"] == 0 and rep["compiled"] > 0  # the cache was empty: everything compiled now
    assert Path(rep["cache_dir"]).is_relative_to(warmed["cache"])
    assert list(warmed["cache"].rglob("*.nbi")) and list(warmed["cache"].rglob("*.nbc"))
    k = rep["kernels"]
    for name in ("qualcodec._encode_kernel", "qualcodec._decode_kernel", "kernels.split_records_kernel",
                 "kernels.gather_kernel", "kernels.parse_tags_kernel", "kernels.find_mates_kernel",
                 "kernels.flagstat_kernel", "kernels.name_field_kernel"):
        assert k[f"bams3core.{name}"] >= 1, name
    # a convert after warmup compiles nothing either
    assert warmed["convert"]["compiled"] == 0 and warmed["convert"]["loaded"] > 0


def test_query_after_warmup_compiles_nothing_and_matches_samtools(warmed):
    tmp, cache = warmed["tmp"], warmed["cache"]
    out = tmp / "q.sam"
    res = _probe(tmp, cache, "query", "-o", str(out), str(warmed["ds"]))
    assert res["compiled"] == 0, "query compiled kernels although bams3 warmup had cached them"
    assert res["loaded"] > 0
    assert out.read_bytes() == pysam.samtools.view(str(warmed["sam"])).encode()
    # a second warmup finds everything in the cache
    r = subprocess.run([sys.executable, "-m", "bams3.cli", "warmup", "--json"], env=_env(cache),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads(r.stdout)
    assert again["compiled"] == 0 and again["loaded"] > 0


def test_local_query_imports_no_orchestration_or_s3(warmed):
    tmp, cache, ds = warmed["tmp"], warmed["cache"], str(warmed["ds"])
    res = _probe(tmp, cache, "query", "-o", str(tmp / "r.sam"), ds, "chrW1:1000-9000")
    assert not HEAVY & set(res["mods"]), HEAVY & set(res["mods"])
    assert res["compiled"] == 0
    # what decodes no block imports no numba at all
    for argv in (["query", "-H", ds], ["stats", ds], ["log", ds]):
        res = _probe(tmp, cache, *argv)
        assert not (HEAVY | {"numba", "llvmlite"}) & set(res["mods"]), (argv, res["mods"])
        assert res["compiled"] == res["loaded"] == 0


# A query's compiled signatures per kernel, numba's cache hits, and what the first block compiled where.
PROBE_SIGS = """
import json, os, sys
from bams3 import cli, warmup
sys.stdout = open(os.devnull, "w")
rc = cli.main(sys.argv[1:])
p = warmup._PARALLEL
if p is not None and p.proc is not None:
    p.proc.wait()
sigs = {n: [str(s) for s in d.signatures] for n, d in warmup.loaded_dispatchers()}
hits = {n: sum(d.stats.cache_hits.values()) for n, d in warmup.loaded_dispatchers()}
json.dump(dict(rc=rc, sigs=sigs, hits=hits, last=p.last, helper_rc=p.proc.returncode if p.proc else None,
               **warmup.cache_counts()), open(os.environ["PROBE_OUT"], "w"))
"""


def test_first_query_compiles_the_declared_signatures_on_two_cores(warmed, tmp_path):
    """A fresh install's first query compiles each decoder kernel once, with the signature
    bams3core.jit declares (so a helper process can compile it ahead, by signature), part of
    them in that helper (loaded from the cache here); the next query compiles nothing."""
    from bams3core.jit import declared_signatures

    cache, out, ds = tmp_path / "numba", tmp_path / "out.json", str(warmed["ds"])
    env = dict(_env(cache), PROBE_OUT=str(out))
    sam = tmp_path / "q.sam"
    r = subprocess.run([sys.executable, "-c", PROBE_SIGS, "query", "-o", str(sam), ds], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["rc"] == 0
    assert sam.read_bytes() == pysam.samtools.view(str(warmed["sam"])).encode()
    declared = {n: str(s) for n, s in declared_signatures().items()}
    last = res["last"]
    assert last["own"] and last["helper"], last  # both halves, on two cores
    assert res["helper_rc"] == 0
    for name in last["own"] + last["helper"]:
        assert res["sigs"][name] == [declared[name]], (name, res["sigs"][name])
    for name in last["helper"]:
        assert res["hits"][name] == 1, name  # compiled by the helper, loaded from the cache here
    # nothing else of the decoders was compiled twice, and the next query compiles nothing
    assert all(len(v) <= 1 for v in res["sigs"].values()), res["sigs"]
    r = subprocess.run([sys.executable, "-c", PROBE_SIGS, "query", "-o", str(sam), ds, "chrW1:1000-9000"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads(out.read_text())
    assert again["compiled"] == 0 and again["loaded"] >= len(last["own"] + last["helper"])
    assert again["last"] == {}  # everything was cached: no helper


def test_numba_cache_falls_back_to_a_writable_dir(tmp_path, monkeypatch):
    """No writable place among numba's own (read-only install, no writable home): a per-user
    directory under TMPDIR, instead of numba refusing to define cached kernels."""
    from bams3core import jit

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(blocker / "numba"))  # under a file: not creatable
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
    assert jit.numba_cache_candidates()[0] == str(blocker / "numba")
    assert jit.numba_cache_candidates()[2] == str(blocker / "cache" / "numba")
    writable_tree = jit.fallback_cache_dir()
    assert writable_tree is None  # the in-tree __pycache__ is writable here
    real = jit.numba_cache_candidates
    monkeypatch.setattr(jit, "numba_cache_candidates", lambda: [p for p in real() if p.startswith(str(blocker))])
    monkeypatch.setattr(jit.tempfile, "tempdir", str(tmp_path / "tmp"))
    d = jit.fallback_cache_dir()
    assert d is not None and d.startswith(str(tmp_path / "tmp")) and os.access(d, os.W_OK)
