"""Every input samtools reads converts (issue #10 items 1 and 5, issue #13 item 6).

One test per input class, each from a file and from standard input. The oracle is samtools
(pysam's): `samtools view --no-PG -h` of `bams3 export` (and `bams3 query -h`) equals
samtools' text of the source after `samtools sort` -- or, for unaligned input (no @SQ
lines), of the source itself: unaligned records keep their input order.
"""

from __future__ import annotations

import array
import gzip
import os
import random
import struct
from pathlib import Path

import pysam
import pytest

from conftest_data import run_cli, samtools_sort, samtools_view

BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")


def _rseq(rnd, n):
    return "".join(rnd.choice("ACGT") for _ in range(n))


def _rqual(rnd, n):
    return "".join(chr(33 + rnd.randrange(2, 42)) for _ in range(n))


def _convert(src: Path, ds: Path, *, stdin: bool, extra=(), check=True, env=None):
    args = ["convert", "-q", "--block-size", "4K", "--chunk-size", "16K", *extra]
    if stdin:
        return run_cli(*args, "-", ds, input_bytes=src.read_bytes(), check=check, env=env)
    return run_cli(*args, src, ds, check=check, env=env)


def _one_line_error(r, *needles) -> str:
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _check_roundtrip(ds: Path, expected: str, tmp: Path, *, stats_from: Path | None = None,
                     query_text: bool = True, verify: bool = False, full: bool = True) -> None:
    """export and query -h print what samtools prints; stats equal flagstat + idxstats.
    ``full=False`` (the stdin twin of a file test): the export only."""
    out = tmp / f"{ds.name}.export.bam"
    run_cli("export", ds, out)
    assert samtools_view("--no-PG", "-h", out) == expected
    if not full:
        return
    if query_text:
        assert run_cli("query", "--no-PG", "-h", ds).stdout.decode() == expected
    if stats_from is not None:
        assert run_cli("stats", ds).stdout.decode() == \
            pysam.samtools.flagstat(str(stats_from)) + "\n" + pysam.samtools.idxstats(str(stats_from))
    if verify:
        assert run_cli("verify", ds).returncode == 0


def _sorted_oracle(src: Path, tmp: Path) -> tuple[str, Path]:
    """samtools' text of the source after samtools sort, and the sorted, indexed BAM."""
    s = Path(samtools_sort(src, tmp / (src.name + ".sorted.bam")))
    pysam.samtools.index(str(s))
    return samtools_view("--no-PG", "-h", s), s


def _indexed_copy(src: Path, tmp: Path) -> Path:
    """The source as an indexed BAM, order kept (for samtools idxstats)."""
    out = tmp / (src.name + ".copy.bam")
    pysam.samtools.view("--no-PG", "-b", "-o", str(out), str(src), catch_stdout=False)
    pysam.samtools.index(str(out))
    return out


# --------------------------------------------------------------------------- builders
def _unaligned_sam(path: Path, header: bool = True) -> Path:
    """FASTQ-derived SAM: unaligned pairs and singles, names not sorted, a reverse-flagged
    record (samtools sort would move it), `*` QUAL, tags."""
    rnd = random.Random(3)
    lines = ["@HD\tVN:1.6\tSO:unsorted", "@RG\tID:fq\tSM:s1\tPL:ILLUMINA",
             "@PG\tID:fastq2sam\tPN:picard\tVN:2"] if header else []
    names = [f"q{rnd.randrange(10**6)}" for _ in range(300)]
    for i, name in enumerate(names):
        seq = _rseq(rnd, 90)
        qual = _rqual(rnd, 90) if i % 17 else "*"
        if i % 3 == 0:
            lines.append(f"{name}\t77\t*\t0\t0\t*\t*\t0\t0\t{seq}\t{qual}\tRG:Z:fq")
            lines.append(f"{name}\t141\t*\t0\t0\t*\t*\t0\t0\t{_rseq(rnd, 90)}\t{_rqual(rnd, 90)}\tRG:Z:fq")
        else:
            flag = 4 | (0x10 if i % 11 == 5 else 0) | (0x200 if i % 13 == 0 else 0)
            lines.append(f"{name}\t{flag}\t*\t0\t0\t*\t*\t0\t0\t{seq}\t{qual}\tRG:Z:fq\tBC:Z:ACGT")
    path.write_text("\n".join(lines) + "\n")
    return path


def _unaligned_bam(path: Path) -> Path:
    """Unaligned BAM as PacBio/ONT basecallers write it: no @SQ, long reads, MM/ML base
    modifications, B arrays of several subtypes, kinetics; written in basecalling order."""
    rnd = random.Random(5)
    h = pysam.AlignmentHeader.from_text(
        "@HD\tVN:1.6\tSO:unknown\tpb:5.0.0\n@RG\tID:m64\tPL:PACBIO\tDS:READTYPE=CCS;Ipd:CodecV1=ip\tPU:m64\t"
        "PM:SEQUELII\n@PG\tID:ccs\tPN:ccs\tVN:6.4.0\tCL:ccs in.bam out.bam\n@PG\tID:dorado\tPN:dorado\tVN:0.5\n")
    with pysam.AlignmentFile(str(path), "wb", header=h) as out:
        for i in range(120):
            a = pysam.AlignedSegment(h)
            a.query_name = f"m64/{rnd.randrange(10**7)}/ccs" + ("/fwd" if i % 2 else "")
            a.flag = 4 | (0x10 if i % 9 == 4 else 0)
            n = rnd.randrange(1000, 20000) if i % 10 else 70000  # one longer than 65,535 bases
            a.query_sequence = _rseq(rnd, n)
            a.query_qualities = array.array("B", [rnd.randrange(0, 94) for _ in range(n)]) if i % 7 else None
            ncpg = a.query_sequence.count("C")
            k = min(ncpg, 40)
            skips = ",".join(str(rnd.randrange(0, 4)) for _ in range(k))
            a.set_tag("MM", f"C+m?,{skips};C+h?,{skips};" if k else "C+m?;", "Z")
            a.set_tag("ML", array.array("B", [rnd.randrange(256) for _ in range(2 * k)]))
            a.set_tag("np", rnd.randrange(1, 40), "i")
            a.set_tag("rq", rnd.random(), "f")
            a.set_tag("zm", rnd.randrange(10**7), "i")
            a.set_tag("fi", array.array("B", [rnd.randrange(256) for _ in range(30)]))
            a.set_tag("fp", array.array("H", [rnd.randrange(65536) for _ in range(30)]))
            a.set_tag("sn", array.array("f", [rnd.random() * 20 for _ in range(4)]))
            a.set_tag("xs", array.array("i", [-5, 0, 2**31 - 1]))
            a.set_tag("RG", "m64", "Z")
            out.write(a)
    return path


def _sam_text(rnd, n, contigs, so="unsorted") -> str:
    lines = [f"@HD\tVN:1.6\tSO:{so}"] + [f"@SQ\tSN:{c}\tLN:{ln}" for c, ln in contigs]
    for i in range(n):
        c, ln = contigs[rnd.randrange(len(contigs))]
        pos = rnd.randrange(1, ln - 100)
        flag = rnd.choice((0, 16, 99, 147, 0x100, 0x800 | 16))
        lines.append(f"r{i}\t{flag}\t{c}\t{pos}\t{rnd.randrange(61)}\t50M\t*\t0\t0\t{_rseq(rnd, 50)}\t{_rqual(rnd, 50)}"
                     f"\tNM:i:{rnd.randrange(5)}")
    for i in range(5):
        lines.append(f"u{i}\t4\t*\t0\t0\t*\t*\t0\t0\t{_rseq(rnd, 20)}\t*")
    return "\n".join(lines) + "\n"


def _lying_bam(path: Path, sam_path: Path) -> tuple[Path, Path]:
    """SO:coordinate, sorted for a long stretch (several chunks), then out of order; ties."""
    rnd = random.Random(9)
    contigs = [("chr1", 200_000), ("chr2", 100_000)]
    h = pysam.AlignmentHeader.from_text(f"@HD\tVN:1.6\tSO:coordinate\tGO:query\n"
                                        + "".join(f"@SQ\tSN:{c}\tLN:{ln}\n" for c, ln in contigs))
    recs = []
    for i in range(3000):
        c = 0 if i < 2000 else 1
        pos = rnd.randrange(1, 1000) * 100  # many ties
        recs.append((c, pos, i))
    recs.sort(key=lambda r: (r[0], r[1]))
    recs[1500:1500] = [(1, 50, 9000), (0, 5, 9001), (0, 190_000, 9002)]  # out of order mid-file
    recs += [(0, 7, 9003), (-1, -1, 9004)]  # and at the end
    lines = []
    with pysam.AlignmentFile(str(path), "wb", header=h) as out:
        for c, pos, i in recs:
            a = pysam.AlignedSegment(h)
            a.query_name = f"r{i}"
            if c < 0:
                a.flag, a.reference_id, a.reference_start = 4, -1, -1
                a.query_sequence = "ACGT"
            else:
                a.flag = 16 if i % 3 == 0 else 0
                a.reference_id, a.reference_start, a.mapping_quality = c, pos, 60
                a.cigarstring = "30M"
                a.query_sequence = _rseq(rnd, 30)
                a.query_qualities = array.array("B", [30] * 30)
            out.write(a)
            lines.append(a.to_string())
    sam_path.write_text(str(h) + "\n".join(lines) + "\n")
    return path, sam_path


# --------------------------------------------------------------------------- unaligned
@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
def test_unaligned_sam_keeps_input_order(tmp_path, stdin):
    src = _unaligned_sam(tmp_path / "fq.sam")
    as_bam = _indexed_copy(src, tmp_path)
    expected = samtools_view("--no-PG", "-h", src)
    # samtools sort would move the reverse-flagged records: input order is what is asked for
    assert samtools_view("--no-PG", "-h", samtools_sort(src, tmp_path / "s.bam")) != expected
    for s, name in ((src, "sam"), (as_bam, "bam")):
        ds = tmp_path / f"ds_{name}"
        _convert(s, ds, stdin=stdin)
        _check_roundtrip(ds, expected, tmp_path, stats_from=as_bam, full=not stdin)


@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
def test_unaligned_basecaller_bam(tmp_path, stdin):
    src = _unaligned_bam(tmp_path / "hifi.bam")
    expected = samtools_view("--no-PG", "-h", src)
    assert "\tMM:Z:C+m?," in expected and "\tML:B:C," in expected and "\tfp:B:S," in expected
    ds = tmp_path / "ds"
    _convert(src, ds, stdin=stdin)
    _check_roundtrip(ds, expected, tmp_path, stats_from=_indexed_copy(src, tmp_path), full=not stdin)


@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
def test_unaligned_cram(tmp_path, stdin):
    sam = _unaligned_sam(tmp_path / "fq.sam")
    cram = tmp_path / "fq.cram"
    pysam.samtools.view("--no-PG", "-C", "-o", str(cram), str(sam), catch_stdout=False)
    expected = samtools_view("--no-PG", "-h", cram)
    ds = tmp_path / "ds"
    _convert(cram, ds, stdin=stdin)
    _check_roundtrip(ds, expected, tmp_path, full=not stdin)


@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
def test_no_header_at_all(tmp_path, stdin):
    src = _unaligned_sam(tmp_path / "bare.sam", header=False)
    assert not src.read_text().startswith("@")
    expected = samtools_view("--no-PG", "-h", src)
    ds = tmp_path / "ds"
    _convert(src, ds, stdin=stdin)
    _check_roundtrip(ds, expected, tmp_path, stats_from=_indexed_copy(src, tmp_path), full=not stdin)
    assert run_cli("query", "--no-PG", "-H", ds).stdout == b""


# --------------------------------------------------------------------------- gzip
@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
def test_plain_gzip_sam(tmp_path, stdin):
    text = _sam_text(random.Random(1), 2000, [("chr1", 50_000), ("chr2", 20_000)])
    src = tmp_path / "ex.sam.gz"
    with gzip.open(src, "wb", compresslevel=6) as f:  # plain gzip, in two members
        f.write(text[:len(text) // 2].encode())
    with open(src, "ab") as f:
        f.write(gzip.compress(text[len(text) // 2:].encode()))
    assert src.read_bytes()[3] & 4 == 0  # no FEXTRA: not BGZF
    expected, sorted_bam = _sorted_oracle(src, tmp_path)
    ds = tmp_path / "ds"
    _convert(src, ds, stdin=stdin)
    _check_roundtrip(ds, expected, tmp_path, stats_from=sorted_bam, full=not stdin)


def test_plain_gzip_unaligned_sam(tmp_path):
    src = tmp_path / "fq.sam.gz"
    src.write_bytes(gzip.compress(_unaligned_sam(tmp_path / "fq.sam").read_bytes()))
    expected = samtools_view("--no-PG", "-h", src)
    for stdin in (False, True):
        ds = tmp_path / f"ds{stdin}"
        _convert(src, ds, stdin=stdin)
        _check_roundtrip(ds, expected, tmp_path, full=not stdin)


def test_bgzipped_sam_on_stdin(tmp_path):
    sam = tmp_path / "x.sam"
    sam.write_text(_sam_text(random.Random(2), 500, [("chr1", 50_000)]))
    src = tmp_path / "x.sam.gz"
    pysam.tabix_compress(str(sam), str(src))
    expected, sorted_bam = _sorted_oracle(src, tmp_path)
    ds = tmp_path / "ds"
    _convert(src, ds, stdin=True)
    _check_roundtrip(ds, expected, tmp_path, stats_from=sorted_bam)


# --------------------------------------------------------------------------- SO:coordinate lies
@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
@pytest.mark.parametrize("kind", ["bam", "sam"])
def test_header_says_sorted_but_is_not(tmp_path, stdin, kind):
    bam, sam = _lying_bam(tmp_path / "lying.bam", tmp_path / "lying.sam")
    src = bam if kind == "bam" else sam
    expected, sorted_bam = _sorted_oracle(src, tmp_path)
    ds = tmp_path / "ds"
    r = _convert(src, ds, stdin=stdin, extra=["--max-memory", "64K"])
    warn = [ln for ln in r.stderr.decode().splitlines() if ln]
    assert len(warn) == 1 and "SO:coordinate" in warn[0] and "sorting" in warn[0], warn
    _check_roundtrip(ds, expected, tmp_path, stats_from=sorted_bam, verify=True, full=not stdin)
    # only the committed run is left: the prefix run and the spill runs are gone
    assert len(os.listdir(ds / "data")) == 1, os.listdir(ds / "data")
    assert not (ds / "_tmp").exists() or not os.listdir(ds / "_tmp"), os.listdir(ds / "_tmp")
    assert '"sorted_by": "bams3"' in (ds / "manifest.json").read_text()


# --------------------------------------------------------------------------- long reference: CSI
def test_export_long_reference_writes_csi(tmp_path):
    big = (1 << 29) + 5000
    h = pysam.AlignmentHeader.from_text(f"@HD\tVN:1.6\tSO:coordinate\n@SQ\tSN:big\tLN:{big}\n@SQ\tSN:c2\tLN:100\n")
    src = tmp_path / "big.bam"
    with pysam.AlignmentFile(str(src), "wb", header=h) as out:
        for i, p in enumerate([5, (1 << 29) - 2, (1 << 29) + 100, big - 4]):
            a = pysam.AlignedSegment(h)
            a.query_name, a.reference_id, a.reference_start = f"r{i}", 0, p
            a.cigarstring, a.query_sequence = "3M", "ACG"
            out.write(a)
    pysam.samtools.index("-c", str(src))
    expected = samtools_view("--no-PG", "-h", src)
    for stdin in (False, True):
        ds = tmp_path / f"ds{stdin}"
        _convert(src, ds, stdin=stdin)
        out = tmp_path / f"out{stdin}.bam"
        (tmp_path / f"out{stdin}.bam.bai").write_bytes(b"stale")
        run_cli("export", ds, out)
        assert Path(str(out) + ".csi").exists() and not Path(str(out) + ".bai").exists()
        assert samtools_view("--no-PG", "-h", out) == expected
        region = f"big:{(1 << 29) + 50}-{(1 << 29) + 200}"
        assert samtools_view(out, region) == samtools_view(src, region) != ""
        q = tmp_path / f"q{stdin}.bam"
        run_cli("query", "-b", "-o", q, ds)
        assert Path(str(q) + ".csi").exists() and samtools_view(q, region) == samtools_view(src, region)


# --------------------------------------------------------------------------- NUL bytes in the header
def _with_header_text(src: Path, text: bytes, dst: Path) -> Path:
    raw = gzip.decompress(src.read_bytes())
    (l_text,) = struct.unpack_from("<i", raw, 4)
    dst_raw = dst.with_suffix(".raw")
    dst_raw.write_bytes(b"BAM\x01" + struct.pack("<i", len(text)) + text + raw[8 + l_text:])
    pysam.tabix_compress(str(dst_raw), str(dst), force=True)
    return dst


@pytest.mark.parametrize("case", ["padding", "inside_comment", "before_sq"])
def test_header_with_nul_bytes(tmp_path, case):
    h = "@HD\tVN:1.6\tSO:coordinate\n@SQ\tSN:c1\tLN:1000\n"
    text = {"padding": h.encode() + b"\0" * 16,
            "inside_comment": h.encode() + b"@CO\tab\0cd\n@CO\tx\n",
            "before_sq": b"@HD\tVN:1.6\tSO:coordinate\n\0@SQ\tSN:c1\tLN:1000\n"}[case]
    plain = tmp_path / "plain.bam"
    hdr = pysam.AlignmentHeader.from_text(h)
    with pysam.AlignmentFile(str(plain), "wb", header=hdr) as out:
        for i in range(20):
            out.write(pysam.AlignedSegment.fromstring(f"r{i}\t0\tc1\t{10 + i}\t60\t3M\t*\t0\t0\tACG\tIII", hdr))
    src = _with_header_text(plain, text, tmp_path / "nul.bam")
    expected = samtools_view("--no-PG", "-h", src)
    for stdin in (False, True):
        ds = tmp_path / f"ds{stdin}"
        _convert(src, ds, stdin=stdin)
        _check_roundtrip(ds, expected, tmp_path, full=not stdin)


# --------------------------------------------------------------------------- missing EOF marker
def test_bam_without_eof_marker_is_refused(tmp_path):
    bam, _ = _lying_bam(tmp_path / "x.bam", tmp_path / "x.sam")
    data = Path(samtools_sort(bam, tmp_path / "sorted.bam")).read_bytes()
    assert data.endswith(BGZF_EOF)
    src = tmp_path / "noeof.bam"
    src.write_bytes(data[:-len(BGZF_EOF)])
    for stdin in (False, True):
        ds = tmp_path / f"ds{stdin}"
        _one_line_error(_convert(src, ds, stdin=stdin, check=False), "EOF marker", "probably truncated",
                        "samtools view -b")
        assert not (ds / "manifest.json").exists()


# --------------------------------------------------------------------------- input errors (#13.6)
_H = "@HD\tVN:1.6\tSO:unsorted\n@SQ\tSN:c1\tLN:1000\n@CO\tthree header lines\n"
_OK = "r0\t0\tc1\t5\t60\t3M\t*\t0\t0\tACG\tIII\n"


@pytest.mark.parametrize("bad,line,needle", [
    ("r1\t0\tc1\t10\t60\t3M\t*\t0\t0\tACG\tII\n", 5, "SEQ and QUAL are of different length"),
    ("r1\t0\tc1\t10\t60\t4M\t*\t0\t0\tACG\tIII\n", 5, "CIGAR and query sequence are of different length"),
    ("r1\t0\tc1\t10\t60\t3Q\t*\t0\t0\tACG\tIII\n", 5, "Unrecognized CIGAR operator"),
    ("r1\t0\tc1\t10\t999\t3M\t*\t0\t0\tACG\tIII\n", 5, "number outside allowed range"),
    ("r1\t0\tc1\t10\t60\t3M\t*\t0\t0\tACG\tIII\tXX\n", 5, "Incomplete aux field"),
    ("r1\t0\tc1\tNOTANUMBER\t0\t3M\t*\t0\t0\tACG\tIII\n", 5, "malformed record"),
    ("r1\t0\tc1\t10\t0\t3M\t*\t0\t0\n", 5, "malformed record"),
])
@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
def test_sam_syntax_error_names_the_line(tmp_path, bad, line, needle, stdin):
    src = tmp_path / "bad.sam"
    src.write_text(_H + _OK + bad + _OK)
    ln = _one_line_error(_convert(src, tmp_path / "ds", stdin=stdin, check=False),
                         f"line {line}: {needle}", "stdin" if stdin else "bad.sam")
    assert "truncated" not in ln
    assert not (tmp_path / "ds" / "manifest.json").exists()


@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
@pytest.mark.parametrize("field", ["RNAME", "RNEXT"])
def test_sam_contig_not_in_header(tmp_path, stdin, field):
    bad = ("r1\t0\tchrX\t10\t60\t3M\t*\t0\t0\tACG\tIII\n" if field == "RNAME"
           else "r1\t1\tc1\t10\t60\t3M\tchrX\t7\t0\tACG\tIII\n")
    src = tmp_path / "x.sam"
    src.write_text(_H.replace("unsorted", "coordinate") + _OK + _OK + bad)
    ln = _one_line_error(_convert(src, tmp_path / "ds", stdin=stdin, check=False),
                         "line 6", "'chrX'", field, "not in the header")
    assert "coordinate-sorted" not in ln


@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
def test_bam_contig_not_in_header(tmp_path, stdin):
    h2 = pysam.AlignmentHeader.from_text("@SQ\tSN:c1\tLN:1000\n@SQ\tSN:c2\tLN:1000\n")
    two = tmp_path / "two.bam"
    with pysam.AlignmentFile(str(two), "wb", header=h2) as out:
        for i in range(3):
            out.write(pysam.AlignedSegment.fromstring(f"r{i}\t0\tc{1 + i % 2}\t10\t60\t3M\t*\t0\t0\tACG\tIII", h2))
    raw = gzip.decompress(two.read_bytes())
    (l_text,) = struct.unpack_from("<i", raw, 4)
    p = 8 + l_text + 4
    for _ in range(2):
        p += 8 + struct.unpack_from("<i", raw, p)[0]
    text = b"@SQ\tSN:c1\tLN:1000\n"
    one = b"BAM\x01" + struct.pack("<i", len(text)) + text + struct.pack("<ii", 1, 3) + b"c1\0" + \
        struct.pack("<I", 1000) + raw[p:]
    (tmp_path / "one.raw").write_bytes(one)
    src = tmp_path / "one.bam"
    pysam.tabix_compress(str(tmp_path / "one.raw"), str(src))
    _one_line_error(_convert(src, tmp_path / "ds", stdin=stdin, check=False),
                    "record 2", "reference id 1 is not in the header")


@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
def test_cram_without_reference_says_so(tmp_path, stdin):
    fa = tmp_path / "ref.fa"
    fa.write_text(">c1\n" + "ACGT" * 250 + "\n")
    sam = tmp_path / "m.sam"
    sam.write_text("@SQ\tSN:c1\tLN:1000\n" + "".join(f"r{i}\t0\tc1\t{10 + i}\t60\t4M\t*\t0\t0\tACGT\tIIII\n"
                                                        for i in range(10)))
    cram = tmp_path / "m.cram"
    pysam.samtools.view("-C", "-T", str(fa), "-o", str(cram), str(sam), catch_stdout=False)
    fa.rename(tmp_path / "hidden.fa")
    (tmp_path / "ref.fa.fai").unlink(missing_ok=True)
    r = _convert(cram, tmp_path / "ds", stdin=stdin, check=False,
                 env={"REF_PATH": ":", "REF_CACHE": str(tmp_path / "nocache")})
    ln = _one_line_error(r, "CRAM", "'c1'", "--reference")
    assert "truncated" not in ln


@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
def test_utf8_contig_names_round_trip(tmp_path, stdin):
    names = ["chré", "染色体1", "chr_Ω:1-5"]
    text = "@HD\tVN:1.6\tSO:unsorted\n" + "".join(f"@SQ\tSN:{n}\tLN:1000\n" for n in names) + \
        "@CO\tcommentaire: données\n"
    rnd = random.Random(4)
    for i in range(200):
        n = names[i % 3]
        text += f"r{i}\t0\t{n}\t{rnd.randrange(1, 900)}\t60\t3M\t*\t0\t0\tACG\tIII\tXZ:Z:été\n"
    src = tmp_path / "utf8.sam"
    src.write_text(text, encoding="utf-8")
    expected, sorted_bam = _sorted_oracle(src, tmp_path)
    assert "染色体1" in expected
    ds = tmp_path / "ds"
    _convert(src, ds, stdin=stdin)
    _check_roundtrip(ds, expected, tmp_path, stats_from=sorted_bam, full=not stdin)
    for region in ("染色体1:100-500", "{chr_Ω:1-5}:1-1000"):
        assert run_cli("query", ds, region).stdout.decode() == samtools_view(sorted_bam, region)
