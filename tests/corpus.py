"""A corpus of small BAM/SAM/CRAM files covering every lossless-conversion edge case.

Each ``case_*`` function writes one file into a directory and returns its path;
:func:`build_corpus` writes them all and returns ``{name: path}``.  Files are
built with pysam; coordinate-sorted ones go through ``samtools sort --no-PG``
(so record order, including ties, is samtools' own) and are indexed.

Covered:

* every tag type ``A c C s S i I f Z H`` and ``B`` arrays of every subtype
  (``c C s S i I f``, plus an empty array), edge values (int8/int16/int32 min
  and max, uint32 max), integers stored in a wider type than needed, tricky
  floats (nan, +-inf, -0, denormal, 1e-10, values %g rounds), tag order kept
  (``ZZ`` before ``AA``)                               -> ``tags``
* CIGAR with more than 65,535 operations (htslib keeps it in ``CG:B,I``)
                                                       -> ``long_cigar``
* reads longer than 65,535 bases                       -> ``long_read``
* ``*`` SEQ and/or ``*`` QUAL, qualities 0 and 93      -> ``seq_qual_missing``
* ``=`` and IUPAC codes in SEQ                          -> ``iupac``
* unmapped reads placed at their mate, unplaced unmapped reads at the end,
  mates on other contigs, odd flags                    -> ``mates``
* secondary / supplementary records (SA tags, hard clips) -> ``sec_supp``
* many records at one position with different strands/flags (sort ties)
                                                       -> ``ties``
* reads at position 1 and at the very last base of a contig -> ``contig_edges``
* zero-reference-span reads (all S/I/H CIGARs, mapped with ``*`` CIGAR),
  ``=``/``X``/``P`` ops                                  -> ``zero_span``
* full header: @HD, @SQ with M5/AS/UR/SP/extra, @RG x3, chained @PG (PP),
  several @CO, non-standard ``@XY``/``@XZ`` lines       -> ``header_full``
* literal ``@XY\tfoo:bar`` (not a 2-letter key: htslib's header parser rejects
  it, so only plain ``view -h`` works on that file)     -> ``header_malformed``
* contig names with ``:`` (``HLA-A*01:01:01:01``, ``chr1:100-200``) and other
  odd characters                                       -> ``odd_contigs``
* 300 contigs, most of them empty                      -> ``many_contigs``
* ``SO:unsorted`` / ``SO:queryname`` files             -> ``unsorted``, ``queryname``
* header without @HD                                   -> ``no_hd``
* header only, no records                              -> ``empty``
* SAM text variant of ``tags``                         -> ``tags_sam`` (.sam)
* CRAM variant with its reference FASTA next to it     -> ``cram`` (.cram + .fa)
* a small simulated truth BAM (bams3.sample)           -> ``simulated``

Every file round-trips through ``pysam.samtools.view("--no-PG", "-h", path)``.
"""

from __future__ import annotations

import array
import os
import random
from pathlib import Path

import pysam

__all__ = ["build_corpus", "CASES", "reference_for"]

_DNA = "ACGT"


def _hdr(sq: list[tuple[str, int]], so: str | None = "coordinate", extra: str = "") -> str:
    lines = [f"@HD\tVN:1.6\tSO:{so}"] if so else []
    lines += [f"@SQ\tSN:{n}\tLN:{ln}" for n, ln in sq]
    lines.append("@RG\tID:rg1\tSM:sample1\tPL:ILLUMINA")
    return "\n".join(lines) + "\n" + extra


def _rseq(rnd: random.Random, n: int) -> str:
    return "".join(rnd.choice(_DNA) for _ in range(n))


def _rqual(rnd: random.Random, n: int) -> str:
    return "".join(chr(33 + rnd.choice((2, 12, 23, 32, 37, 41))) for _ in range(n))


def _write(path: Path, header: str, records, *, sort: bool = True) -> Path:
    """Write ``records`` (SAM lines or callables ``h -> AlignedSegment``) as BAM.

    ``sort``: coordinate-sort with samtools (no @PG) and build a .bai.
    """
    h = pysam.AlignmentHeader.from_text(header)
    tmp = path.with_name(path.stem + ".tmp.bam") if sort else path
    with pysam.AlignmentFile(str(tmp), "wb", header=h) as out:
        for rec in records:
            out.write(pysam.AlignedSegment.fromstring(rec, h) if isinstance(rec, str) else rec(h))
    if sort:
        pysam.samtools.sort("--no-PG", "-o", str(path), str(tmp), catch_stdout=False)
        os.remove(tmp)
        pysam.samtools.index(str(path))
    return path


def _sam(qname, flag, rname, pos, mapq, cigar, rnext, pnext, tlen, seq, qual, *tags) -> str:
    return "\t".join(map(str, (qname, flag, rname, pos, mapq, cigar, rnext, pnext, tlen, seq, qual, *tags)))


# --------------------------------------------------------------------------- cases


def _tags_records(h_contig: str = "chr1"):
    """Records for the tag case (also used for the SAM and CRAM-free variants)."""
    rnd = random.Random(11)
    recs = []

    def typed(h):
        a = pysam.AlignedSegment.fromstring(
            _sam("typed", 0, h_contig, 100, 60, "20M", "*", 0, 0, _rseq(rnd, 20), _rqual(rnd, 20)), h
        )
        tags = [
            ("ZZ", "z", "A"),  # ZZ first: order must be kept
            ("AA", "!", "A"),
            ("Xa", -128, "c"),
            ("Xb", 127, "c"),
            ("Xc", 0, "C"),
            ("Xd", 255, "C"),
            ("Xe", -32768, "s"),
            ("Xf", 32767, "s"),
            ("Xg", 65535, "S"),
            ("Xh", -2147483648, "i"),
            ("Xi", 2147483647, "i"),
            ("Xj", 4294967295, "I"),
            ("Xk", 1, "i"),  # small value in a wide type
            ("Xl", 7, "S"),
            ("Xm", 0, "I"),
            ("Fa", 3.14159, "f"),
            ("Fb", 0.1, "f"),
            ("Fc", -2.5, "f"),
            ("Fd", 123456789.0, "f"),  # %g -> 1.23457e+08
            ("Fe", 1e-10, "f"),
            ("Ff", -0.0, "f"),
            ("Fg", float("nan"), "f"),
            ("Fh", float("inf"), "f"),
            ("Fi", float("-inf"), "f"),
            ("Fj", 1e-45, "f"),  # float32 denormal
            ("Fk", 3.4028234663852886e38, "f"),  # float32 max
            ("Fl", 100000.0, "f"),
            ("Fm", 1000000.0, "f"),  # %g -> 1e+06
            ("Za", "hello world; with spaces, commas:colons", "Z"),
            ("Zb", "", "Z"),
            ("Ha", "DEADBEEF00ff", "H"),
            ("Ba", array.array("b", [-128, -1, 0, 1, 127]), None),
            ("Bb", array.array("B", [0, 1, 254, 255]), None),
            ("Bc", array.array("h", [-32768, 0, 32767]), None),
            ("Bd", array.array("H", [0, 65535]), None),
            ("Be", array.array("i", [-2147483648, 0, 2147483647]), None),
            ("Bf", array.array("I", [0, 4294967295]), None),
            ("Bg", array.array("f", [0.1, -0.0, 1.5, 1e-10, 123456789.0, float("nan"), float("inf"), float("-inf")]), None),
            ("Bh", array.array("b", []), None),  # empty array -> "B:c"
            ("Bi", array.array("i", [5]), None),
            ("MD", "20", "Z"),
            ("NM", 0, "i"),
        ]
        for t, v, ty in tags:
            if ty:
                a.set_tag(t, v, ty)
            else:
                a.set_tag(t, v)
        return a

    recs.append(typed)
    # tags parsed from SAM text (htslib picks the smallest integer type)
    recs.append(
        _sam(
            "fromtext", 16, h_contig, 150, 37, "10M", "*", 0, 0, _rseq(rnd, 10), _rqual(rnd, 10),
            "XA:Z:chr2,+100,10M,0;", "XB:i:-1", "XC:i:300", "XD:i:-40000", "XE:i:70000", "XF:f:2.5e-3",
            "XG:B:c,1,2,3", "XH:B:S,1,65535", "XI:B:f,0.5,-0.125", "XJ:A:Q", "XK:H:0A1B", "RG:Z:rg1",
        )
    )
    recs.append(_sam("notags", 0, h_contig, 200, 60, "5M", "*", 0, 0, "ACGTA", "IIIII"))
    recs.append(
        _sam("unmapped_tags", 4, "*", 0, 0, "*", "*", 0, 0, "ACGTN", "#####", "ZZ:i:1", "AA:Z:x", "BB:B:I,4294967295")
    )
    return recs


def case_tags(d: Path) -> Path:
    return _write(d / "tags.bam", _hdr([("chr1", 10_000), ("chr2", 5_000)]), _tags_records())


def case_tags_sam(d: Path) -> Path:
    """SAM text variant of :func:`case_tags` (as written by samtools view -h)."""
    bam = _write(d / "tags_sam.tmp.bam", _hdr([("chr1", 10_000), ("chr2", 5_000)]), _tags_records(), sort=False)
    out = d / "tags.sam"
    pysam.samtools.view("--no-PG", "-h", "-o", str(out), str(bam), catch_stdout=False)
    os.remove(bam)
    return out


def case_long_cigar(d: Path) -> Path:
    """>65,535 CIGAR operations: htslib moves the CIGAR into CG:B,I (placeholder kSmN)."""
    n = 35_000  # 70,000 ops of 1M1D

    def long_ops(h):
        a = pysam.AlignedSegment(h)
        a.query_name = "cigar_70000_ops"
        a.flag = 0
        a.reference_id = 0
        a.reference_start = 1000
        a.mapping_quality = 60
        a.cigartuples = [(0, 1), (2, 1)] * n
        a.query_sequence = ("ACGT" * (n // 4 + 1))[:n]
        a.query_qualities = array.array("B", [30 + i % 10 for i in range(n)])
        a.set_tag("NM", n)
        a.set_tag("RG", "rg1")
        return a

    def long_ops_rev(h):
        a = pysam.AlignedSegment(h)
        a.query_name = "cigar_65536_ops"
        a.flag = 16
        a.reference_id = 0
        a.reference_start = 500
        a.mapping_quality = 20
        a.cigartuples = [(0, 2), (1, 1)] * 32766 + [(0, 5), (2, 1), (0, 1), (4, 2)]  # 65,536 ops
        ql = 3 * 32766 + 5 + 1 + 2
        a.query_sequence = ("TTGCA" * (ql // 5 + 1))[:ql]
        a.query_qualities = None
        return a

    recs = [long_ops, long_ops_rev, _sam("short", 0, "chr1", 1500, 60, "10M", "*", 0, 0, "ACGTACGTAC", "FFFFFFFFFF")]
    return _write(d / "long_cigar.bam", _hdr([("chr1", 200_000)]), recs)


def case_long_read(d: Path) -> Path:
    """Reads longer than 65,535 bases (mapped, with a long deletion; and unmapped)."""
    rnd = random.Random(3)
    m = 70_001
    seq = _rseq(rnd, m)
    qual = "".join(chr(33 + (i * 7) % 42) for i in range(m))
    recs = [
        _sam("long_mapped", 0, "chr1", 10, 60, f"100S{m - 300}M5000D100M100S", "*", 0, 0, seq, qual, "RG:Z:rg1"),
        _sam("long_unmapped", 4, "*", 0, 0, "*", "*", 0, 0, seq[::-1], "*"),
    ]
    return _write(d / "long_read.bam", _hdr([("chr1", 100_000)]), recs)


def case_seq_qual_missing(d: Path) -> Path:
    recs = [
        _sam("seq_and_qual_star", 0, "chr1", 100, 60, "10M", "*", 0, 0, "*", "*", "NM:i:0"),
        _sam("qual_star", 16, "chr1", 110, 60, "10M", "*", 0, 0, "ACGTACGTAC", "*"),  # qual stored as 0xFF
        _sam("qual_extremes", 0, "chr1", 120, 60, "6M", "*", 0, 0, "ACGTAC", "!~!~I#"),  # phred 0 and 93
        _sam("unmapped_star", 4, "*", 0, 0, "*", "*", 0, 0, "*", "*"),
        _sam("unmapped_noqual", 4, "*", 0, 0, "*", "*", 0, 0, "NNNNACGT", "*"),
        _sam("secondary_star", 256, "chr1", 130, 0, "5S10M", "*", 0, 0, "*", "*", "AS:i:10"),
    ]
    return _write(d / "seq_qual_missing.bam", _hdr([("chr1", 1000)]), recs)


def case_iupac(d: Path) -> Path:
    recs = [
        _sam("iupac_all", 0, "chr1", 10, 60, "16M", "*", 0, 0, "=ACMGRSVTWYHKDBN", "ABCDEFGHIJ!!##II"),
        _sam("eq_bases", 16, "chr1", 20, 60, "12M", "*", 0, 0, "====A=====T=", "IIIIIIIIIIII", "MD:Z:4C5G1"),
        _sam("all_n", 4, "*", 0, 0, "*", "*", 0, 0, "NNNNNNNNNN", "##########"),
        _sam("odd_len", 0, "chr1", 30, 60, "7M", "*", 0, 0, "RYKMSWB", "5555555"),  # odd length: half-byte pad
    ]
    return _write(d / "iupac.bam", _hdr([("chr1", 1000)]), recs)


def case_mates(d: Path) -> Path:
    """Placed unmapped mates, unplaced pairs, mates on other contigs, odd mate fields."""
    rnd = random.Random(5)
    s = lambda n=20: _rseq(rnd, n)  # noqa: E731
    q = lambda n=20: _rqual(rnd, n)  # noqa: E731
    recs = [
        # mapped read + its unmapped mate placed at the same position
        _sam("p1", 73, "chr1", 100, 60, "20M", "=", 100, 0, s(), q(), "RG:Z:rg1"),
        _sam("p1", 133, "chr1", 100, 0, "*", "=", 100, 0, s(), q(), "MC:Z:20M", "RG:Z:rg1"),
        # reverse-strand mapped read with unmapped mate (mate gets 0x20)
        _sam("p2", 89, "chr2", 500, 60, "20M", "=", 500, 0, s(), q()),
        _sam("p2", 165, "chr2", 500, 0, "*", "=", 500, 0, s(), q()),
        # proper pair
        _sam("p3", 99, "chr1", 200, 60, "20M", "=", 380, 200, s(), q(), "MC:Z:20M"),
        _sam("p3", 147, "chr1", 380, 60, "20M", "=", 200, -200, s(), q(), "MC:Z:20M"),
        # mates on different contigs
        _sam("p4", 65, "chr1", 300, 25, "20M", "chr2", 40, 0, s(), q()),
        _sam("p4", 145, "chr2", 40, 25, "20M", "chr1", 300, 0, s(), q()),
        # both unmapped but placed
        _sam("p5", 77, "chr2", 900, 0, "*", "=", 900, 0, s(), q()),
        _sam("p5", 141, "chr2", 900, 0, "*", "=", 900, 0, s(), q()),
        # unplaced pairs (end of file after sorting)
        _sam("p6", 77, "*", 0, 0, "*", "*", 0, 0, s(), q(), "RG:Z:rg1"),
        _sam("p6", 141, "*", 0, 0, "*", "*", 0, 0, s(), q(), "RG:Z:rg1"),
        _sam("p0_unplaced_single", 4, "*", 0, 0, "*", "*", 0, 0, s(), q()),
        # read whose mate fields point somewhere without the paired flag; huge TLEN; MAPQ 255
        _sam("odd_mate", 0, "chr1", 700, 255, "20M", "chr2", 12, -123456789, s(), q()),
        _sam("qcfail_dup", 1024 + 512 + 1 + 64 + 8, "chr1", 710, 3, "20M", "=", 710, 0, s(), q()),
        # unmapped read with RNAME/POS but no mate (placed, single end)
        _sam("unmapped_placed_single", 4, "chr1", 800, 0, "*", "*", 0, 0, s(), q()),
        # unmapped flag but CIGAR and MAPQ kept (samtools does not clear them)
        _sam("unmapped_with_cigar", 4, "chr1", 810, 7, "20M", "*", 0, 0, s(), q()),
    ]
    return _write(d / "mates.bam", _hdr([("chr1", 1000), ("chr2", 1000)]), recs)


def case_sec_supp(d: Path) -> Path:
    rnd = random.Random(7)
    seq = _rseq(rnd, 100)
    qual = _rqual(rnd, 100)
    rc = seq[::-1].translate(str.maketrans("ACGT", "TGCA"))
    recs = [
        _sam("chim", 97, "chr1", 1000, 60, "60M40S", "chr2", 300, 0, seq, qual, "NM:i:0", "SA:Z:chr2,5001,-,60S40M,33,1;"),
        _sam("chim", 2145, "chr2", 5001, 33, "40M60H", "chr2", 300, 0, rc[:40], qual[::-1][:40], "NM:i:1",
             "SA:Z:chr1,1000,+,60M40S,60,0;"),
        _sam("chim", 145, "chr2", 300, 60, "100M", "chr1", 1000, 0, rc, qual[::-1], "NM:i:0"),
        _sam("multi", 0, "chr1", 2000, 0, "100M", "*", 0, 0, seq, qual, "XS:i:100", "AS:i:100"),
        _sam("multi", 256, "chr1", 7000, 0, "100M", "*", 0, 0, "*", "*", "AS:i:100"),
        _sam("multi", 272, "chr2", 100, 0, "100M", "*", 0, 0, rc, qual[::-1], "AS:i:95"),
        _sam("supp_soft", 2048, "chr1", 3000, 10, "30S70M", "*", 0, 0, seq, qual, "SA:Z:chr1,2000,+,70M30S,60,0;"),
        _sam("three_parts", 0, "chr1", 4000, 60, "30M70S", "*", 0, 0, seq, qual,
             "SA:Z:chr1,8000,+,30S40M30S,20,0;chr2,9000,-,70S30M,10,2;"),
        _sam("three_parts", 2048, "chr1", 8000, 20, "30H40M30H", "*", 0, 0, seq[30:70], qual[30:70],
             "SA:Z:chr1,4000,+,30M70S,60,0;chr2,9000,-,70S30M,10,2;"),
        _sam("three_parts", 2064, "chr2", 9000, 10, "30M70H", "*", 0, 0, rc[:30], qual[::-1][:30],
             "SA:Z:chr1,4000,+,30M70S,60,0;chr1,8000,+,30S40M30S,20,0;"),
    ]
    return _write(d / "sec_supp.bam", _hdr([("chr1", 10_000), ("chr2", 10_000)]), recs)


def case_ties(d: Path) -> Path:
    """Many records at the same coordinate with different strands/flags/names (sort tie-breaking)."""
    rnd = random.Random(9)
    recs = []
    for i in range(60):
        flag = rnd.choice([0, 16, 99, 147, 83, 163, 256, 272, 2048, 2064, 1024, 1040])
        pos = rnd.choice([500, 500, 500, 501])
        cig = rnd.choice(["20M", "5S15M", "15M5S", "10M2I8M", "20M"])
        nm = rnd.choice(["q", "a", "z", "q"]) + str(rnd.randint(0, 5))
        pnext = 700 if flag & 1 else 0
        rnext = "=" if flag & 1 else "*"
        recs.append(_sam(nm, flag, "chr1", pos, rnd.randint(0, 60), cig, rnext, pnext, 0, _rseq(rnd, 20), _rqual(rnd, 20)))
    # same position on the second contig + unmapped placed at the tie position
    recs.append(_sam("u1", 4, "chr1", 500, 0, "*", "*", 0, 0, "ACGT", "IIII"))
    recs.append(_sam("u2", 4, "chr1", 500, 0, "*", "*", 0, 0, "ACGT", "IIII"))
    rnd.shuffle(recs)
    return _write(d / "ties.bam", _hdr([("chr1", 2000), ("chr2", 2000)]), recs)


def case_contig_edges(d: Path) -> Path:
    L1, L2 = 1000, 777
    recs = [
        _sam("first_base", 0, "chr1", 1, 60, "10M", "*", 0, 0, "ACGTACGTAC", "IIIIIIIIII"),
        _sam("first_base_rev_clip", 16, "chr1", 1, 60, "5S5M", "*", 0, 0, "ACGTACGTAC", "IIIIIIIIII"),
        _sam("ends_at_last", 0, "chr1", L1 - 9, 60, "10M", "*", 0, 0, "ACGTACGTAC", "IIIIIIIIII"),
        _sam("starts_at_last", 16, "chr1", L1, 60, "1M9S", "*", 0, 0, "ACGTACGTAC", "IIIIIIIIII"),
        _sam("unmapped_at_last", 4, "chr1", L1, 0, "*", "*", 0, 0, "ACGT", "IIII"),
        _sam("chr2_first", 0, "chr2", 1, 60, "4M", "*", 0, 0, "ACGT", "IIII"),
        _sam("chr2_last", 0, "chr2", L2, 60, "1M", "*", 0, 0, "A", "I"),
        _sam("chr3_only", 0, "chr3", 1, 60, "1M", "*", 0, 0, "C", "I"),
        _sam("spans_whole_chr3", 0, "chr3", 1, 60, "1M", "*", 0, 0, "G", "I"),
    ]
    return _write(d / "contig_edges.bam", _hdr([("chr1", L1), ("chr2", L2), ("chr3", 1)]), recs)


def _mapped_no_cigar(h):
    """Mapped (flag 0) with CIGAR '*': only possible via the API (SAM parsing sets flag 4)."""
    a = pysam.AlignedSegment(h)
    a.query_name = "mapped_no_cigar"
    a.flag = 0
    a.reference_id = 0
    a.reference_start = 101
    a.mapping_quality = 0
    a.query_sequence = "ACGT"
    a.query_qualities = pysam.qualitystring_to_array("IIII")
    return a


def case_zero_span(d: Path) -> Path:
    recs = [
        _sam("all_soft", 0, "chr1", 100, 0, "10S", "*", 0, 0, "ACGTACGTAC", "IIIIIIIIII"),
        _sam("all_ins", 16, "chr1", 100, 0, "5I", "*", 0, 0, "ACGTA", "IIIII"),
        _sam("soft_ins_soft", 0, "chr1", 100, 3, "3S4I3S", "*", 0, 0, "ACGTACGTAC", "IIIIIIIIII"),
        _sam("hard_soft", 0, "chr1", 101, 3, "5H10S", "*", 0, 0, "ACGTACGTAC", "IIIIIIIIII"),
        _mapped_no_cigar,
        _sam("eq_x_pad", 0, "chr1", 103, 60, "3=1X2P2=1D2M", "*", 0, 0, "ACGTACGT", "IIIIIIII"),
        _sam("only_deletion", 0, "chr1", 104, 0, "2D", "*", 0, 0, "*", "*"),
        _sam("ref_skip", 0, "chr1", 105, 60, "2M300N2M", "*", 0, 0, "ACGT", "IIII"),
    ]
    return _write(d / "zero_span.bam", _hdr([("chr1", 1000)]), recs)


def case_header_full(d: Path) -> Path:
    header = (
        "@HD\tVN:1.6\tSO:coordinate\tGO:none\tSS:coordinate:queryname\n"
        "@SQ\tSN:chr1\tLN:5000\tM5:1b22b98cdeb4a9304cb5d48026a85128\tAS:GRCh38\tUR:file:///refs/GRCh38.fa\tSP:Homo sapiens\n"
        "@SQ\tSN:chr2\tLN:4000\tAH:*\tAN:2,chr2_alt\tTP:linear\tXX:custom value\n"
        "@SQ\tSN:chrM\tLN:16569\tTP:circular\n"
        "@RG\tID:rgA\tSM:NA12878\tLB:lib1\tPL:ILLUMINA\tPU:FC1.1.ACGT\tCN:center\tDS:description with spaces\tDT:2020-01-01\tPI:350\n"
        "@RG\tID:rgB\tSM:NA12878\tLB:lib2\tPL:ONT\tPM:PromethION\n"
        "@RG\tID:rgC:with:colons\tSM:other\n"
        "@PG\tID:bwa\tPN:bwa\tVN:0.7.17-r1188\tCL:bwa mem -t 8 -R @RG\\tID:rgA ref.fa r1.fq r2.fq\n"
        "@PG\tID:samtools\tPN:samtools\tPP:bwa\tVN:1.17\tCL:samtools sort -o out.bam\n"
        "@PG\tID:samtools.1\tPN:samtools\tPP:samtools\tVN:1.17\tCL:samtools markdup in.bam out.bam\tDS:third in chain\n"
        "@PG\tID:other\tPN:other tool\n"
        "@CO\tfirst comment\n"
        "@CO\tsecond comment\twith a tab and unicode-free punctuation !\"#$%&'()*+,-./\n"
        "@XY\tfo:bar\n"
        "@XZ\tAB:cd\tEF:gh\n"
        "@CO\tcomment after a non-standard line\n"
    )
    recs = [
        _sam("r1", 0, "chr1", 10, 60, "5M", "*", 0, 0, "ACGTA", "IIIII", "RG:Z:rgA", "PG:Z:samtools.1"),
        _sam("r2", 0, "chr2", 10, 60, "5M", "*", 0, 0, "ACGTA", "IIIII", "RG:Z:rgC:with:colons"),
        _sam("r3", 16, "chrM", 16560, 60, "10M", "*", 0, 0, "ACGTACGTAC", "IIIIIIIIII", "RG:Z:rgB"),
    ]
    return _write(d / "header_full.bam", header, recs)


def case_header_malformed(d: Path) -> Path:
    """Header with ``@XY\tfoo:bar`` (3-letter key) kept verbatim in the BAM.

    ``samtools view --no-PG -h`` prints it, but anything that parses the header
    (sort, adding @PG, region queries) fails on it, so this file is unsorted
    and unindexed and its records are built via the API.
    """
    header = "@HD\tVN:1.6\tSO:unsorted\n@SQ\tSN:chr1\tLN:1000\n@XY\tfoo:bar\n@CO\tafter the odd line\n"
    h = pysam.AlignmentHeader.from_text(header)
    path = d / "header_malformed.bam"
    with pysam.AlignmentFile(str(path), "wb", header=h) as out:
        for i, (pos, flag) in enumerate([(5, 0), (50, 16), (-1, 4)]):
            a = pysam.AlignedSegment(h)
            a.query_name = f"m{i}"
            a.flag = flag
            a.reference_id = 0 if pos >= 0 else -1
            a.reference_start = pos
            if pos >= 0:
                a.cigarstring = "4M"
                a.mapping_quality = 60
            a.query_sequence = "ACGT"
            a.query_qualities = pysam.qualitystring_to_array("II#I")
            out.write(a)
    return path


def case_odd_contigs(d: Path) -> Path:
    names = [
        ("chr1", 1000),
        ("HLA-A*01:01:01:01", 3503),
        ("chr1:100-200", 500),  # looks like a region
        ("chrUn_JTFH01000001v1_decoy", 800),
        ("weird|na;me=x~y+z.#$%&@^_!?", 300),
        ("1", 200),
        ("chrEBV", 100),
    ]
    rnd = random.Random(13)
    recs = []
    for name, ln in names:
        for _ in range(3):
            p = rnd.randint(1, ln - 20)
            recs.append(_sam(f"on_{len(recs)}", rnd.choice([0, 16]), name, p, 60, "20M", "*", 0, 0, _rseq(rnd, 20), _rqual(rnd, 20)))
    recs.append(_sam("mate_odd", 65, "chr1", 50, 60, "20M", "HLA-A*01:01:01:01", 77, 0, _rseq(rnd, 20), _rqual(rnd, 20)))
    recs.append(_sam("mate_odd", 129, "HLA-A*01:01:01:01", 77, 60, "20M", "chr1", 50, 0, _rseq(rnd, 20), _rqual(rnd, 20)))
    recs.append(_sam("sa_odd", 2048, "chr1:100-200", 5, 9, "10H10M", "*", 0, 0, "ACGTACGTAC", "IIIIIIIIII",
                     "SA:Z:HLA-A*01:01:01:01,100,+,10M10S,60,0;"))
    return _write(d / "odd_contigs.bam", _hdr(names), recs)


def case_many_contigs(d: Path) -> Path:
    rnd = random.Random(17)
    sq = [(f"ctg{i:04d}", rnd.randint(50, 5000)) for i in range(300)]
    recs = []
    used = sorted(rnd.sample(range(300), 20))
    for t in used:
        name, ln = sq[t]
        for _ in range(rnd.randint(1, 4)):
            p = rnd.randint(1, ln - 10)
            recs.append(_sam(f"r{len(recs)}", rnd.choice([0, 16]), name, p, 60, "10M", "*", 0, 0, _rseq(rnd, 10), _rqual(rnd, 10)))
    recs.append(_sam("unplaced", 4, "*", 0, 0, "*", "*", 0, 0, "ACGT", "IIII"))
    return _write(d / "many_contigs.bam", _hdr(sq), recs)


def _mixed_records(rnd: random.Random, n: int, contigs) -> list[str]:
    recs = []
    for i in range(n):
        name, ln = rnd.choice(contigs)
        p = rnd.randint(1, ln - 30)
        pn = min(ln - 30, p + rnd.randint(0, 200))
        recs.append(_sam(f"pair{i:03d}", 99, name, p, 60, "30M", "=", pn, pn + 30 - p, _rseq(rnd, 30), _rqual(rnd, 30)))
        recs.append(_sam(f"pair{i:03d}", 147, name, pn, 60, "30M", "=", p, -(pn + 30 - p), _rseq(rnd, 30), _rqual(rnd, 30)))
    recs.append(_sam("lonely", 4, "*", 0, 0, "*", "*", 0, 0, "ACGT", "IIII"))
    return recs


def case_unsorted(d: Path) -> Path:
    rnd = random.Random(19)
    recs = _mixed_records(rnd, 40, [("chr1", 5000), ("chr2", 3000)])
    rnd.shuffle(recs)
    return _write(d / "unsorted.bam", _hdr([("chr1", 5000), ("chr2", 3000)], so="unsorted"), recs, sort=False)


def case_queryname(d: Path) -> Path:
    rnd = random.Random(23)
    recs = _mixed_records(rnd, 40, [("chr1", 5000), ("chr2", 3000)])
    tmp = _write(d / "queryname.tmp.bam", _hdr([("chr1", 5000), ("chr2", 3000)], so="unsorted"), recs, sort=False)
    out = d / "queryname.bam"
    pysam.samtools.sort("-n", "--no-PG", "-o", str(out), str(tmp), catch_stdout=False)
    os.remove(tmp)
    return out


def case_no_hd(d: Path) -> Path:
    rnd = random.Random(29)
    recs = _mixed_records(rnd, 5, [("chr1", 5000)])
    return _write(d / "no_hd.bam", _hdr([("chr1", 5000)], so=None), recs, sort=False)


def case_empty(d: Path) -> Path:
    return _write(d / "empty.bam", _hdr([("chr1", 5000), ("chr2", 100)]) + "@CO\tno records\n", [], sort=True)


def case_cram(d: Path) -> Path:
    """CRAM of a small paired case, with ``cram.fa`` (+ .fai) next to it.

    htslib adds M5 and UR (absolute path of the FASTA) to the @SQ lines, and
    decoding regenerates MD/NM unless told not to (``-I decode_md=0``).
    """
    rnd = random.Random(31)
    contigs = [("chr1", 3000), ("chr2", 2000)]
    refseq = {n: _rseq(rnd, ln) for n, ln in contigs}
    fa = d / "cram.fa"
    with open(fa, "w") as fh:
        for n, s in refseq.items():
            fh.write(f">{n}\n" + "\n".join(s[i : i + 60] for i in range(0, len(s), 60)) + "\n")
    pysam.faidx(str(fa))
    recs = []
    for i in range(30):
        n, ln = rnd.choice(contigs)
        p = rnd.randint(1, ln - 60)
        s = list(refseq[n][p - 1 : p + 49])
        s[rnd.randrange(50)] = "N"
        flag = rnd.choice([0, 16, 1024, 256])
        recs.append(_sam(f"c{i}", flag, n, p, rnd.randint(0, 60), "50M", "*", 0, 0, "".join(s), _rqual(rnd, 50), "RG:Z:rg1", f"XI:i:{i}"))
    recs.append(_sam("c_unmapped", 4, "*", 0, 0, "*", "*", 0, 0, "ACGTNACGT", "IIII#IIII"))
    recs.append(_sam("c_noqual", 0, "chr1", 10, 60, "5M", "*", 0, 0, refseq["chr1"][9:14], "*"))
    bam = _write(d / "cram.tmp.bam", _hdr(contigs), recs)
    out = d / "cram.cram"
    pysam.samtools.view("-C", "-T", str(fa), "--no-PG", "-o", str(out), str(bam), catch_stdout=False)
    os.remove(bam)
    os.remove(str(bam) + ".bai")
    pysam.samtools.index(str(out))
    return out


def case_simulated(d: Path) -> Path:
    """A small truth BAM from bams3.sample (realistic mix of everything)."""
    from bams3 import sample

    ref = sample.make_reference(
        d / "simulated.fa", [("chr1", 60_000), ("chr2", 30_000), ("HLA-A*01:01:01:01", 3_503)], seed=5
    )
    pairs = sample.simulate_pairs(ref, 1500, seed=5, qual_mode="full")
    return Path(sample.write_truth_bam(ref, pairs, d / "simulated.bam"))


CASES = {
    "tags": case_tags,
    "tags_sam": case_tags_sam,
    "long_cigar": case_long_cigar,
    "long_read": case_long_read,
    "seq_qual_missing": case_seq_qual_missing,
    "iupac": case_iupac,
    "mates": case_mates,
    "sec_supp": case_sec_supp,
    "ties": case_ties,
    "contig_edges": case_contig_edges,
    "zero_span": case_zero_span,
    "header_full": case_header_full,
    "header_malformed": case_header_malformed,
    "odd_contigs": case_odd_contigs,
    "many_contigs": case_many_contigs,
    "unsorted": case_unsorted,
    "queryname": case_queryname,
    "no_hd": case_no_hd,
    "empty": case_empty,
    "cram": case_cram,
    "simulated": case_simulated,
}


def reference_for(path) -> str | None:
    """FASTA written next to a corpus file (``cram.fa`` for ``cram.cram``, ...), if any."""
    p = Path(path)
    fa = p.with_suffix(".fa")
    return str(fa) if fa.exists() else None


def build_corpus(tmpdir) -> dict[str, str]:
    """Write every case into ``tmpdir``; return ``{name: path}`` (alignment files only)."""
    d = Path(tmpdir)
    d.mkdir(parents=True, exist_ok=True)
    return {name: str(fn(d)) for name, fn in CASES.items()}


if __name__ == "__main__":
    import sys
    import time

    t = time.time()
    out = build_corpus(sys.argv[1] if len(sys.argv) > 1 else "corpus_out")
    for k, v in out.items():
        print(f"{k}\t{v}")
    print(f"# built in {time.time() - t:.2f}s")
