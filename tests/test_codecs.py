"""The codec methods of FORMAT.md §12 (seq method 1, tags method 2) and the old formats.

- datasets written before them (format v1, stored in tests/data/format-v1) stay readable,
  record for record as samtools reads their sources, and verify;
- random seq and tag columns round-trip, whatever the CIGARs, positions, mates and tags
  (NM/MD/MC that match their derivation, and that don't);
- corrupt method-1 seq frames and method-2 tag frames raise, never crash or hang.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pysam
import pytest
import zstandard

from bams3core.codec import CODECS_V1, CODECS_V2, BlockEncoder, CodecError, decode_block
from bams3core.bam import RecordBatch
from bams3core.seqcodec import block_consensus, decode_seq, encode_seq
from bams3core.tags import TagError, _md_texts, decode_tag_areas, encode_tags, mate_index
from conftest_data import run_cli

OLD = Path(__file__).resolve().parent / "data" / "format-v1"
CASES = sorted(p.name for p in OLD.iterdir() if p.is_dir())
_Z = zstandard.ZstdCompressor(level=3)
_DZ = zstandard.ZstdDecompressor()


@pytest.mark.parametrize("case", CASES)
def test_v1_datasets_stay_readable(case, tmp_path):
    ds = tmp_path / case
    shutil.copytree(OLD / case, ds)  # (a reader may write nothing, but keep the originals pristine)
    assert '"version": 1,' in (ds / "manifest.json").read_text()
    src = str(OLD / f"{case}.bam")
    want = pysam.samtools.view("--no-PG", "-h", src)
    assert run_cli("query", "-h", "--no-PG", ds).stdout.decode() == want
    run_cli("verify", ds)


def test_v1_codec_level_still_writes_v1_frames():
    """BlockEncoder(codecs=1) gives frames a v1 reader decodes: zstd seq, tags method 0/1."""
    batch = _pair_batch()
    for codecs in (CODECS_V1, CODECS_V2):
        blk = BlockEncoder(codecs=codecs).encode(batch)
        sizes = np.cumsum([0] + blk.stream_sizes)
        seq = blk.data[sizes[14]:sizes[15]]
        tags = blk.data[sizes[17]:sizes[18]]
        assert (seq[:4] == b"\x28\xb5\x2f\xfd") == (codecs == CODECS_V1)
        assert tags[0] == (1 if codecs == CODECS_V1 else 2)
        back = decode_block(blk.data, blk.stream_sizes, blk.n_records, blk.ref_id, blk.first_start)
        assert back.data == batch.data


def _pair_batch() -> RecordBatch:
    """The 641 records of tests/data/format-v1/bwa_excerpt.bam (bwa pairs with NM/MD/MC)."""
    from bams3.inputs import open_input

    inp = open_input(str(OLD / "bwa_excerpt.bam"))
    return RecordBatch.concat(list(inp.batches()))


# ------------------------------------------------------------------ random round trips
_OPS = "MIDNSHP=X"


def _random_block(rng, n):
    l_seq = rng.integers(0, 40, n)
    l_seq[rng.random(n) < 0.05] = 0
    pos = np.sort(rng.integers(-1, 300, n))
    cig, ncig = [], []
    for i in range(n):
        k = int(rng.integers(0, 5))
        ops = [(int(rng.integers(0, 30)), int(rng.choice([0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]))) for _ in range(k)]
        cig += [(ln << 4) | op for ln, op in ops]
        ncig.append(k)
    nib_len = l_seq + (l_seq & 1)
    # mostly a shared "genome" so the consensus model has something to learn, some noise
    genome = rng.choice([1, 2, 4, 8], 1000)
    nib = []
    for i in range(n):
        s = list(genome[max(pos[i], 0):max(pos[i], 0) + nib_len[i]]) + [15] * nib_len[i]
        s = np.array(s[:nib_len[i]], dtype=np.uint8)
        noise = rng.random(len(s)) < 0.1
        s[noise] = rng.integers(0, 16, int(noise.sum()))
        nib.append(s)
    return (np.concatenate(nib).astype(np.uint8) if nib else np.zeros(0, np.uint8), l_seq, pos,
            np.array(cig, dtype=np.uint32), np.array(ncig, dtype=np.int64))


@pytest.mark.parametrize("seed", range(12))
def test_seq_method1_round_trips(seed):
    rng = np.random.default_rng(seed)
    nib, l_seq, pos, cig, ncig = _random_block(rng, int(rng.integers(1, 200)))
    frame = encode_seq(nib, l_seq, pos, cig, ncig, _Z)
    assert frame[0] == 1
    assert decode_seq(frame, l_seq, pos, cig, ncig, _DZ).tolist() == nib.tolist()


def test_seq_falls_back_to_zstd():
    nib = np.array([1, 2, 4, 8], np.uint8)
    far = np.array([0, 1 << 23], np.int64)  # a span over the writer's 2^22 positions
    cig = np.array([2 << 4, 2 << 4], np.uint32)
    frame = encode_seq(nib, [2, 2], far, cig, [1, 1], _Z)
    assert frame[:4] == b"\x28\xb5\x2f\xfd"
    assert decode_seq(frame, [2, 2], far, cig, [1, 1], _DZ).tolist() == nib.tolist()
    bad = np.array([1, 2, 4, 16], np.uint8)  # not nibbles: only zstd keeps them
    assert decode_seq(encode_seq(bad, [4], [0], cig[:1], [1], _Z), [4], [0], cig[:1], [1], _DZ).tolist() == bad.tolist()


def test_seq_method1_decodes_spans_up_to_the_format_limit(monkeypatch):
    """Another writer may use method 1 up to 2^24 positions; the reader must decode it."""
    import bams3core.seqcodec as sc
    nib = np.array([1, 2, 4, 8], np.uint8)
    far = np.array([0, 1 << 23], np.int64)
    cig = np.array([2 << 4, 2 << 4], np.uint32)
    monkeypatch.setattr(sc, "WRITE_MAX_SPAN", sc.MAX_SPAN)
    frame = encode_seq(nib, [2, 2], far, cig, [1, 1], _Z)
    assert frame[0] == 1
    assert decode_seq(frame, [2, 2], far, cig, [1, 1], _DZ).tolist() == nib.tolist()


def test_seq_method1_corrupt_input_raises_or_decodes_boundedly():
    rng = np.random.default_rng(7)
    nib, l_seq, pos, cig, ncig = _random_block(rng, 50)
    frame = encode_seq(nib, l_seq, pos, cig, ncig, _Z)
    with pytest.raises(ValueError):
        decode_seq(frame, l_seq + 2, pos, cig, ncig, _DZ)  # other lengths than encoded
    with pytest.raises(ValueError):
        decode_seq(b"\x07" + frame[1:], l_seq, pos, cig, ncig, _DZ)  # unknown method
    with pytest.raises(ValueError):
        decode_seq(b"\x01\xff\xff\xff\xff\x0f\x00\x00", l_seq, pos, cig, ncig, _DZ)  # span > 2^24
    for cut in (1, 5, len(frame) // 2):
        try:
            out = decode_seq(frame[:cut], l_seq, pos, cig, ncig, _DZ)
        except ValueError:
            continue
        assert len(out) == len(nib) and out.max(initial=0) <= 15


def _cigar_text(words):
    return "".join(f"{w >> 4}{_OPS[w & 15] if (w & 15) < 9 else '?'}" for w in words) or "*"


def _tag(key, typ, val) -> bytes:
    if typ == "Z":
        return key.encode() + b"Z" + val.encode() + b"\0"
    fmt = {"c": "<b", "C": "<B", "s": "<h", "S": "<H", "i": "<i", "I": "<I"}[typ]
    return key.encode() + typ.encode() + struct.pack(fmt, val)


@pytest.mark.parametrize("seed", range(12))
def test_tags_method2_round_trips(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 120))
    nib, l_seq, pos, cig, ncig = _random_block(rng, n)
    starts = np.concatenate([[0], np.cumsum(ncig)[:-1]]).astype(np.int64)
    cons = block_consensus(nib, l_seq, pos, cig, ncig)
    md_ref = None if cons is None or seed % 4 == 3 else (nib, l_seq, pos, *cons)
    if md_ref is not None:  # the MD each record has against the consensus, where there is one
        txt, st_, good = _md_texts(md_ref, cig, starts, ncig, np.arange(n))
        derivable = [txt[st_[i]:st_[i + 1] - 1].tobytes().decode() if good[i] else None for i in range(n)]
    else:
        derivable = [None] * n
    link = np.zeros(n, np.int64)
    for i in range(1, n):
        if rng.random() < 0.5:
            link[i] = int(rng.integers(1, i + 1))
    link[link > 0] = np.where(link[np.arange(n) - link][link > 0] == 0, link[link > 0], 0)  # targets unlinked
    mate = mate_index(link)
    areas = []
    for i in range(n):
        words = cig[starts[i]:starts[i] + ncig[i]]
        mism = int(rng.integers(0, 3))
        md = rng.choice(["10", "3A6", "2^AC0T5", "x!", "5a3", ""]) if rng.random() < 0.9 else None
        if derivable[i] is not None and rng.random() < 0.6:
            md = derivable[i]
        ins_del = sum(int(w >> 4) for w in words if (w & 15) in (1, 2))
        nm_true = {"10": 0, "3A6": 1, "2^AC0T5": 1, "5a3": 1}.get(md, mism) + ins_del
        if md is not None and md == derivable[i]:
            nm_true = sum(ch.isalpha() for ch in md.split("^")[0]) + ins_del
        nm = nm_true if rng.random() < 0.8 else nm_true + 1
        mate_cigar = _cigar_text(cig[starts[mate[i]]:starts[mate[i]] + ncig[mate[i]]]) if mate[i] >= 0 else "7M"
        mc = mate_cigar if rng.random() < 0.8 else "99M"
        items = []
        typ = str(rng.choice(["C", "c", "S", "s", "i", "I"]))
        if rng.random() < 0.9:
            items.append(_tag("NM", typ, min(nm, 100)))
        if md is not None:
            items.append(_tag("MD", "Z", md))
        if rng.random() < 0.8:
            items.append(_tag("MC", "Z", mc))
        if rng.random() < 0.5:
            items.append(_tag("AS", "C", int(rng.integers(0, 200))))
        order = rng.permutation(len(items))
        areas.append(b"".join(items[k] for k in order))
    buf = np.frombuffer(b"".join(areas), np.uint8)
    lens = np.array([len(a) for a in areas], np.int64)
    st = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    frame = encode_tags(buf, st, lens, _Z, cigar=cig, n_cigar=ncig, mate=mate, md_ref=md_ref)
    assert frame[0] == 2
    got, got_lens = decode_tag_areas(frame, n, _DZ, l_tags=None, cigar=cig, n_cigar=ncig, mate=mate,
                                     md_ref=md_ref)
    assert got.tobytes() == buf.tobytes() and got_lens.tolist() == lens.tolist()


def test_tags_method2_stores_only_what_the_block_does_not_reproduce():
    rng = np.random.default_rng(5)
    n = 400
    k = rng.integers(5, 150, n)  # record i: CIGAR k[i]M, MD with 0 or 1 mismatch, MC = the mate's
    mism = rng.integers(0, 2, n)
    areas = [_tag("NM", "C", int(mism[i])) + _tag("MD", "Z", f"1A{k[i] - 2}" if mism[i] else f"{k[i]}")
             + _tag("MC", "Z", f"{k[i ^ 1]}M") for i in range(n)]
    buf = np.frombuffer(b"".join(areas), np.uint8)
    lens = np.array([len(a) for a in areas], np.int64)
    st = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    cig = (k.astype(np.uint32) << 4)
    ncig = np.ones(n, np.int64)
    link = np.where(np.arange(n) % 2 == 1, 1, 0)
    v1 = encode_tags(buf, st, lens, _Z)
    v2 = encode_tags(buf, st, lens, _Z, cigar=cig, n_cigar=ncig, mate=mate_index(link))
    assert len(v2) < len(v1) - 400  # NM and MC cost next to nothing
    # without the CIGARs and mates the derived columns cannot be decoded: an error, not a guess
    with pytest.raises(TagError):
        decode_tag_areas(v2, n, _DZ)
    got, _ = decode_tag_areas(v2, n, _DZ, cigar=cig, n_cigar=ncig, mate=mate_index(link))
    assert got.tobytes() == buf.tobytes()


def test_corrupt_blocks_raise_codec_errors():
    batch = _pair_batch()
    blk = BlockEncoder().encode(batch)
    sizes = np.cumsum([0] + blk.stream_sizes)
    data = bytearray(blk.data)
    # a non-zero ltags value in a block with method-2 tags
    lt = bytearray(zstandard.ZstdCompressor().compress(np.ones(blk.n_records, "<u4").tobytes()))
    bad = bytes(data[:sizes[16]]) + bytes(lt) + bytes(data[sizes[17]:])
    ss = list(blk.stream_sizes)
    ss[16] = len(lt)
    with pytest.raises(CodecError):
        decode_block(bad, ss, blk.n_records, blk.ref_id, blk.first_start)
    rng = np.random.default_rng(3)
    for _ in range(60):  # flipped bytes inside the seq or tags frames
        k = int(rng.choice([14, 17]))
        d = bytearray(data)
        at = int(rng.integers(sizes[k], sizes[k + 1]))
        d[at] ^= int(rng.integers(1, 256))
        try:
            out = decode_block(bytes(d), blk.stream_sizes, blk.n_records, blk.ref_id, blk.first_start)
        except CodecError:
            continue
        assert len(out) == blk.n_records
