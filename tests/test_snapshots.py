"""Snapshots (docs/FORMAT.md §2.6) and coherent readers (§2.3).

Every commit is a snapshot named by its run id; `--overwrite` keeps `--keep-snapshots` previous
ones (and their objects) readable: `bams3 log` lists them, `--snapshot RUN_ID` reads one,
`bams3 rollback` makes one current with a conditional write, and no sweep or cleanup removes a
retained snapshot's run. A reader whose cached manifest names a run removed meanwhile re-reads
the manifest and finishes on one whole snapshot.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from conftest_data import run_cli, samtools_view

OLD = 2 * 3600.0  # older than layout.STALE_SECONDS


@pytest.fixture(scope="module")
def two_bams(tmp_path_factory):
    from bams3.sample import make_sample

    d = tmp_path_factory.mktemp("snapshots")
    a = make_sample(d / "a", n_pairs=400, seed=11)
    b = make_sample(d / "b", n_pairs=500, seed=12)
    return {"a": a["bam"], "b": b["bam"], "a_sam": samtools_view(a["bam"]), "b_sam": samtools_view(b["bam"])}


def _log(ds, **kw) -> list[dict]:
    return json.loads(run_cli("log", "--json", ds, **kw).stdout)


def _count(ds, *extra, **kw) -> int:
    return int(run_cli("query", "-c", ds, *extra, **kw).stdout)


def _one_line(r, needle: str) -> None:
    err = r.stderr.decode()
    assert r.returncode == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err, err


def _records(sam: str) -> str:
    return "".join(line + "\n" for line in sam.splitlines() if not line.startswith("@"))


# ---------------------------------------------------------------------------------------------
# the layout and the retention (pure)
# ---------------------------------------------------------------------------------------------
def test_snapshot_keys_are_in_the_layout_and_never_swept():
    from bams3core import layout

    run = "0123456789abcdef"
    assert layout.classify(f"snapshots/{run}.json") == layout.KeyKind("snapshot", run)
    assert layout.snapshot_key(run) == f"snapshots/{run}.json" and layout.snapshot_run(f"snapshots/{run}.json") == run
    assert layout.classify("snapshots/notes.json") is None and layout.classify(f"snapshots/{run}.json.bak") is None
    objs = [layout.Listed(f"snapshots/{run}.json", 0.0), layout.Listed(f"data/{run}/chunks/000000.b3c", 0.0)]
    plan = layout.plan_removal(objs, [], now=1e9, committed=set())
    assert plan.objects == [f"data/{run}/chunks/000000.b3c"]  # the run alone is dead; its snapshot is not swept
    assert not layout.plan_removal(objs, [], now=1e9, committed={run})


def test_retention_keeps_the_current_the_previous_and_the_newest():
    from bams3core.layout import Snapshot, retained

    snaps = [Snapshot("a" * 16, 100.0), Snapshot("b" * 16, 300.0), Snapshot("c" * 16, 200.0),
             Snapshot("d" * 16, 400.0)]
    assert retained(snaps, current="d" * 16, previous="a" * 16, keep=1) == {"d" * 16, "a" * 16}
    assert retained(snaps, current="d" * 16, previous="a" * 16, keep=2) == {"d" * 16, "a" * 16, "b" * 16}
    assert retained(snaps, current="d" * 16, previous=None, keep=0) == {"d" * 16}
    assert retained(snaps, current="d" * 16, keep=0, keep_days=150 / 86400, now=400.0) == {"d" * 16, "b" * 16}


# ---------------------------------------------------------------------------------------------
# log / --snapshot / rollback
# ---------------------------------------------------------------------------------------------
def _round_trip(ds, bams, **kw):
    run_cli("convert", "-q", bams["a"], ds, **kw)
    run_cli("convert", "-q", "--overwrite", bams["b"], ds, **kw)
    log = _log(ds, **kw)
    assert [e["current"] for e in log] == [True, False], log
    new, old = log
    assert {"run_id", "time", "records", "bytes", "source", "current"} <= set(new)
    na, nb = len(_records(bams["a_sam"]).splitlines()), len(_records(bams["b_sam"]).splitlines())
    assert (old["records"], new["records"]) == (na, nb) and old["source"].endswith("a/sample.bam")
    assert _count(ds, **kw) == nb
    assert _count(ds, "--snapshot", old["run_id"], **kw) == na
    assert run_cli("query", ds, "--snapshot", old["run_id"], **kw).stdout.decode() == _records(bams["a_sam"])
    st = json.loads(run_cli("stats", "--json", ds, "--snapshot", old["run_id"], **kw).stdout)
    assert st["records"] == na
    assert b"OK" in run_cli("verify", ds, "--snapshot", old["run_id"], **kw).stdout
    _one_line(run_cli("query", "-c", ds, "--snapshot", "0" * 16, check=False, **kw), "no snapshot 0000000000000000")
    _one_line(run_cli("rollback", ds, "nothex", check=False, **kw), "not a snapshot")

    run_cli("rollback", ds, old["run_id"], **kw)
    assert _count(ds, "--refresh", **kw) == na
    log2 = _log(ds, **kw)
    assert {e["run_id"]: e["current"] for e in log2} == {old["run_id"]: True, new["run_id"]: False}
    assert _count(ds, "--snapshot", new["run_id"], **kw) == nb
    assert b"OK" in run_cli("verify", ds, **kw).stdout
    # after a rollback the snapshot replaced is the previous one: the next overwrite keeps it
    run_cli("convert", "-q", "--overwrite", bams["b"], ds, **kw)
    assert {e["run_id"] for e in _log(ds, **kw)} - {old["run_id"], new["run_id"]}
    assert old["run_id"] in {e["run_id"] for e in _log(ds, **kw)}
    return old, new


def test_log_snapshot_rollback_round_trip_local(two_bams, tmp_path):
    _round_trip(tmp_path / "ds", two_bams)


def test_log_snapshot_rollback_round_trip_s3(two_bams, s3_env):
    _round_trip(s3_env.uri("snap/ds"), two_bams)


def test_rollback_is_conditional(two_bams, tmp_path, monkeypatch):
    """A rollback replaces exactly the manifest it read: a commit in between makes it fail."""
    from bams3 import snapshots
    from bams3.errors import PreconditionFailed
    from bams3.store import LocalStore

    ds = tmp_path / "ds"
    run_cli("convert", "-q", two_bams["a"], ds)
    run_cli("convert", "-q", "--overwrite", two_bams["b"], ds)
    old = _log(ds)[1]["run_id"]
    store = LocalStore(str(ds))
    real = snapshots.read_snapshot

    def read_then_commit(st, run_id):
        out = real(st, run_id)
        run_cli("convert", "-q", "--overwrite", "--keep-snapshots", "3", two_bams["a"], ds)  # another machine
        return out

    monkeypatch.setattr(snapshots, "read_snapshot", read_then_commit)
    before = (ds / "manifest.json").read_bytes()
    with pytest.raises(PreconditionFailed, match="another commit"):
        snapshots.rollback(store, old)
    assert (ds / "manifest.json").read_bytes() != before  # the other commit stands
    assert json.loads((ds / "manifest.json").read_text())["run_id"] != old


# ---------------------------------------------------------------------------------------------
# retention and protection
# ---------------------------------------------------------------------------------------------
def test_keep_snapshots_removes_exactly_the_runs_beyond_it(two_bams, tmp_path):
    ds = tmp_path / "ds"
    run_cli("convert", "-q", two_bams["a"], ds)
    for i in range(3):
        run_cli("convert", "-q", "--overwrite", "--keep-snapshots", "2", two_bams["ab"[i % 2]], ds)
        time.sleep(0.05)
    log = _log(ds)
    runs = [e["run_id"] for e in log]
    assert len(runs) == 3 and log[0]["current"]
    assert sorted(os.listdir(ds / "data")) == sorted(runs)
    assert sorted(os.listdir(ds / "snapshots")) == sorted(f"{r}.json" for r in runs)
    for r in runs[1:]:
        assert b"OK" in run_cli("verify", ds, "--snapshot", r).stdout
    # the retention counts from the newest: keep 1 leaves the current and the one it replaced
    run_cli("convert", "-q", "--overwrite", "--keep-snapshots", "1", two_bams["a"], ds)
    runs2 = [e["run_id"] for e in _log(ds)]
    assert len(runs2) == 2 and runs2[1] == runs[0]
    assert sorted(os.listdir(ds / "data")) == sorted(runs2)
    # keep 0: only the current commit stays
    run_cli("convert", "-q", "--overwrite", "--keep-snapshots", "0", two_bams["b"], ds)
    runs3 = [e["run_id"] for e in _log(ds)]
    assert len(runs3) == 1 and os.listdir(ds / "data") == runs3 and os.listdir(ds / "snapshots") == [f"{runs3[0]}.json"]
    assert _count(ds) == len(_records(two_bams["b_sam"]).splitlines())
    _one_line(run_cli("log", "--json", tmp_path / "nope", check=False), "no such directory")


def test_keep_days_keeps_young_snapshots(two_bams, tmp_path):
    ds = tmp_path / "ds"
    run_cli("convert", "-q", two_bams["a"], ds)
    for bam in ("b", "a", "b"):
        run_cli("convert", "-q", "--overwrite", "--keep-snapshots", "0", "--keep-days", "1", two_bams[bam], ds)
    assert len(_log(ds)) == 4 and len(os.listdir(ds / "data")) == 4


def _age_run(ds, run: str) -> None:
    t = time.time() - OLD
    for d, _, fs in os.walk(ds / "data" / run):
        for f in fs:
            os.utime(os.path.join(d, f), (t, t))
    os.utime(ds / "snapshots" / f"{run}.json", (t, t))


def test_sweep_and_cleanup_never_remove_a_retained_snapshots_run(two_bams, tmp_path):
    """A retained snapshot's run has no lease and old objects, like a dead run; it is kept."""
    ds = tmp_path / "ds"
    run_cli("convert", "-q", two_bams["a"], ds)
    run_cli("convert", "-q", "--overwrite", two_bams["b"], ds)
    old = _log(ds)[1]["run_id"]
    _age_run(ds, old)
    dead = "0123456789abcdef"
    p = ds / "data" / dead / "chunks" / "000000.b3c"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"x")
    os.utime(p, (time.time() - OLD, time.time() - OLD))
    r = run_cli("cleanup", ds)
    assert r.stdout.decode().split() == [str(p)]  # the dead run alone
    assert (ds / "data" / old).is_dir() and not p.exists()
    # a conversion's sweep (a new dataset's run alongside: --keep-snapshots 2 keeps `old`)
    run_cli("convert", "-q", "--overwrite", "--keep-snapshots", "2", two_bams["a"], ds)
    assert old in [e["run_id"] for e in _log(ds)]
    assert b"OK" in run_cli("verify", ds, "--snapshot", old).stdout
    from bams3.runs import find_leftovers
    from bams3.store import LocalStore

    assert not find_leftovers(LocalStore(str(ds)))


# ---------------------------------------------------------------------------------------------
# coherent readers: machine A reads with a warm cache while machine B overwrites
# ---------------------------------------------------------------------------------------------
def _query_on(uri: str, cache_dir: str, regions=None) -> str:
    """`bams3 query` as machine A runs it: a fresh store on its own (warm) metadata cache."""
    import io

    from bams3.dataset import Dataset
    from bams3.export import write_sam_any
    from bams3.store import open_store

    with open_store(uri, cache_dir=cache_dir) as store:
        ds = Dataset.open(store)
        regs = [ds.parse_region(r) for r in regions] if regions else None
        out = io.BytesIO()
        write_sam_any(ds.header, ds.query(regs), out, wide=ds.wide, with_header=False, pg_line=None)
        return out.getvalue().decode()


@pytest.mark.parametrize("keep", [1, 0])
def test_reader_and_overwriter_interleaved_see_whole_snapshots(two_bams, s3_env, tmp_path, keep):
    """Machine B overwrites (its own cache dir, on a thread) while machine A queries with a warm
    cache whose manifest may name a run B's retention removed: every query is one whole
    snapshot's records, never an error."""
    import threading

    from bams3.convert import ConvertOptions, convert
    from bams3.store import open_store

    uri = s3_env.uri("coherent/ds")
    cache_a, cache_b = str(tmp_path / "cache-a"), str(tmp_path / "cache-b")
    want = {_records(two_bams["a_sam"]): "a", _records(two_bams["b_sam"]): "b"}

    def write(bam, overwrite=True):
        with open_store(uri, cache_dir=cache_b) as store:
            convert(str(two_bams[bam]), store, ConvertOptions(overwrite=overwrite, keep_snapshots=keep))

    write("a", overwrite=False)
    assert _query_on(uri, cache_a) in want  # warms A's cache
    t0 = time.time()
    seen = []
    for i in range(20):
        writer = threading.Thread(target=write, args=("bab"[i % 3],))
        writer.start()
        writer.join()
        out = _query_on(uri, cache_a)  # raises on any error
        assert out in want, f"round {i}: not one whole snapshot ({len(out.splitlines())} records)"
        seen.append(want[out])
        region = _query_on(uri, cache_a, ["chr1:1-100000"])
        assert region and any(region in w for w in want)
    assert set(seen) == {"a", "b"}, seen  # the reader did move on to newer commits
    # no hang: 20 rounds take ~10 s alone, ~80 s on a 2-core machine shared with other work
    assert time.time() - t0 < 300
