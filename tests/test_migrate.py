"""`bams3 migrate` and the `migrate` flow: a directory of inputs -> datasets, skip, reconvert,
dry run, delete only verified sources; local and on the moto S3 server."""

from __future__ import annotations

import json
import os
import pathlib
import random

import pytest

pysam = pytest.importorskip("pysam")

from bams3.cli import main as bams3_main  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CHUNK = "16K"  # several chunk objects per input


def cli(*args) -> int:
    return bams3_main([str(a) for a in args])


def write_alignments(path: pathlib.Path, *, seed: int, sort: bool = True, n: int = 400, fmt: str = "wb") -> None:
    header = {"HD": {"VN": "1.6", "SO": "coordinate" if sort else "unsorted"},
              "SQ": [{"SN": "chr1", "LN": 100_000}, {"SN": "chr2", "LN": 50_000}]}
    rnd = random.Random(seed)
    recs = sorted((rnd.randrange(2), rnd.randrange(1, 45_000), i) for i in range(n))
    if not sort:
        rnd.shuffle(recs)
    with pysam.AlignmentFile(str(path), fmt, header=header) as f:
        for ref, pos, i in recs:
            a = pysam.AlignedSegment(f.header)
            a.query_name = f"s{seed}r{i}"
            a.reference_id, a.reference_start, a.mapping_quality = ref, pos, 60
            a.cigarstring = "60M"
            a.query_sequence = "".join(rnd.choice("ACGT") for _ in range(60))
            a.query_qualities = pysam.qualitystring_to_array("".join(chr(33 + rnd.randrange(41)) for _ in range(60)))
            a.set_tag("NM", rnd.randrange(4))
            f.write(a)


@pytest.fixture
def archive(tmp_path):
    """5 inputs: a BAM, a SAM, an unsorted BAM, a nested BAM, and an invalid .bam; plus files
    migrate must never touch (an index, a text file)."""
    src = tmp_path / "archive"
    (src / "sub" / "deeper").mkdir(parents=True)
    write_alignments(src / "a.bam", seed=1)
    pysam.index(str(src / "a.bam"))
    write_alignments(src / "b.sam", seed=2, fmt="w")
    write_alignments(src / "c.bam", seed=3, sort=False)
    write_alignments(src / "sub" / "deeper" / "d.bam", seed=4)
    (src / "bad.bam").write_bytes(b"this is not a BAM file at all\n")
    (src / "notes.txt").write_text("not an input\n")
    return src


GOOD = ["a.bam", "b.sam", "c.bam", "sub/deeper/d.bam"]


def expected_sam(path: pathlib.Path, tmp_path: pathlib.Path) -> str:
    """samtools view of the source (sorted first when the source is not)."""
    hd = pysam.samtools.view("-H", str(path))
    if "SO:coordinate" not in hd:
        out = tmp_path / (path.name + ".sorted.bam")
        pysam.samtools.sort("-o", str(out), str(path))
        path = out
    return pysam.samtools.view(str(path))


def query(uri: str, tmp_path: pathlib.Path) -> str:
    out = tmp_path / "q.sam"
    assert cli("query", "--no-cache", uri, "-o", out) == 0
    return out.read_text()


def chunk_objects(dest: str, s3_env=None) -> dict:
    """Every chunk object under ``dest`` with its modification time: a chunk written again (or
    a new one) changes this."""
    if dest.startswith("s3://"):
        prefix = dest.split("/", 3)[3] + "/"
        pages = s3_env.client().get_paginator("list_objects_v2").paginate(Bucket=s3_env.bucket, Prefix=prefix)
        return {o["Key"]: (o["LastModified"], o["ETag"]) for p in pages for o in p.get("Contents", ())
                if "/chunks/" in o["Key"]}
    out = {}
    for dirpath, _dirs, files in os.walk(dest):
        for f in files:
            p = os.path.join(dirpath, f)
            if f"{os.sep}chunks{os.sep}" in p:
                out[p] = os.stat(p).st_mtime_ns
    return out


def summary(err: str) -> str:
    return next(ln for ln in err.splitlines() if "converted," in ln)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_migrate_directory_skip_and_reconvert(where, archive, tmp_path, request, capsys):
    s3_env = request.getfixturevalue("s3_env") if where == "s3" else None
    dest = s3_env.uri("migrated") if s3_env else str(tmp_path / "migrated")
    capsys.readouterr()
    assert cli("migrate", "--chunk-size", CHUNK, archive, dest) == 1
    err = capsys.readouterr().err
    assert "bams3: migrate: 4 converted, 0 skipped, 1 failed" in err, err
    bad = [ln for ln in err.splitlines() if "failed:" in ln and "bad.bam" in ln]
    assert len(bad) == 1 and len(bad[0]) < 400 and "Traceback" not in err, err
    for rel in GOOD:
        uri = f"{dest}/{rel}.bams3"
        text = query(uri, tmp_path)
        assert text == expected_sam(archive / rel, tmp_path) and text.count("\n") == 400, rel
    with_chunks = chunk_objects(dest, s3_env)
    assert len(with_chunks) >= 4  # every dataset has its chunk(s)
    assert not any("bad.bam" in k for k in with_chunks)

    # second run: everything is skipped, not one chunk written
    assert cli("migrate", "--chunk-size", CHUNK, archive, dest) == 1
    err = capsys.readouterr().err
    assert "bams3: migrate: 0 converted, 4 skipped, 1 failed" in err, err
    assert chunk_objects(dest, s3_env) == with_chunks

    # a changed source (another size and mtime) is converted again, and only it
    write_alignments(archive / "b.sam", seed=22, n=500, fmt="w")
    assert cli("migrate", "--json", "--chunk-size", CHUNK, archive, dest) == 1
    cap = capsys.readouterr()
    assert "bams3: migrate: 1 converted, 3 skipped, 1 failed" in cap.err, cap.err
    outcomes = {o["item"]["rel"]: o for o in json.loads(cap.out)}
    assert outcomes["b.sam"]["status"] == "converted" and outcomes["b.sam"]["records"] == 500
    assert outcomes["bad.bam"]["status"] == "failed" and outcomes["bad.bam"]["reason"]
    now = chunk_objects(dest, s3_env)
    changed = {k for k in set(now) | set(with_chunks) if now.get(k) != with_chunks.get(k)}
    assert changed and all("b.sam.bams3" in k for k in changed), changed
    assert query(f"{dest}/b.sam.bams3", tmp_path) == expected_sam(archive / "b.sam", tmp_path)

    # the manifest records the source identity in `extra` (and its checksum still holds)
    from bams3.dataset import Dataset
    from bams3.store import open_store

    with open_store(f"{dest}/a.bam.bams3", use_cache=False) as st:
        m = Dataset.open(st, refresh=True).manifest
    st_a = os.stat(archive / "a.bam")
    assert m.extra["source"] == {"uri": str(archive / "a.bam"), "size": st_a.st_size, "mtime_ns": st_a.st_mtime_ns}
    assert cli("verify", f"{dest}/c.bam.bams3") == 0


def test_migrate_s3_prefix_source_skips_by_etag(s3_env, archive, tmp_path, capsys):
    c = s3_env.client()
    for p in sorted(archive.rglob("*")):
        if p.is_file():
            c.upload_file(str(p), s3_env.bucket, "in/" + p.relative_to(archive).as_posix())
    dest = str(tmp_path / "from-s3")
    capsys.readouterr()
    assert cli("migrate", "--chunk-size", CHUNK, s3_env.uri("in"), dest) == 1
    err = capsys.readouterr().err
    assert "4 converted, 0 skipped, 1 failed" in err, err
    for rel in GOOD:
        assert query(f"{dest}/{rel}.bams3", tmp_path) == expected_sam(archive / rel, tmp_path), rel
    before = chunk_objects(dest)
    assert cli("migrate", "--chunk-size", CHUNK, s3_env.uri("in"), dest) == 1
    assert "0 converted, 4 skipped, 1 failed" in capsys.readouterr().err
    assert chunk_objects(dest) == before
    # --delete-source: each S3 object is read back from S3 and compared before it is deleted
    assert cli("migrate", "--delete-source", s3_env.uri("in"), dest) == 1
    assert "0 converted, 4 skipped, 1 failed, 4 source(s) deleted" in capsys.readouterr().err
    left = {o["Key"] for o in c.list_objects_v2(Bucket=s3_env.bucket, Prefix="in/").get("Contents", ())}
    assert left == {"in/bad.bam", "in/a.bam.bai", "in/notes.txt"}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_dry_run_writes_nothing(where, archive, tmp_path, request, capsys):
    s3_env = request.getfixturevalue("s3_env") if where == "s3" else None
    dest = s3_env.uri("planned") if s3_env else str(tmp_path / "planned")
    lst = tmp_path / "list.txt"
    lst.write_text(f"# the archive\n{archive}\n")
    capsys.readouterr()
    assert cli("migrate", "--dry-run", f"@{lst}", dest) == 1  # bad.bam cannot be estimated
    out = capsys.readouterr().out
    for rel in GOOD:
        line = next(ln for ln in out.splitlines() if ln.startswith("convert\t") and ln.split("\t")[1].startswith(
            f"{archive / rel} -> {dest}/{rel}.bams3"))
        assert "MB -> ~" in line and "/month" in line, line
    assert any(ln.startswith("failed\t") and "bad.bam" in ln for ln in out.splitlines())
    assert "dry run: 4 to convert, 0 to skip, 1 failing" in out and "nothing written" in out
    if s3_env:
        assert s3_env.client().list_objects_v2(Bucket=s3_env.bucket).get("KeyCount", 0) == 0
    else:
        assert not os.path.exists(dest)


def test_delete_source_only_verified(archive, tmp_path, capsys):
    dest = tmp_path / "migrated"
    # first without deleting; then tamper with one source keeping its size and mtime, so the
    # migration skips it but the record comparison finds the difference
    assert cli("migrate", "-q", "--chunk-size", CHUNK, archive, dest) == 1
    b = archive / "b.sam"
    st = os.stat(b)
    text = b.read_text()
    i = text.index("s2r")
    b.write_text(text[:i] + "X" + text[i + 1:])  # one read name changed, same size
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    assert cli("migrate", "-q", "--delete-source", "--chunk-size", CHUNK, archive, dest) == 1
    err = capsys.readouterr().err
    assert "0 converted, 3 skipped, 2 failed, 3 source(s) deleted" in err, err
    assert any("b.sam" in ln and "differ" in ln and "source kept" in ln for ln in err.splitlines()), err
    for rel in ("a.bam", "c.bam", "sub/deeper/d.bam"):
        assert not (archive / rel).exists(), rel
        assert cli("verify", dest / f"{rel}.bams3") == 0
    # kept: the failed ones, the index next to a.bam, the unrelated file
    for rel in ("b.sam", "bad.bam", "a.bam.bai", "notes.txt"):
        assert (archive / rel).exists(), rel


def test_bad_root_is_one_line(tmp_path, capsys):
    assert cli("migrate", tmp_path / "nope", tmp_path / "out") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bams3: ") and "no such file or directory" in err[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# the flow
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    pytest.importorskip("prefect")
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings(updates={PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=60):
            yield


def _artifacts(run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))


def _task_names(run_id) -> set:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return {(r.name.split("-")[0], tuple(sorted(r.tags))) for r in runs}


def test_migrate_flow(prefect_harness, s3_env, archive, tmp_path):
    from flows import migrate

    dest = s3_env.uri("flow")
    state = migrate(sources=[str(archive)], destination=dest, chunk_size=16384, return_state=True)
    assert state.is_failed()  # bad.bam failed; the others were migrated
    assert "4 converted, 0 skipped, 1 failed" in state.message
    run_id = state.state_details.flow_run_id
    arts = _artifacts(run_id)
    prog = next(a for a in arts if a.type == "progress")
    assert float(prog.data) == pytest.approx(100.0)
    md = next(a for a in arts if a.type == "markdown").data
    assert "4 converted, 0 skipped, 1 failed" in md and "bad.bam" in md
    for rel in GOOD:
        assert query(f"{dest}/{rel}.bams3", tmp_path) == expected_sam(archive / rel, tmp_path), rel
    names = _task_names(run_id)
    assert ("shard", ("bams3-encode", "bams3-s3-upload")) in names and ("commit", ()) in names

    # the CLI sees the flow's datasets as done (same identity): nothing written again
    before = chunk_objects(dest, s3_env)
    (archive / "bad.bam").unlink()
    result = migrate(sources=[str(archive)], destination=dest, chunk_size=16384)
    assert (result["converted"], result["skipped"], result["failed"]) == (0, 4, 0)
    assert cli("migrate", archive, dest) == 0
    assert chunk_objects(dest, s3_env) == before
    # a dry run of the flow: the plan, with estimates
    plan = migrate(sources=[str(archive)], destination=dest, dry_run=True)
    assert plan["dry_run"] and sorted(o["status"] for o in plan["outcomes"]) == ["skip"] * 4
    assert all(o["estimate"]["dataset_bytes"] > 0 for o in plan["outcomes"])


def test_deployment_in_prefect_yaml():
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    dep = next(d for d in spec["deployments"] if d["name"] == "archive")
    assert dep["entrypoint"] == "flows/migrate.py:migrate"
    assert dep["work_pool"]["name"] == "bams3-pool" and not dep.get("schedules")
    from flows.migrate import migrate

    assert migrate.name == "migrate"
