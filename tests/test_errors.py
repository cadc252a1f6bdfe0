"""Bad input: one clear line on stderr, a non-zero exit, no traceback, no dataset that looks complete."""

from __future__ import annotations

import os
import shutil
import time

import pysam
import pytest

from bams3core.regions import MAX_END, Region, RegionError, parse_region
from conftest_data import run_cli


@pytest.fixture(scope="module")
def small_bam(tmp_path_factory):
    from bams3.sample import make_sample

    d = tmp_path_factory.mktemp("small")
    return make_sample(d, n_pairs=3000, seed=5)


@pytest.fixture(scope="module")
def small_ds(small_bam, tmp_path_factory):
    ds = tmp_path_factory.mktemp("sds") / "ds"
    run_cli("convert", "-q", "--chunk-size", "64K", "--block-size", "16K", small_bam["bam"], ds)
    return ds


def _one_line_error(r, *needles):
    err = r.stderr.decode()
    assert r.returncode != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _no_dataset(path):
    assert not os.path.exists(os.path.join(path, "manifest.json"))
    leftovers = [f for _, _, fs in os.walk(path) for f in fs] if os.path.exists(path) else []
    assert leftovers == [], leftovers


def test_truncated_bam(small_bam, tmp_path):
    data = open(small_bam["bam"], "rb").read()
    for cut in (len(data) // 2, len(data) - 28, 100):
        src = tmp_path / f"trunc{cut}.bam"
        src.write_bytes(data[:cut])
        out = tmp_path / f"ds{cut}"
        line = _one_line_error(run_cli("convert", "-q", src, out, check=False))
        assert "trunc" in line or "cut short" in line
        _no_dataset(out)


def test_not_sam_or_bam(tmp_path):
    src = tmp_path / "junk.bin"
    src.write_bytes(os.urandom(5000))
    _one_line_error(run_cli("convert", "-q", src, tmp_path / "ds", check=False), "not a BAM, SAM or CRAM")
    _no_dataset(tmp_path / "ds")
    r = run_cli("convert", "-q", "-", tmp_path / "ds2", input_bytes=b"hello world\nthis is text\n", check=False)
    _one_line_error(r)
    _no_dataset(tmp_path / "ds2")


def test_bad_sam_record(tmp_path):
    sam = "@SQ\tSN:c1\tLN:100\nr1\t0\tc1\tNOTANUMBER\t0\t3M\t*\t0\t0\tACG\tIII\n"
    r = run_cli("convert", "-q", "-", tmp_path / "ds", input_bytes=sam.encode(), check=False)
    _one_line_error(r, "stdin")
    _no_dataset(tmp_path / "ds")


def test_missing_input(tmp_path):
    _one_line_error(run_cli("convert", "-q", tmp_path / "nope.bam", tmp_path / "ds", check=False), "no such file")


def test_lying_sort_order(tmp_path):
    """A header that says SO:coordinate over unsorted records: sorted, with one warning line
    (tests/test_inputs.py checks the result against samtools sort)."""
    sam = ("@HD\tVN:1.6\tSO:coordinate\n@SQ\tSN:c1\tLN:1000\n"
           "r1\t0\tc1\t500\t60\t3M\t*\t0\t0\tACG\tIII\n"
           "r2\t0\tc1\t10\t60\t3M\t*\t0\t0\tACG\tIII\n")
    r = run_cli("convert", "-q", "-", tmp_path / "ds", input_bytes=sam.encode())
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "not coordinate-sorted" in lines[0], lines
    assert [ln.split("\t")[0] for ln in run_cli("query", tmp_path / "ds").stdout.decode().splitlines()] == ["r2", "r1"]


def test_existing_dataset_needs_overwrite(small_bam, small_ds, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(small_ds, ds)
    _one_line_error(run_cli("convert", "-q", small_bam["bam"], ds, check=False), "--overwrite")
    run_cli("convert", "-q", "--overwrite", small_bam["bam"], ds)
    assert len(os.listdir(ds / "data")) == 2  # the replaced run is kept as a snapshot (--keep-snapshots 1)
    run_cli("convert", "-q", "--overwrite", "--keep-snapshots", "0", small_bam["bam"], ds)
    assert len(os.listdir(ds / "data")) == 1  # the old runs were removed after the new manifest landed
    assert run_cli("verify", ds).returncode == 0


def test_bad_regions(small_ds):
    _one_line_error(run_cli("query", small_ds, "chrNope:1-100", check=False), "unknown reference")
    _one_line_error(run_cli("query", small_ds, "chr1:abc-100", check=False), "invalid region")
    _one_line_error(run_cli("query", small_ds, "chr1:500-100", check=False), "invalid region")


def test_missing_dataset(tmp_path):
    for cmd in ("query", "stats", "verify"):
        _one_line_error(run_cli(cmd, tmp_path / "nothing", check=False), "no bams3 dataset")


def test_half_written_dataset_is_not_a_dataset(small_ds, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(small_ds, ds)
    os.unlink(ds / "manifest.json")
    _one_line_error(run_cli("query", ds, check=False), "no bams3 dataset")


def test_corrupt_manifest(small_ds, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(small_ds, ds)
    (ds / "manifest.json").write_text("{not json")
    _one_line_error(run_cli("stats", ds, check=False), "manifest")


def test_flipped_byte_in_index(small_ds, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(small_ds, ds)
    idx = sorted(ds.glob("data/*/index/0.b3i"))[0]
    b = bytearray(idx.read_bytes())
    b[len(b) // 2] ^= 1
    idx.write_bytes(bytes(b))
    _one_line_error(run_cli("query", ds, "chr1:1000-2000", check=False), "corrupt index")
    assert run_cli("verify", ds, check=False).returncode != 0


def test_cram_without_reference(tmp_path, small_bam):
    cram = tmp_path / "x.cram"
    pysam.samtools.view("-C", "-T", small_bam["reference"], "-o", str(cram), small_bam["bam"], catch_stdout=False)
    os.rename(small_bam["reference"], small_bam["reference"] + ".hidden")
    try:
        r = run_cli("convert", "-q", cram, tmp_path / "ds", check=False,
                    env={"REF_PATH": ":", "REF_CACHE": str(tmp_path / "nocache")})
        _one_line_error(r)
        _no_dataset(tmp_path / "ds")
    finally:
        os.rename(small_bam["reference"] + ".hidden", small_bam["reference"])
    run_cli("convert", "-q", "--reference", small_bam["reference"], cram, tmp_path / "ds3")


# -- region syntax ---------------------------------------------------------------------
REFS = {"chr1": 0, "chr2": 1, "HLA-A*01:01": 2, "chr3:1-5": 3}


@pytest.mark.parametrize("text,want", [
    ("chr1", Region(0, 0, MAX_END)),
    ("chr1:100", Region(0, 99, MAX_END)),
    ("chr1:100-200", Region(0, 99, 200)),
    ("chr1:1,000-2,000", Region(0, 999, 2000)),
    ("chr1:-50", Region(0, 0, 50)),
    ("chr2:5-", Region(1, 4, MAX_END)),
    ("*", Region(-1, 0, MAX_END)),
    ("{HLA-A*01:01}:10-20", Region(2, 9, 20)),
    ("HLA-A*01:01", Region(2, 0, MAX_END)),
    ("{chr3:1-5}", Region(3, 0, MAX_END)),
    ("{chr3:1-5}:2-3", Region(3, 1, 3)),
])
def test_region_syntax(text, want):
    got = parse_region(text, REFS)
    assert (got.ref_id, got.beg, got.end) == (want.ref_id, want.beg, want.end)


@pytest.mark.parametrize("text", ["chrX", "chr1:a-b", "chr1:10-5", "{chr1", "{nope}:1-2"])
def test_region_errors(text):
    with pytest.raises(RegionError):
        parse_region(text, REFS)


def test_region_ambiguous_like_htslib():
    refs = {"chr3": 0, "chr3:1-5": 1}
    with pytest.raises(RegionError, match="ambiguous"):
        parse_region("chr3:1-5", refs)
    assert parse_region("{chr3:1-5}", refs).ref_id == 1
    assert parse_region("{chr3}:1-5", refs).ref_id == 0


def test_stale_leftovers_are_swept_fresh_ones_kept(small_bam, tmp_path):
    """A conversion removes what dead conversions left (older than STALE_SECONDS) on its
    background sweep, and keeps what may belong to a conversion still running."""
    out = tmp_path / "ds"
    old = [out / "data" / "0123456789abcdef" / "chunks" / "000000.b3c", out / "_tmp" / "0123456789abcdef" / "run-000000"]
    fresh = out / "data" / "fedcba9876543210" / "chunks" / "000000.b3c"
    for p in (*old, fresh):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"left over")
    two_hours_ago = time.time() - 7200
    for p in old:
        os.utime(p, (two_hours_ago, two_hours_ago))
    run_cli("convert", "-q", small_bam["bam"], out)
    assert (out / "manifest.json").exists()
    assert [p for p in old if p.exists()] == []
    assert fresh.exists()


def test_failed_sweep_fails_the_conversion_before_commit(small_bam, tmp_path):
    """The leftover sweep runs in the background; its error still stops the run: no manifest,
    and this run's objects are removed."""
    from bams3.convert import ConvertOptions, convert
    from bams3.errors import StoreError
    from bams3.store.local import LocalStore

    class ListDenied(LocalStore):
        def list_prefix(self, prefix=""):
            if prefix in ("data/", "_tmp/"):
                raise StoreError(f"{self.root}/{prefix}: access denied (ListBucket)")
            return super().list_prefix(prefix)

    out = tmp_path / "ds"
    # a dead run's leftover: the prefix is not empty, so the sweep lists the run prefixes (a
    # prefix found empty needs only the unfinished uploads listed: FORMAT.md §2.3)
    stale = out / "data" / "0123456789abcdef" / "chunks" / "000000.b3c"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left over")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    with pytest.raises(StoreError, match="access denied"):
        convert(str(small_bam["bam"]), ListDenied(str(out)), ConvertOptions(threads=2))
    assert not (out / "manifest.json").exists()
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == ["data/0123456789abcdef/chunks/000000.b3c"], left  # only what was there before
