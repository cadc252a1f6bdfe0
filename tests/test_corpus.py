"""Light tests of the data generators: the edge-case corpus (tests/corpus.py) and the
read simulator (bams3.sample)."""

from __future__ import annotations

import collections
import gzip
import time
from pathlib import Path

import pysam
import pytest

from bams3 import sample
from corpus import CASES, build_corpus, reference_for


def _view(path, *args) -> str:
    return pysam.samtools.view("--no-PG", "-h", *args, str(path))


def _records(text: str) -> list[list[str]]:
    return [ln.split("\t") for ln in text.splitlines() if ln and not ln.startswith("@")]


# --------------------------------------------------------------------------- corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    t = time.time()
    paths = build_corpus(d)
    paths["_seconds"] = time.time() - t
    return paths


def test_corpus_builds_quickly(corpus):
    assert set(CASES) <= set(corpus)
    assert corpus["_seconds"] < 30  # ~0.5 s normally


@pytest.mark.parametrize("name", list(CASES))
def test_corpus_file_readable(corpus, name):
    path = corpus[name]
    assert Path(path).exists()
    text = _view(path)
    recs = _records(text)
    if name == "empty":
        assert recs == []
        assert "@SQ" in text
    else:
        assert recs, name
    if name == "no_hd":
        assert not text.startswith("@HD")
    # viewing twice gives the same bytes
    assert _view(path) == text


def test_corpus_tags(corpus):
    text = _view(corpus["tags"])
    typed = next(r for r in _records(text) if r[0] == "typed")
    tags = typed[11:]
    assert tags[0] == "ZZ:A:z" and tags[1] == "AA:A:!"  # order preserved
    types = {t.split(":")[1] for t in tags}
    assert {"A", "i", "f", "Z", "H", "B"} <= types
    subtypes = {t.split(":")[2][0] for t in tags if t.split(":")[1] == "B"}
    assert subtypes == set("cCsSiIf")
    for v in ("Xa:i:-128", "Xj:i:4294967295", "Xh:i:-2147483648", "Fg:f:nan", "Ff:f:-0", "Fd:f:1.23457e+08", "Bh:B:c"):
        assert v in tags
    # SAM text variant prints identically
    assert _view(corpus["tags_sam"]) == text


def test_corpus_long_cigar_and_read(corpus):
    recs = _records(_view(corpus["long_cigar"]))
    nops = {r[0]: sum(1 for c in r[5] if c.isalpha()) for r in recs}
    assert nops["cigar_70000_ops"] == 70000
    assert nops["cigar_65536_ops"] == 65536
    assert all("CG:B" not in "\t".join(r) for r in recs)  # samtools hides the CG placeholder
    recs = _records(_view(corpus["long_read"]))
    assert all(len(r[9]) > 65535 for r in recs)


def test_corpus_misc_features(corpus):
    sq = {r[0]: r for r in _records(_view(corpus["seq_qual_missing"]))}
    assert sq["seq_and_qual_star"][9:11] == ["*", "*"]
    assert sq["qual_star"][9] != "*" and sq["qual_star"][10] == "*"
    iu = {r[0]: r for r in _records(_view(corpus["iupac"]))}
    assert iu["iupac_all"][9] == "=ACMGRSVTWYHKDBN"
    mates = _records(_view(corpus["mates"]))
    assert mates[-1][2] == "*"  # unplaced at the end
    assert any(int(r[1]) & 4 and r[2] != "*" for r in mates)
    zs = {r[0]: r for r in _records(_view(corpus["zero_span"]))}
    assert zs["mapped_no_cigar"][1] == "0" and zs["mapped_no_cigar"][5] == "*"
    hdr = _view(corpus["header_full"])
    for line in ("@XY\tfo:bar", "@CO\tfirst comment", "PP:samtools", "M5:", "UR:file://"):
        assert line in hdr
    assert "@XY\tfoo:bar" in _view(corpus["header_malformed"])
    odd = _view(corpus["odd_contigs"])
    assert "SN:HLA-A*01:01:01:01" in odd and "SN:chr1:100-200" in odd
    assert odd.count("@SQ") == 7
    assert _view(corpus["many_contigs"]).count("@SQ") == 300
    assert "SO:unsorted" in _view(corpus["unsorted"])
    assert "SO:queryname" in _view(corpus["queryname"])
    assert reference_for(corpus["cram"]) and Path(corpus["cram"]).suffix == ".cram"


def test_corpus_sorted_files_are_samtools_sorted(corpus, tmp_path):
    for name in ("ties", "mates", "contig_edges", "sec_supp", "odd_contigs"):
        p = corpus[name]
        out = tmp_path / f"{name}.resorted.bam"
        pysam.samtools.sort("--no-PG", "-o", str(out), p, catch_stdout=False)
        assert _view(out) == _view(p), name


# --------------------------------------------------------------------------- simulator


CONTIGS = [("chr1", 120_000), ("chr2", 60_000), ("chrM", 16_569), ("HLA-A*01:01:01:01", 3_503)]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    ref = sample.make_reference(d / "ref.fa", CONTIGS, seed=7)
    pairs = sample.simulate_pairs(ref, 6000, seed=7)
    bam = sample.write_truth_bam(ref, pairs, d / "truth.bam")
    return d, ref, pairs, bam


def test_simulator_deterministic(tmp_path, sim):
    d, ref, pairs, bam = sim
    ref2 = sample.make_reference(tmp_path / "ref.fa", CONTIGS, seed=7)
    assert (tmp_path / "ref.fa").read_bytes() == (d / "ref.fa").read_bytes()
    bam2 = sample.write_truth_bam(ref2, sample.simulate_pairs(ref2, 6000, seed=7), tmp_path / "truth.bam")
    assert _view(bam2) == _view(bam)
    other = sample.write_truth_bam(ref2, sample.simulate_pairs(ref2, 6000, seed=8), tmp_path / "other.bam")
    assert _view(other) != _view(bam)
    # loading the FASTA back gives the same reads
    ref3 = sample.load_reference(tmp_path / "ref.fa")
    bam3 = sample.write_truth_bam(ref3, sample.simulate_pairs(ref3, 6000, seed=7), tmp_path / "truth3.bam")
    assert _view(bam3) == _view(bam)


def test_truth_bam_sorted_and_indexed(tmp_path, sim):
    d, ref, pairs, bam = sim
    assert Path(bam + ".bai").exists()
    out = tmp_path / "resorted.bam"
    pysam.samtools.sort("--no-PG", "-o", str(out), bam, catch_stdout=False)
    assert _view(out) == _view(bam)
    hdr = pysam.samtools.view("--no-PG", "-H", bam)
    assert hdr.startswith("@HD\tVN:1.6\tSO:coordinate\n")
    assert hdr.count("@SQ") == len(CONTIGS) and hdr.count("@RG") == 2
    assert "@PG\tID:bams3.sample" in hdr and "\n@CO\t" in hdr
    assert "samtools" not in hdr
    # region query on a contig whose name contains ':' works with braces
    assert len(_records(pysam.samtools.view(bam, "{HLA-A*01:01:01:01}:1-3503"))) > 0


def test_truth_bam_features(sim):
    d, ref, pairs, bam = sim
    c = collections.Counter()
    last_tid = -2
    quals = collections.Counter()
    with pysam.AlignmentFile(bam) as f:
        for r in f:
            ops = r.cigartuples or []
            c["N"] += any(op == 3 for op, _ in ops)
            c["D50"] += any(op == 2 and n >= 50 for op, n in ops)
            c["S"] += any(op == 4 for op, _ in ops)
            c["H"] += any(op == 5 for op, _ in ops)
            c["I"] += any(op == 1 for op, _ in ops)
            c["unmapped_placed"] += r.is_unmapped and r.reference_id >= 0
            c["unplaced"] += r.reference_id < 0
            c["secondary"] += r.is_secondary
            c["supplementary"] += r.is_supplementary
            c["SA"] += r.has_tag("SA")
            c["dup"] += r.is_duplicate
            c["qcfail"] += r.is_qcfail
            c["mapq_var"] += 0 < r.mapping_quality < 60
            c["rg2"] += r.has_tag("RG") and r.get_tag("RG") == "SIM.2"
            if r.reference_id < 0:
                assert last_tid >= -1  # unplaced records come last
            last_tid = r.reference_id
            if r.query_qualities is not None and not r.is_secondary:
                quals.update(r.query_qualities)
    for k in ("N", "D50", "S", "H", "I", "unmapped_placed", "unplaced", "secondary", "supplementary",
              "SA", "dup", "qcfail", "mapq_var", "rg2"):
        assert c[k] > 0, (k, c)
    assert c["N"] >= 0.01 * 2 * pairs.n
    assert set(quals) >= {2, 12, 23, 32, 37}  # varied, Illumina-binned
    assert quals.most_common(1)[0][1] < 0.9 * sum(quals.values())


def test_truth_bam_md_nm_match_reference(tmp_path, sim):
    """samtools calmd agrees with every NM/MD the simulator wrote."""
    d, ref, pairs, bam = sim
    out = tmp_path / "calmd.sam"
    pysam.samtools.calmd(bam, str(d / "ref.fa"), save_stdout=str(out))
    got = [ln for ln in out.read_text().splitlines() if not ln.startswith("@")]
    assert got == pysam.samtools.view("--no-PG", bam).splitlines()


def test_truth_bam_unsorted_no_extras(tmp_path, sim):
    d, ref, pairs, bam = sim
    out = sample.write_truth_bam(ref, pairs, tmp_path / "plain.bam", sort=False, extras=False)
    text = _view(out)
    assert "SO:unsorted" in text
    recs = _records(text)
    assert len(recs) == 2 * pairs.n
    assert not any(int(r[1]) & (0x100 | 0x800 | 0x400 | 0x200) for r in recs)
    assert recs[0][0] == recs[1][0]  # mates adjacent, pair order


def test_full_resolution_qualities(sim):
    d, ref, pairs, bam = sim
    p = sample.simulate_pairs(ref, 500, seed=3, qual_mode="full")
    assert len(set(p.qual.ravel().tolist())) >= 30
    assert p.qual.min() >= 2 and p.qual.max() <= 41


def test_fastq(tmp_path, sim):
    d, ref, pairs, bam = sim
    r1, r2 = tmp_path / "r1.fq.gz", tmp_path / "r2.fq"
    sample.write_fastq(pairs, r1, r2)
    l1 = gzip.open(r1, "rt").read().splitlines()
    l2 = r2.read_text().splitlines()
    assert len(l1) == len(l2) == 4 * pairs.n
    names1 = [x.split()[0] for x in l1[0::4]]
    assert names1 == [x.split()[0] for x in l2[0::4]]
    assert len(set(names1)) == pairs.n
    assert names1[0].startswith("@SIM:1:FCX123:")
    assert all(len(s) == len(q) == pairs.read_len for s, q in zip(l1[1::4], l1[3::4]))
    # FASTQ is in sequencing orientation: read 1 of a forward pair equals the BAM SEQ
    i = next(i for i in range(pairs.n) if pairs.plain[i, 0] and not pairs.rev[i, 0])
    assert l1[4 * i + 1] == pairs.seq[i, 0].tobytes().decode()
    j = next(j for j in range(pairs.n) if pairs.plain[j, 0] and pairs.rev[j, 0])
    assert l1[4 * j + 1] == pairs.seq[j, 0].tobytes().decode()[::-1].translate(str.maketrans("ACGTN", "TGCAN"))


def test_make_sample_and_cli(tmp_path):
    paths = sample.make_sample(tmp_path / "a", n_pairs=300, seed=2)
    for k in ("reference", "fai", "bam", "bai"):
        assert Path(paths[k]).exists()
    assert sample.main([str(tmp_path / "b"), "--pairs", "300", "--seed", "2", "--fastq"]) == 0
    assert _view(tmp_path / "b" / "sample.bam") == _view(paths["bam"])
    assert (tmp_path / "b" / "sample_R1.fastq.gz").exists()
