"""The CLI never hangs, and a user's mistake is one line and exit 1 (issue #13, items 4-6).

- A closed stdout (`bams3 query DS | head`) ends the process as it ends samtools: killed by
  SIGPIPE, nothing on stderr, within seconds (it used to hang: the thread feeding htslib
  through an internal pipe blocked on a reader that was gone).
- An output that cannot be written is reported before any work, in one line.
- A BAM file where a dataset is expected, an access key without a secret, a missing bucket,
  a corrupt chunk on S3: one line that says what is wrong.
"""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import threading
import time

import pytest

from conftest_data import BAMS3, run_cli

HANG_SECONDS = 10  # to exit once stdout is closed (samtools: at once)
START_SECONDS = 120  # to start and print the first bytes, on a loaded machine


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Output far larger than every pipe buffer on the way (stdout 64K, internal pipe 1M +
    the feeder's 1M buffer): 8,000 pairs, ~5 MB of raw BAM records, ~7 MB of SAM."""
    from bams3.sample import make_sample

    d = tmp_path_factory.mktemp("pipes")
    paths = make_sample(d, n_pairs=8000, seed=5)
    ds = d / "ds"
    run_cli("convert", "-q", "--chunk-size", "256K", paths["bam"], ds)
    return {"bam": paths["bam"], "ds": ds}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from bams3.sample import make_sample

    d = tmp_path_factory.mktemp("mistakes")
    paths = make_sample(d, n_pairs=1500, seed=3)
    ds = d / "ds"
    run_cli("convert", "-q", "--chunk-size", "64K", "--block-size", "16K", paths["bam"], ds)
    return {"bam": paths["bam"], "ds": ds}


def _env(**changes):
    e = dict(os.environ)
    e.setdefault("BAMS3_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "bams3-test-cache"))
    for k, v in changes.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return e


def _read_then_close(args, nbytes=100, env=None):
    """Run bams3, read ``nbytes`` of its stdout, close the pipe (like `| head -c`), and wait at
    most HANG_SECONDS for it to end (killed and failed otherwise). Returns (returncode, head,
    stderr, seconds from the close to the exit)."""
    p = subprocess.Popen(BAMS3 + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env or _env())
    watchdog = threading.Timer(START_SECONDS, p.kill)  # a hang before any output
    watchdog.start()
    try:
        head = p.stdout.read(nbytes)
    finally:
        watchdog.cancel()
    p.stdout.close()
    t0 = time.monotonic()
    try:
        rc = p.wait(timeout=HANG_SECONDS)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        pytest.fail(f"bams3 {' '.join(map(str, args))} hung after its stdout was closed "
                    f"({p.stderr.read()!r})")
    return rc, head, p.stderr.read(), time.monotonic() - t0


def _assert_sigpipe(rc, head, err, nbytes=100):
    assert len(head) == nbytes
    assert err == b"", err  # no BrokenPipeError, no "Exception ignored", no htslib message
    assert rc == -signal.SIGPIPE, rc  # what `samtools view big.bam | head -1` does (141 in a shell)


def _one_line_error(r, *needles):
    err = r.stderr.decode()
    assert r.returncode == 1, (r.returncode, err)
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# -- a closed stdout --------------------------------------------------------------------
@pytest.mark.parametrize("args", [["query", "{ds}"], ["query", "{ds}", "chr1"], ["export", "{ds}", "-"],
                                  ["query", "-b", "-o", "-", "{ds}"]],
                         ids=["query", "query-region", "export", "query-b"])
def test_closed_stdout_ends_quietly(big, args):
    rc, head, err, _ = _read_then_close([a.format(ds=big["ds"]) for a in args])
    _assert_sigpipe(rc, head, err)


def test_closed_stdout_in_a_shell_pipe(big):
    """The same through a real shell pipeline: `bams3 query DS | head -1`."""
    cmd = (f"timeout -s KILL {START_SECONDS} " + " ".join(BAMS3 + ["query", str(big["ds"])])
           + " 2>err.txt | head -1 >/dev/null; echo ${PIPESTATUS[0]}")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, timeout=2 * START_SECONDS, env=_env(),
                       cwd=big["ds"].parent)
    assert r.stdout.strip() != b"137", "hung (killed by timeout)"
    assert r.stdout.strip() == b"141"  # as samtools: killed by SIGPIPE (128 + 13)
    assert (big["ds"].parent / "err.txt").read_bytes() == b""


def test_closed_stdout_on_s3(big, s3_env):
    """The dataset on S3 (fetches run on a thread pool while the feeder blocks)."""
    c = s3_env.client()
    for root, _dirs, files in os.walk(big["ds"]):
        for f in files:
            path = os.path.join(root, f)
            c.upload_file(path, s3_env.bucket, "ds/" + os.path.relpath(path, big["ds"]))
    for args in (["query", s3_env.uri("ds")], ["export", s3_env.uri("ds"), "-"]):
        rc, head, err, _ = _read_then_close(args)
        _assert_sigpipe(rc, head, err)


def test_reader_that_stops_early_stops_the_feeder(big):
    """Library use: leaving open_segments early (an error in the consumer) ends the thread
    that writes into the internal pipe; the consumer's error is the one raised."""
    from bams3.dataset import Dataset
    from bams3.output import open_segments
    from bams3.store import LocalStore

    ds = Dataset.open(LocalStore(str(big["ds"])))
    with pytest.raises(ZeroDivisionError):
        with open_segments(ds.bam_header(), ds.query(None)) as af:
            next(iter(af))
            t0 = time.monotonic()
            1 / 0
    assert time.monotonic() - t0 < HANG_SECONDS
    deadline = time.monotonic() + HANG_SECONDS
    while any(t.name == "bams3-feeder" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "bams3-feeder" for t in threading.enumerate())


def test_feeder_error_wins(small):
    """A failure while producing records (a corrupt chunk...) is what the reader reports."""
    from bams3.dataset import Dataset
    from bams3.errors import DatasetError
    from bams3.output import write_sam
    from bams3.store import LocalStore

    ds = Dataset.open(LocalStore(str(small["ds"])))

    def batches():
        it = ds.query(None)
        yield next(it)
        raise DatasetError("chunk 1: checksum mismatch")

    with pytest.raises(DatasetError, match="checksum mismatch"):
        write_sam(ds.bam_header(), batches(), io.BytesIO(), with_header=False)


# -- outputs that cannot be written -----------------------------------------------------
def _unwritable_dir(tmp_path, kind):
    if kind == "missing":
        return tmp_path / "missing" / "dir"
    if kind == "under-a-file":
        (tmp_path / "afile").write_text("x")
        return tmp_path / "afile"
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(d, os.W_OK):  # root writes anyway; "under-a-file" covers that case
        d.chmod(0o755)
        pytest.skip("a read-only directory is writable for this user (root)")
    return d


@pytest.mark.parametrize("kind", ["missing", "read-only", "under-a-file"])
def test_export_into_unwritable_dir(small, tmp_path, kind):
    d = _unwritable_dir(tmp_path, kind)
    try:
        r = subprocess.run(BAMS3 + ["export", str(small["ds"]), str(d / "out.bam")], capture_output=True,
                           env=_env(), timeout=START_SECONDS)  # it used to hang after htslib's message
        _one_line_error(r, str(d / "out.bam"), "cannot write")
        # checked before any work: the dataset is not even opened
        r = run_cli("export", tmp_path / "no-dataset", d / "out.bam", check=False)
        _one_line_error(r, str(d / "out.bam"))
    finally:
        if kind == "read-only":
            d.chmod(0o755)


@pytest.mark.parametrize("opts", [["-o"], ["-b", "-o"], ["-c", "-o"], ["-H", "-o"]], ids=" ".join)
def test_query_output_into_missing_dir(small, tmp_path, opts):
    out = tmp_path / "missing" / "x.out"
    _one_line_error(run_cli("query", *opts, out, small["ds"], check=False), str(out), "does not exist")


def test_export_keeps_an_existing_file_when_the_dataset_is_missing(tmp_path):
    out = tmp_path / "keep.bam"
    out.write_bytes(b"precious")
    _one_line_error(run_cli("export", tmp_path / "nothing", out, check=False), "no bams3 dataset")
    assert out.read_bytes() == b"precious"
    r = run_cli("export", tmp_path / "nothing", tmp_path / "new.bam", check=False)
    assert r.returncode == 1 and not (tmp_path / "new.bam").exists()


# -- mistakes that used to be "internal error" (exit 70) ---------------------------------
@pytest.mark.parametrize("cmd", [["query"], ["stats"], ["verify"], ["export", "{tmp}/out.bam"]], ids=lambda c: c[0])
def test_bam_file_given_as_dataset(small, tmp_path, cmd):
    args = [cmd[0], small["bam"]] + [a.format(tmp=tmp_path) for a in cmd[1:]]
    _one_line_error(run_cli(*args, check=False), str(small["bam"]), "not a bams3 dataset")


def test_local_store_under_a_file_is_not_found(small):
    from bams3.dataset import Dataset
    from bams3.errors import DatasetError
    from bams3.store import LocalStore

    with pytest.raises(DatasetError, match="no bams3 dataset"):
        Dataset.open(LocalStore(str(small["bam"])))


def test_local_manifest_race_says_overwrite(tmp_path):
    from bams3.errors import PreconditionFailed
    from bams3.store import LocalStore

    st = LocalStore(str(tmp_path / "ds"))
    st.set("manifest.json", b"{}", if_none_match=True)
    with pytest.raises(PreconditionFailed, match="already exists; use --overwrite"):
        st.set("manifest.json", b"{}", if_none_match=True)


def test_access_key_without_secret(small, s3_env):
    uri = s3_env.uri("ds")
    for args in (["stats", uri], ["query", uri], ["convert", "-q", small["bam"], uri]):
        r = subprocess.run(BAMS3 + [str(a) for a in args], capture_output=True, timeout=120,
                           env=_env(AWS_SECRET_ACCESS_KEY=None))
        _one_line_error(r, "AWS_SECRET_ACCESS_KEY")


# -- S3: name the problem ----------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["query", "stats", "export", "verify", "convert", "cleanup",
                                 "cleanup-dry", "lifecycle", "lifecycle-apply", "cost", "cost-bam",
                                 "restore"])
def test_missing_bucket(small, s3_env, tmp_path, cmd):
    uri = f"s3://no-such-bucket-{os.getpid()}/ds"
    args = {"export": ["export", uri, tmp_path / "o.bam"],
            "convert": ["convert", "-q", small["bam"], uri],
            "cleanup-dry": ["cleanup", "--dry-run", uri],
            "lifecycle-apply": ["lifecycle", uri, "--apply"],
            "cost-bam": ["cost", uri + ".bam"]}.get(cmd, [cmd, uri])
    line = _one_line_error(run_cli(*args, check=False), f"no-such-bucket-{os.getpid()}", "bucket does not exist")
    assert "no bams3 dataset" not in line


def test_corrupt_chunk_on_s3(small, s3_env):
    uri = s3_env.uri("ds")
    run_cli("convert", "-q", "--chunk-size", "64K", "--block-size", "16K", small["bam"], uri)
    c = s3_env.client()
    keys = sorted(o["Key"] for o in c.list_objects_v2(Bucket=s3_env.bucket, Prefix="ds/")["Contents"]
                  if o["Key"].endswith(".b3c"))
    key = keys[0]
    data = bytearray(c.get_object(Bucket=s3_env.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    c.put_object(Bucket=s3_env.bucket, Key=key, Body=bytes(data))
    for args in (["query", uri], ["export", uri, "-"]):
        r = run_cli(*args, check=False)
        line = _one_line_error(r, key, "checksum")
        assert "rewritten" not in line
    assert run_cli("verify", uri, check=False).returncode == 1


def test_a_failed_command_never_hangs_at_exit(tmp_path):
    """The interpreter's exit joins threads; one that never ends (a process pool's manager
    thread stuck after a signal at the wrong moment, say) must not hold a failed or interrupted
    command's process: it ends with its status after the grace period."""
    import sys

    code = ("import sys, threading; from bams3 import cli; cli.EXIT_GRACE = 0.5; "
            "threading.Thread(target=threading.Event().wait, name='stuck').start(); sys.exit(cli.main())")
    r = subprocess.run([sys.executable, "-c", code, "convert", str(tmp_path / "missing.bam"), str(tmp_path / "ds")],
                       capture_output=True, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 1 and "missing.bam" in err and err.count("\n") == 1, err
