"""The Python API (bams3.open), column projection, `bams3 depth` and `query -c`, against pysam
and samtools (issue #15 items 1-2, issue #14's `query -c` row).

- fetch/count on the region tests' regions (tests/test_format.py `_regions`) == pysam's, locally
  and over S3 (moto); to_arrow columns == the fields of pysam's SAM text
- a projection of pos/flag/cigar/mapq fetches <= 35% of a full read's bytes over S3 (counted
  by the proxy), and a flipped byte in a projected frame is an error, never wrong data;
  frames written without checksums are read as whole blocks and checked by their CRC-32
- `bams3 depth` == `samtools depth` over those regions and several flag/option combinations
- `query -c` and Dataset.count == `samtools view -c` (and -M), reading only edge blocks
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pysam
import pytest

import bams3
from bams3.convert import ConvertOptions, convert
from bams3.dataset import Dataset
from bams3.errors import DatasetError
from bams3.store import LocalStore, open_store
from corpus import build_corpus
from test_format import _regions

OPTS = dict(block_bytes=16 << 10, chunk_bytes=128 << 10)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from bams3.sample import make_sample

    d = tmp_path_factory.mktemp("apisim")
    paths = make_sample(d, n_pairs=8000, seed=21)
    ds = d / "ds"
    convert(paths["bam"], LocalStore(str(ds)), ConvertOptions(**OPTS))
    regions = _regions({"ds": ds}, random.Random(5))
    return {"bam": paths["bam"], "ds": ds, "dir": d, "regions": regions}


def _sam_fields(seg: pysam.AlignedSegment) -> dict:
    """The to_arrow values of a record, from pysam's SAM text."""
    f = seg.to_string().split("\t")
    star = lambda v: None if v == "*" else v  # noqa: E731
    rname = star(f[2])
    rnext = rname if f[6] == "=" else star(f[6])
    return {"qname": f[0], "flag": int(f[1]), "rname": rname, "pos": int(f[3]), "mapq": int(f[4]),
            "cigar": star(f[5]), "rnext": rnext, "pnext": int(f[7]), "tlen": int(f[8]), "seq": star(f[9]),
            "qual": star(f[10]), "tags": "\t".join(f[11:]) or None}


def _coords(ds, region: str):
    """pysam's (contig, start, stop) for a samtools region string (pysam's own region parser
    knows neither `{name}` nor `chr:-end`; the oracle is htslib's iterator either way)."""
    from bams3core.regions import MAX_END

    r = ds.dataset.parse_region(region)
    return ds.references[r.ref_id], r.beg, None if r.end == MAX_END else r.end


def _pysam_fetch(bam, coords):
    with pysam.AlignmentFile(str(bam)) as f:
        return [r.to_string() for r in f.fetch(*coords)]


# -- fetch / count / to_arrow against pysam --------------------------------------------------
def test_fetch_and_count_equal_pysam_on_the_region_tests_regions(sim):
    regions = sim["regions"]
    assert len(regions) >= 200
    nonempty = 0
    with bams3.open(str(sim["ds"])) as ds, pysam.AlignmentFile(str(sim["bam"])) as f:
        assert ds.references == f.references and ds.lengths == f.lengths
        assert ds.header.to_dict() == f.header.to_dict()
        # every 3rd region (a third of them read to the contig's end); all of them are counted
        # against samtools view -c in test_query_count_equals_samtools_and_reads_only_edge_blocks
        for reg in regions[::3]:
            if reg == "*":
                continue  # pysam's fetch has no '*' region
            want = [r.to_string() for r in f.fetch(*_coords(ds, reg))]
            got = [r.to_string() for r in ds.fetch(region=reg)]
            assert got == want, reg
            assert ds.count(region=reg) == len(want), reg
            nonempty += bool(want)
        assert nonempty > 50
        # contig/start/stop (0-based, half-open), whole contigs, no region (placed records)
        name = ds.references[0]
        for args in [(name, 999, 2000), (name, 0, 1), (name, 5000), (name,), ()]:
            want = [r.to_string() for r in f.fetch(*args)]
            assert [r.to_string() for r in ds.fetch(*args)] == want, args
            assert ds.count(*args) == f.count(*args) == len(want), args
        with pysam.AlignmentFile(str(sim["bam"])) as g:  # until_eof reads on from the file's position
            everything = [r.to_string() for r in g.fetch(until_eof=True)]
        assert [r.to_string() for r in ds.fetch(until_eof=True)] == everything
        with pytest.raises(ValueError):
            list(ds.fetch("no-such-contig", 1, 10))
        with pytest.raises(ValueError):
            list(ds.fetch(region="chr1:50-10"))
        st = ds.stats()
        assert st["records"] == len(everything)
        assert st["flagstat"] == __import__("json").loads(pysam.samtools.flagstat("-O", "json", str(sim["bam"])))
        assert ["\t".join(map(str, r)) for r in st["idxstats"]] == \
            pysam.samtools.idxstats(str(sim["bam"])).splitlines()


def test_to_arrow_values_equal_pysam(sim):
    import pyarrow as pa

    with bams3.open(str(sim["ds"])) as ds, pysam.AlignmentFile(str(sim["bam"])) as f:
        regions = [r for r in sim["regions"] if r != "*"][::12]
        for reg in regions:
            t = ds.to_arrow(reg)
            want = [_sam_fields(r) for r in f.fetch(*_coords(ds, reg))]
            assert t.to_pylist() == want, reg
        t = ds.to_arrow()  # every record, unplaced ones last, as samtools view
        with pysam.AlignmentFile(str(sim["bam"])) as g:
            assert t.to_pylist() == [_sam_fields(r) for r in g.fetch(until_eof=True)]
        assert t.schema.field("pos").type == pa.int64() and t.schema.field("flag").type == pa.uint16()
        assert t.schema.field("rname").type == pa.dictionary(pa.int32(), pa.string())
        # a projection is the same values as the full table's columns
        cols = ["pos", "flag", "cigar", "mapq"]
        reg = regions[3]
        assert ds.to_arrow(reg, columns=cols).to_pylist() == ds.to_arrow(reg).select(cols).to_pylist()
        assert ds.to_arrow(contig="chr1", start=999, stop=3000, columns=["qname"]).column("qname").to_pylist() == \
            [r.query_name for r in f.fetch("chr1", 999, 3000)]
        with pytest.raises(ValueError):
            ds.to_arrow(reg, columns=["pos", "nope"])


@pytest.fixture(scope="module")
def corpus_ds(tmp_path_factory):
    d = tmp_path_factory.mktemp("apicorpus")
    paths = build_corpus(d / "src")
    out = {}
    for name in ("tags", "seq_qual_missing", "iupac", "zero_span", "mates", "sec_supp", "long_cigar", "odd_contigs"):
        convert(paths[name], LocalStore(str(d / name)), ConvertOptions(block_bytes=4 << 10, chunk_bytes=16 << 10))
        out[name] = (paths[name], d / name)
    return out


@pytest.mark.parametrize("name", ["tags", "seq_qual_missing", "iupac", "zero_span", "mates", "sec_supp",
                                  "long_cigar", "odd_contigs"])
def test_corpus_fetch_and_arrow_equal_pysam(corpus_ds, name):
    src, path = corpus_ds[name]
    with bams3.open(str(path)) as ds, pysam.AlignmentFile(str(src)) as f:
        want = list(f.fetch(until_eof=True))
        assert [r.to_string() for r in ds.fetch(until_eof=True)] == [r.to_string() for r in want]
        got = ds.to_arrow().to_pylist()
        exp = [_sam_fields(r) for r in want]
        if name == "long_cigar":  # the cigar column holds BAM's placeholder; fetch has the real one
            assert [g["qname"] for g in got] == [e["qname"] for e in exp]
            return
        assert got == exp


# -- S3: the same answers, and projected bytes -----------------------------------------------
@pytest.fixture
def s3_sim(sim, s3_env):
    uri = s3_env.uri("api.bams3")
    convert(str(sim["bam"]), open_store(uri), ConvertOptions(**OPTS))
    return uri


def _chunk_bytes(proxy) -> tuple[int, int]:
    recs = [r for r in proxy.records if "/chunks/" in r.path and r.method == "GET"]
    return len(recs), sum(r.bytes_out for r in recs)


def test_s3_fetch_to_arrow_and_projected_bytes(sim, s3_sim, flaky_proxy):
    regions = [r for r in sim["regions"] if r != "*"][::9]
    with bams3.open(s3_sim, concurrency=4, cache=False) as ds, pysam.AlignmentFile(str(sim["bam"])) as f:
        for reg in regions:
            want = [r.to_string() for r in f.fetch(*_coords(ds, reg))]
            assert [r.to_string() for r in ds.fetch(region=reg)] == want, reg
            assert ds.count(region=reg) == len(want)
        cols = ["pos", "flag", "cigar", "mapq"]
        for reg in ("chr1:20000-60000", "chr2", "chr1:30001-31000"):
            flaky_proxy.reset()
            full = ds.to_arrow(reg)
            n_full, b_full = _chunk_bytes(flaky_proxy)
            flaky_proxy.reset()
            part = ds.to_arrow(reg, columns=cols)
            n_part, b_part = _chunk_bytes(flaky_proxy)
            assert part.to_pylist() == full.select(cols).to_pylist()
            assert part.num_rows == len(list(f.fetch(*_coords(ds, reg)))) > 0
            print(f"{reg}: projected {b_part} B in {n_part} GETs, full {b_full} B in {n_full} GETs: "
                  f"{b_part / b_full:.3f}")
            assert b_part <= 0.35 * b_full, (reg, b_part, b_full)
            assert ds.query_stats.bytes > 0


# -- integrity of partial reads --------------------------------------------------------------
def _flip_in_stream(ds_dir: Path, stream: str) -> None:
    """Flip one byte in the middle of `stream`'s frame of the first block of chr1."""
    from bams3core.codec import STREAM_INDEX

    d = Dataset.open(LocalStore(str(ds_dir)))
    row = d.index(0)[0]
    sizes = row["stream_sizes"].astype(np.int64)
    k = STREAM_INDEX[stream]
    at = int(row["offset"]) + int(sizes[:k].sum()) + int(sizes[k]) // 2
    key = ds_dir / d.manifest.chunks[int(row["chunk"])].key
    b = bytearray(key.read_bytes())
    b[at] ^= 0x20
    key.write_bytes(bytes(b))


@pytest.mark.parametrize("stream", ["pos", "cigar", "mapq"])
def test_flipped_byte_in_a_projected_frame_is_an_error(sim, tmp_path, stream):
    d = tmp_path / "ds"
    shutil.copytree(sim["ds"], d)
    _flip_in_stream(d, stream)
    with bams3.open(str(d)) as ds:
        with pytest.raises(DatasetError, match="corrupt"):
            ds.to_arrow("chr1:1-3000", columns=["pos", "flag", "cigar", "mapq"])
        with pytest.raises(DatasetError, match="checksum mismatch"):
            list(ds.fetch("chr1", 0, 3000))


def test_frames_without_checksums_are_read_whole_and_crc_checked(sim, tmp_path, monkeypatch):
    """A dataset written before frame checksums: a projection reads whole blocks (CRC-32)."""
    import bams3.dataset as dsmod
    import bams3core.codec as codec

    monkeypatch.setattr(codec, "PLAIN_STREAMS", frozenset())  # the encoder sets no checksum
    monkeypatch.setattr(dsmod, "_local", threading.local())  # fresh per-thread encoders
    old = tmp_path / "old"
    convert(str(sim["bam"]), LocalStore(str(old)), ConvertOptions(**OPTS))
    monkeypatch.undo()
    cols = ["pos", "flag", "cigar", "mapq"]
    with bams3.open(str(old)) as a, bams3.open(str(sim["ds"])) as b:
        ta = a.to_arrow("chr1:20000-40000", columns=cols)
        tb = b.to_arrow("chr1:20000-40000", columns=cols)
        assert ta.to_pylist() == tb.to_pylist()
        qa, qb = a.query_stats, b.query_stats
        assert qa.bytes > 3 * qb.bytes  # whole blocks
        assert a.dataset._frames_checked is False and b.dataset._frames_checked is True
    _flip_in_stream(old, "mapq")
    with bams3.open(str(old)) as a:
        with pytest.raises(DatasetError, match="checksum mismatch"):
            a.to_arrow("chr1:1-3000", columns=cols)


def test_concurrent_reads_from_threads(sim):
    regions = [r for r in sim["regions"] if r != "*"][:24]
    errors = []
    with bams3.open(str(sim["ds"])) as ds:
        want = {r: _pysam_fetch(sim["bam"], _coords(ds, r)) for r in regions}
        def work(part):
            try:
                for r in part:
                    assert [s.to_string() for s in ds.fetch(region=r)] == want[r], r
                    assert ds.to_arrow(r, columns=["qname"]).num_rows == len(want[r])
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
        threads = [threading.Thread(target=work, args=(regions[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


def test_import_is_cheap():
    code = ("import sys, bams3; print(sorted(m for m in ('prefect', 'boto3', 'numba', 'pyarrow', 'pysam', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- depth ---------------------------------------------------------------------------------
DEPTH_OPTIONS = [[], ["-a"], ["-Q", "30"], ["-g", "DUP,SECONDARY"], ["-q", "25"], ["-J"], ["-g", "UNMAP", "-J"],
                 ["-G", "REVERSE"], ["-a", "-Q", "1", "-q", "10", "-g", "0x400"]]


def _bams3(capsys, *args) -> str:
    from bams3.cli import main

    capsys.readouterr()
    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_depth_equals_samtools_depth(sim, capsys):
    bam, ds = str(sim["bam"]), sim["ds"]
    regions = [r for r in sim["regions"] if r != "*"][::15]
    for opts in DEPTH_OPTIONS:
        for reg in regions[:: (1 if opts in ([], ["-a"]) else 4)]:
            want = pysam.samtools.depth(*opts, "-r", reg, bam)
            assert _bams3(capsys, "depth", *opts, "-r", reg, ds) == want, (opts, reg)
    for opts in (["-aa"], ["-J", "-q", "30"]):  # the whole file
        assert _bams3(capsys, "depth", *opts, ds) == pysam.samtools.depth(*opts, bam), opts


def test_depth_corpus_edge_cases(corpus_ds, capsys):
    for name in ("zero_span", "mates", "sec_supp", "odd_contigs", "seq_qual_missing"):
        src, path = corpus_ds[name]
        for opts in ([], ["-a"], ["-g", "UNMAP,SECONDARY"], ["-J"]):
            assert _bams3(capsys, "depth", *opts, path) == pysam.samtools.depth(*opts, str(src)), (name, opts)


def test_depth_reads_only_positions_flags_mapq_cigar(sim, tmp_path):
    from bams3.depth import run_depth

    ds = Dataset.open(LocalStore(str(sim["ds"])))
    out = io.StringIO()
    run_depth(ds, ds.parse_region("chr1"), out.write)
    projected = ds.qstats.bytes
    full = Dataset.open(LocalStore(str(sim["ds"])))
    list(full.query([full.parse_region("chr1")]))
    assert projected <= 0.35 * full.qstats.bytes
    assert out.getvalue() == pysam.samtools.depth("-r", "chr1", str(sim["bam"]))


def test_depth_plot_and_errors(sim, tmp_path, capsys):
    from bams3.cli import main

    png = tmp_path / "d.png"
    out = tmp_path / "d.txt"
    assert main(["depth", "-r", "chr1:1000-30000", "--plot", str(png), "-o", str(out), str(sim["ds"])]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    assert out.read_text() == pysam.samtools.depth("-r", "chr1:1000-30000", str(sim["bam"]))
    capsys.readouterr()
    for args in (["depth", "-r", "nochr:1-5", sim["ds"]], ["depth", "--plot", png, sim["ds"]],
                 ["depth", "-r", "*", sim["ds"]], ["depth", tmp_path / "missing"]):
        assert main([str(a) for a in args]) != 0
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)
    with pytest.raises(SystemExit) as e:  # argparse's own usage error, as for every option
        main(["depth", "-g", "NOTAFLAG", str(sim["ds"])])
    assert e.value.code == 2 and "unknown flag 'NOTAFLAG'" in capsys.readouterr().err


# -- query -c ------------------------------------------------------------------------------
def test_query_count_equals_samtools_and_reads_only_edge_blocks(sim, capsys):
    bam, path = str(sim["bam"]), sim["ds"]
    ds = Dataset.open(LocalStore(str(path)))
    for reg in sim["regions"]:
        assert ds.count([ds.parse_region(reg)]) == int(pysam.samtools.view("-c", bam, reg)), reg
    regs = ["chr1:10000-20000", "chr1:15000-30000", "chr2:1-5000", "*", "chr1:1-100"]
    assert _bams3(capsys, "query", "-c", path, *regs) == pysam.samtools.view("-c", bam, *regs)
    assert _bams3(capsys, "query", "-c", "-M", path, *regs) == pysam.samtools.view("-c", "-M", bam, *regs)
    assert _bams3(capsys, "query", "-c", path) == pysam.samtools.view("-c", bam)
    # a whole contig is counted from the index: no chunk byte read
    ds = Dataset.open(LocalStore(str(path)))
    assert ds.count([ds.parse_region("chr2")]) == int(pysam.samtools.view("-c", bam, "chr2"))
    assert ds.qstats.bytes == 0
    # a 40 kb region: only its edge blocks, and only their position/flag/CIGAR streams
    reg = ds.parse_region("chr1:20000-60000")
    ds.count([reg])
    counted = ds.qstats.bytes
    full = Dataset.open(LocalStore(str(path)))
    list(full.query([reg]))
    assert 0 < counted <= 0.05 * full.qstats.bytes, (counted, full.qstats.bytes)
