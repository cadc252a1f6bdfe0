"""Format v1.1: SAM with positions, mate positions, TLEN and reference lengths beyond 2^31
(issue #10 item 2). The oracle is samtools (htslib >= 1.10 reads and prints such SAM)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pysam
import pytest

from bams3core.bam import RecordBatch, WIDE_FIXED_DTYPE, WIDE_FIXED_SIZE, fits_bam, to_bam_layout
from bams3.dataset import Dataset
from bams3.store import LocalStore
import bams3core.codec as codec
from bams3core.codec import CODECS_V1, BlockEncoder, decode_block
from bams3core.index import (ENTRY_DTYPE_WIDE, IndexError_, Manifest, check_version, decode_index,
                             encode_index)
from conftest_data import run_cli

BIG = 3_000_000_000


def big_sam() -> str:
    """Unsorted SAM: reference `big` of 3e9 bp, pairs around 2^31 and up to 3e9 (mates and TLEN
    beyond 2^31 too), a small reference and an unplaced read. Deterministic."""
    lines = ["@HD\tVN:1.6\tSO:unsorted", f"@SQ\tSN:big\tLN:{BIG}", "@SQ\tSN:small\tLN:100000"]
    bases = "ACGT"
    for i in range(150):
        p = [1 + (i * 37) % 1000, (1 << 31) - 200 + (i * 7) % 400, 2_500_000_000 + i * 3_300_017][i % 3]
        mp = [2_600_000_000 + i * 1_000_003, 1 + (i * 11) % 900, p + 300][i % 3]
        tl = mp - p + (60 if mp >= p else -60)
        seq = "".join(bases[(i * 5 + k * 3) % 4] for k in range(60))
        qual = "".join(chr(33 + (i + 2 * k) % 41) for k in range(60))
        lines.append(f"q{i}\t99\tbig\t{p}\t{i % 61}\t60M\t=\t{mp}\t{tl}\t{seq}\t{qual}\tNM:i:{i % 4}\tXS:Z:x{i}")
        lines.append(f"q{i}\t147\tbig\t{mp}\t{i % 61}\t25M1D35M\t=\t{p}\t{-tl}\t{seq}\t*\tAS:i:-{i}")
    lines.append("s1\t0\tsmall\t500\t30\t4M\t*\t0\t0\tACGT\tIIII")
    lines.append("s2\t16\tbig\t2999999000\t30\t4M\t*\t0\t0\tACGT\tIIII")
    lines.append("u1\t4\t*\t0\t0\t*\t*\t0\t0\tACGT\t*")
    return "\n".join(lines) + "\n"


def ordinary_sam() -> str:
    """A fixed small SAM of ordinary data (positions far below 2^31), unsorted."""
    lines = ["@HD\tVN:1.6\tSO:unsorted", "@SQ\tSN:chr1\tLN:248956422", "@SQ\tSN:chrM\tLN:16569"]
    bases = "ACGT"
    for i in range(120):
        p = 1 + (i * 7919) % 200000
        mp = p + 150 + (i * 31) % 300
        seq = "".join(bases[(i * 13 + k * 7) % 4] for k in range(60))
        qual = "".join(chr(33 + (i + k) % 41) for k in range(60))
        tl = mp + 59 - p + 1
        lines.append(f"p{i}\t99\tchr1\t{p}\t{i % 61}\t60M\t=\t{mp}\t{tl}\t{seq}\t{qual}\tNM:i:{i % 3}\tRG:Z:g1")
        lines.append(f"p{i}\t147\tchr1\t{mp}\t{i % 61}\t30M2I28M\t=\t{p}\t{-tl}\t{seq}\t*\tAS:i:{i}")
    lines.append("m1\t0\tchrM\t100\t60\t8M\t*\t0\t0\tACGTACGT\tIIIIIIII")
    lines.append("u1\t4\t*\t0\t0\t*\t*\t0\t0\tACGT\t*")
    return "\n".join(lines) + "\n"


# SHA-256s of what main (f9946ce) writes for ordinary_sam(): the chunk (v1 codecs), the header.
MAIN_CHUNKS = ["8f8dc38ce834f9ca319c216a775edc5ab13372ad1e76a63ef4e43aa299f2ba2b"]
MAIN_HEADER = "8915c99db81e43962bf2bd9c7e0892dcb849ff730025e6adadfa36ef1a59a632"

REGIONS = ["big", "big:2147483600-2147483700", "big:2147483648", "big:2500000000-2600000000",
           "big:2999999001-2999999001", "big:1-1000", "small", "big:2147483000-", "{big}:2999000000-3000000000"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("pos64")
    src = d / "big.sam"
    src.write_text(big_sam())
    srt = d / "sorted.sam"
    pysam.samtools.sort("--no-PG", "-O", "sam", "-o", str(srt), str(src), catch_stdout=False)
    gz = d / "sorted.sam.gz"
    pysam.tabix_compress(str(srt), str(gz), force=True)
    pysam.samtools.index("-c", str(gz), catch_stdout=False)  # CSI: 64-bit positions
    ds = d / "ds"
    run_cli("convert", "-q", "--block-size", "4K", src, ds)  # several blocks per reference
    return {"dir": d, "src": src, "sorted": srt, "gz": gz, "ds": ds}


def test_converts_as_v11_from_file_and_stdin(work, tmp_path):
    m = json.loads((work["ds"] / "manifest.json").read_text())
    assert m["version"] == "1.3"  # v1.1 records with the codecs of FORMAT.md §12
    assert [r["length"] for r in m["references"]] == [BIG, 100000]
    expect = pysam.samtools.view(str(work["sorted"]))
    assert run_cli("query", work["ds"]).stdout.decode() == expect
    ds2 = tmp_path / "ds2"
    with open(work["src"], "rb") as f:
        run_cli("convert", "-q", "-", ds2, stdin=f)
    assert run_cli("query", ds2).stdout.decode() == expect
    assert json.loads((ds2 / "manifest.json").read_text())["version"] == "1.3"
    run_cli("verify", ds2)


def test_query_with_header_and_count(work):
    out = run_cli("query", "-h", "--no-PG", work["ds"]).stdout.decode()
    assert out == pysam.samtools.view("-h", "--no-PG", str(work["sorted"]))
    assert run_cli("query", "-c", work["ds"], "big").stdout.decode().strip() == \
        pysam.samtools.view("-c", str(work["gz"]), "big").strip()


@pytest.mark.parametrize("region", REGIONS)
def test_region_query_equals_samtools(work, region):
    expect = pysam.samtools.view(str(work["gz"]), region)
    assert run_cli("query", work["ds"], region).stdout.decode() == expect


def test_multi_region_query_equals_samtools(work):
    regs = ["big:2147483600-2147483700", "big:2500000000-2600000000", "small"]
    # htslib's multi-region iterator (view -M) parses positions as 32-bit, so the oracle is the
    # union of the single-region answers, in file order
    hits = set().union(*(pysam.samtools.view(str(work["gz"]), r).splitlines(True) for r in regs))
    expect = "".join(x for x in pysam.samtools.view(str(work["sorted"])).splitlines(True) if x in hits)
    assert expect.count("\n") > 20
    assert run_cli("query", "-M", work["ds"], *regs).stdout.decode() == expect


def test_stats_equal_samtools(work):
    assert run_cli("stats", "--flagstat", work["ds"]).stdout.decode() == pysam.samtools.flagstat(str(work["gz"]))
    assert run_cli("stats", "--idxstats", work["ds"]).stdout.decode() == pysam.samtools.idxstats(str(work["gz"]))


def test_export_sam_round_trips(work, tmp_path):
    out = tmp_path / "x.sam"
    run_cli("export", work["ds"], out)
    assert pysam.samtools.view("-h", "--no-PG", str(out)) == \
        run_cli("query", "-h", "--no-PG", work["ds"]).stdout.decode()
    assert pysam.samtools.view(str(out)) == pysam.samtools.view(str(work["sorted"]))
    again = tmp_path / "again"
    run_cli("convert", "-q", out, again)
    assert run_cli("query", again).stdout.decode() == pysam.samtools.view(str(work["sorted"]))
    reg = tmp_path / "r.sam"
    run_cli("export", "--region", "big:2147483600-2147483700", work["ds"], reg)
    assert pysam.samtools.view(str(reg)) == pysam.samtools.view(str(work["gz"]), "big:2147483600-2147483700")


@pytest.mark.parametrize("args,word", [(["export", "{ds}", "{d}/x.bam"], "BAM cannot"),
                                       (["export", "{ds}", "{d}/x.cram"], "CRAM 3.1"),
                                       (["query", "-b", "-o", "{d}/y.bam", "{ds}"], "BAM cannot")])
def test_bam_and_cram_refused_with_one_line(work, tmp_path, args, word):
    r = run_cli(*[a.format(ds=work["ds"], d=tmp_path) for a in args], check=False)
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 1 and len(err) == 1 and word in err[0] and ".sam" in err[0], err
    assert not list(tmp_path.iterdir())


def test_v1_reader_rejects_v13(work):
    data = (work["ds"] / "manifest.json").read_bytes()
    m = Manifest.from_json(data)
    assert m.wide
    # a v1-only reader is the version gate accepting just the integer 1 (what main does)
    with pytest.raises(IndexError_, match=r"unsupported bams3 format version 1\.3 \(this reader reads 1\)"):
        check_version(json.loads(data)["version"], supported=(1,))
    # ... and so does a v1.1-only reader (it cannot read the codecs of §12)
    with pytest.raises(IndexError_, match=r"unsupported bams3 format version 1\.3 \(this reader reads 1 or 1\.1\)"):
        check_version(json.loads(data)["version"], supported=(1, "1.1"))
    # v1.1 index pages carry version 0x0101, which a v1 page reader refuses
    ix = next(i for i in m.index if i.ref_id == 0)
    page = (work["ds"] / ix.key).read_bytes()[:ix.pages[0][1]]
    assert decode_index(page)["layout"].any()
    with pytest.raises(IndexError_, match="unsupported index version 257"):
        decode_index(page, wide_ok=False)


def test_ordinary_data_stays_v1_and_byte_identical(tmp_path, monkeypatch):
    src = tmp_path / "ord.sam"
    src.write_text(ordinary_sam())
    run_cli("convert", "-q", src, tmp_path / "ds")
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert m["version"] == "1.2"  # v1 records, with the codecs of FORMAT.md §12
    assert m["header"]["sha256"] == MAIN_HEADER
    # with the v1 codecs and no zstd frame checksums (FORMAT.md §7.1), the same blocks are
    # main's bytes exactly
    ds = Dataset.open(LocalStore(str(tmp_path / "ds")))
    monkeypatch.setattr(codec, "PLAIN_STREAMS", frozenset())
    enc = BlockEncoder(codecs=CODECS_V1)
    v1 = b"".join(enc.encode(b).data for b in ds.query(None))
    assert [hashlib.sha256(v1).hexdigest()] == MAIN_CHUNKS


def test_long_reference_with_ordinary_positions_stays_v1(tmp_path):
    """A 3 Gbp reference is read by the wide path, but records BAM can hold make v1 blocks:
    the dataset is what the ordinary path writes for the same records (v1, BAM export works)."""
    text = f"@SQ\tSN:big\tLN:{BIG}\n" + "".join(
        f"r{i}\t0\tbig\t{100 + i * 1000}\t60\t4M\t*\t0\t0\tACGT\tIIII\n" for i in range(50))
    (tmp_path / "a.sam").write_text(text)
    run_cli("convert", "-q", tmp_path / "a.sam", tmp_path / "wide")
    bam = tmp_path / "a.bam"
    pysam.samtools.view("-b", "-o", str(bam), str(tmp_path / "a.sam"), catch_stdout=False)
    run_cli("convert", "-q", bam, tmp_path / "narrow")
    mw = json.loads((tmp_path / "wide" / "manifest.json").read_text())
    mn = json.loads((tmp_path / "narrow" / "manifest.json").read_text())
    assert mw["version"] == "1.2"  # not wide
    assert [c["sha256"] for c in mw["chunks"]] == [c["sha256"] for c in mn["chunks"]]
    run_cli("export", tmp_path / "wide", tmp_path / "out.bam")
    assert pysam.samtools.view(str(tmp_path / "out.bam")) == pysam.samtools.view(str(tmp_path / "a.sam"))


def test_export_sam_and_cram_of_ordinary_data(tmp_path):
    src = tmp_path / "ord.sam"
    src.write_text(ordinary_sam())
    srt = tmp_path / "sorted.sam"
    pysam.samtools.sort("--no-PG", "-O", "sam", "-o", str(srt), str(src), catch_stdout=False)
    run_cli("convert", "-q", src, tmp_path / "ds")
    run_cli("export", tmp_path / "ds", tmp_path / "x.sam")
    run_cli("export", tmp_path / "ds", tmp_path / "x.cram")
    assert (tmp_path / "x.cram.crai").exists()
    for out in ("x.sam", "x.cram"):
        assert pysam.samtools.view("--no-PG", str(tmp_path / out)) == pysam.samtools.view(str(srt)), out


def _wide_batch(rows) -> RecordBatch:
    """Wide records (name, CIGAR 4M, 4 bases, no tags) with the given (pos, next_pos, tlen)."""
    recs = []
    for i, (pos, npos, tlen) in enumerate(rows):
        fx = np.zeros(1, dtype=WIDE_FIXED_DTYPE)
        fx["refid"], fx["pos"], fx["l_read_name"], fx["mapq"] = 0, pos, 3, 60
        fx["n_cigar_op"], fx["flag"], fx["l_seq"] = 1, 99, 4
        fx["next_refid"], fx["next_pos"], fx["tlen"] = 0, npos, tlen
        var = f"r{i % 10}".encode() + b"\0" + np.array([4 << 4], "<u4").tobytes() + b"\x12\x48" + b"\x1e" * 4
        recs.append(np.array([WIDE_FIXED_SIZE + len(var)], "<i4").tobytes() + fx.tobytes() + var)
    return RecordBatch.from_records_view(b"".join(recs), wide=True)


def test_wide_block_round_trip():
    rows = [(5, 2_600_000_000, 2_599_999_999), ((1 << 31) + 7, 10, -(1 << 31) - 100),
            ((1 << 33) - 3, (1 << 33) - 100, -97), (2_600_000_000, 5, -2_599_999_999)]
    batch = _wide_batch(rows)
    assert not fits_bam(batch.fixed())
    blk = BlockEncoder().encode(batch)
    assert blk.wide and blk.first_start == 5 and blk.last_start == 2_600_000_000
    out = decode_block(blk.data, blk.stream_sizes, blk.n_records, blk.ref_id, blk.first_start, wide=True)
    assert out.wide and bytes(out.raw()) == bytes(batch.raw())
    # values that fit make an ordinary (v1) block of the same records in BAM's layout
    small = _wide_batch([(5, 100, 150), (90, 5, -150)])
    blk = BlockEncoder().encode(small)
    assert not blk.wide
    back = decode_block(blk.data, blk.stream_sizes, blk.n_records, blk.ref_id, blk.first_start)
    assert bytes(back.raw()) == bytes(to_bam_layout(small).raw())


def test_wide_pos_stream_vector():
    """docs/FORMAT.md §11.5: the `pos` stream of a wide block before zstd."""
    import zstandard

    from bams3core.codec import STREAM_INDEX

    blk = BlockEncoder().encode(_wide_batch([(5, 5, 0), (2147483653, 5, 0), (2147483650, 5, 0)]))
    assert blk.wide
    p = sum(blk.stream_sizes[:STREAM_INDEX["pos"]])
    frame = blk.data[p:p + blk.stream_sizes[STREAM_INDEX["pos"]]]
    assert zstandard.ZstdDecompressor().decompress(frame).hex(" ") == \
        "00 00 05 00 00 00 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00 00 00 00"


def test_wide_index_page_round_trip():
    rows = np.zeros(3, dtype=ENTRY_DTYPE_WIDE)
    rows["first_start"] = [5, (1 << 31) + 1, (1 << 33) - 3]
    rows["last_start"] = rows["first_start"] + 10
    rows["max_end"] = rows["first_start"] + 100
    rows["layout"] = [0, 1, 1]
    rows["n_records"] = 1
    back = decode_index(encode_index(rows))
    assert back.dtype == ENTRY_DTYPE_WIDE and (back == rows).all()


def test_sam_beyond_the_supported_range_is_one_line(tmp_path):
    src = tmp_path / "huge.sam"
    src.write_text(f"@SQ\tSN:h\tLN:{1 << 40}\nr1\t0\th\t{1 << 35}\t60\t4M\t*\t0\t0\tACGT\tIIII\n")
    r = run_cli("convert", "-q", src, tmp_path / "ds", check=False)
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 1 and len(err) == 1 and "beyond the largest supported" in err[0], err
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_wide_records_sort_through_spill_runs(tmp_path):
    """Unsorted wide input larger than the sort memory: spilled runs, merged (several passes),
    in samtools' order."""
    import io

    from bams3.convert import ExternalSorter
    from bams3.export import write_sam_any
    from bams3.inputs import open_input
    from bams3.store import open_store

    text = big_sam()
    head = [x for x in text.splitlines() if x.startswith("@")]
    recs = [x for x in text.splitlines() if not x.startswith("@")]
    src = tmp_path / "big4.sam"
    src.write_text("\n".join(head + recs * 4) + "\n")
    srt = tmp_path / "sorted.sam"
    pysam.samtools.sort("--no-PG", "-O", "sam", "-o", str(srt), str(src), catch_stdout=False)
    inp = open_input(str(src))
    assert inp.wide
    with open_store(str(tmp_path / "store")) as store:
        sorter = ExternalSorter(store, "r1", 1 << 10, wide=True)
        out = io.BytesIO()
        small = (b.slice(i, min(i + 100, len(b))) for b in inp.batches() for i in range(0, len(b), 100))
        write_sam_any(inp.header, sorter.sort(small), out, wide=True, with_header=False)
    inp.close()
    assert len(sorter.runs) >= 3
    assert out.getvalue().decode() == pysam.samtools.view(str(srt))


def test_export_cram_with_reference(tmp_path):
    bases = "ACGT"
    ref = "".join(bases[(i * i + 3 * i) % 7 % 4] for i in range(5000))
    (tmp_path / "ref.fa").write_text(">r1\n" + "\n".join(ref[i:i + 60] for i in range(0, 5000, 60)) + "\n")
    lines = ["@HD\tVN:1.6\tSO:unsorted", "@SQ\tSN:r1\tLN:5000"]
    for i in range(40):
        p = (i * 97) % 4900
        seq = ref[p:p + 50] if i % 3 else ref[p:p + 20] + "T" + ref[p + 21:p + 50]
        lines.append(f"c{i}\t{16 * (i % 2)}\tr1\t{p + 1}\t60\t50M\t*\t0\t0\t{seq}\t{'I' * 50}\tXA:i:{i}")
    (tmp_path / "a.sam").write_text("\n".join(lines) + "\n")
    srt = tmp_path / "sorted.sam"
    pysam.samtools.sort("--no-PG", "-O", "sam", "-o", str(srt), str(tmp_path / "a.sam"), catch_stdout=False)
    run_cli("convert", "-q", tmp_path / "a.sam", tmp_path / "ds")
    run_cli("export", "-T", tmp_path / "ref.fa", tmp_path / "ds", tmp_path / "x.cram")
    cram = pysam.samtools.view("--no-PG", "--input-fmt-option", "decode_md=0", "--reference",
                               str(tmp_path / "ref.fa"), str(tmp_path / "x.cram"))
    assert cram == pysam.samtools.view(str(srt))
