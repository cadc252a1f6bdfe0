"""docs/FORMAT.md tests itself: every ```bams3-vector block of the spec is run through the
reference encoder AND decoder, and the spec's field tables are compared with the code.

A vector is a fenced block with the info string ``bams3-vector`` holding one JSON object
``{"name", "function", "input", "output"}`` (and nothing else). Byte strings are hex, spaces
allowed. Where a layout embeds zstd frames (whose bytes depend on the compressor), the
vector gives the frame's *decompressed* content; the decoder side compresses that content
with any level and must get the input back, the encoder side decompresses what the
reference writer produced and must find that content. See §0.3 of the spec.

The suite fails when a vector is malformed or unknown, when a section that must carry
vectors has none, or when vectors disappear (counts below the floors in ``MIN_VECTORS``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import zstandard

from bams3core.bam import BamHeader, RecordBatch, Reference, parse_header, reg2bin, sort_keys
from bams3core.codec import (CODECS_V1, STREAMS, BlockEncoder, _unzz, _zz, decode_block, pack_nibbles,
                             split_streams, unpack_nibbles)
from bams3core.index import ENTRY_DTYPE, Manifest, ObjectRef, decode_index, encode_index
from bams3core.names import _tokenised, decode_names, encode_names
from bams3core.qualcodec import _get_varint, _lengths_hash, _put_varint, decode_quals, encode_quals
from bams3core.shuffle import shuffle, unshuffle
from bams3core.sorting import sorted_header_text
from bams3core.seqcodec import block_consensus, decode_seq, encode_seq
from bams3core.tags import decode_tag_areas, decode_tags, encode_tags, mate_index

SPEC = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"
INFO = "bams3-vector"

# Sections that must carry vectors, with the least number each must keep (raise a floor when
# you add vectors; never lower one to make a test pass).
MIN_VECTORS = {
    "0.1": 10,    # zigzag, byte shuffle, varint
    "0.2": 8,     # reg2bin, sort key
    "3.4": 1,     # manifest
    "4.2": 4,     # header rewrite of a sorting writer, binary BAM header
    "5.1": 2,     # index page body
    "6.4": 2,     # seq nibbles
    "6.7": 4,     # names
    "6.8": 3,     # tags
    "6.9": 1,     # lengths hash
    "6.9.4": 7,   # quality coder
    "6.11": 1,    # the worked block
    "12.2": 2,    # seq method 1
    "12.3": 3,    # tags method 2
}
MIN_TOTAL = sum(MIN_VECTORS.values())

_ZSTD = zstandard.ZstdCompressor(level=3)
_DZSTD = zstandard.ZstdDecompressor()


# ------------------------------------------------------------------------------- the document
_HEADING = re.compile(r"^#{1,6} (\d+(?:\.\d+)*)\.? ")


def spec_vectors(text: str) -> list[tuple[str, int, str]]:
    """(section, line, body) of every ```bams3-vector block, in document order."""
    out, section, block, start = [], None, None, 0
    for ln, line in enumerate(text.splitlines(), 1):
        if block is not None:
            if line.strip() == "```":
                out.append((section, start, "\n".join(block)))
                block = None
            else:
                block.append(line)
            continue
        m = _HEADING.match(line)
        if m:
            section = m.group(1)
        elif line.strip() == "```" + INFO:
            block, start = [], ln
        elif line.strip().startswith("```") and INFO in line:
            raise AssertionError(f"FORMAT.md:{ln}: vector fence must be exactly ```{INFO}")
    assert block is None, f"FORMAT.md:{start}: unterminated vector block"
    return out


def section_table(text: str, section: str, first_col: str) -> list[list[str]]:
    """Rows (cells stripped of backticks) of the first table in ``section`` whose header's
    first cell is ``first_col``."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if (m := _HEADING.match(line)) and m.group(1) == section)
    rows, inside = [], False
    for line in lines[i + 1:]:
        if _HEADING.match(line):
            break
        if not line.startswith("|"):
            if inside:
                break
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if not inside:
            inside = cells[0] == first_col
            continue
        if set(cells[0]) <= set("-: "):
            continue
        rows.append([c.replace("`", "") for c in cells])
    assert rows, f"no table starting with {first_col!r} in §{section}"
    return rows


@pytest.fixture(scope="module")
def spec_text() -> str:
    return SPEC.read_text(encoding="utf-8")


def _load(spec_text):
    vecs = []
    for section, line, body in spec_vectors(spec_text):
        try:
            v = json.loads(body)
        except ValueError as e:
            raise AssertionError(f"FORMAT.md:{line}: vector is not JSON ({e})") from None
        assert isinstance(v, dict) and set(v) == {"name", "function", "input", "output"}, \
            f"FORMAT.md:{line}: a vector has exactly the keys name, function, input, output"
        assert v["function"] in FUNCTIONS, f"FORMAT.md:{line}: unknown vector function {v['function']!r}"
        vecs.append((section, line, v))
    return vecs


def _all_vectors():
    return _load(SPEC.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------- helpers
def h(s: str | list[str]) -> bytes:
    """Bytes of a hex string (spaces ignored; a list of strings is one string cut in lines)."""
    s = "".join("".join(s).split())
    assert re.fullmatch(r"([0-9a-f]{2})*", s), f"not lowercase hex: {s[:40]!r}"
    return bytes.fromhex(s)


def hx(b) -> str:
    return bytes(b).hex(" ")


def one_zstd_frame(data: bytes, p: int) -> tuple[bytes, int]:
    """The content of the zstd frame at ``data[p:]`` and the offset after it."""
    d = zstandard.ZstdDecompressor().decompressobj()
    content = d.decompress(data[p:])
    assert d.eof, "truncated zstd frame"
    return content, len(data) - len(d.unused_data)


def key3(s: str) -> int:
    b = s.encode("latin-1")
    assert len(b) == 3, s
    return (b[0] << 16) | (b[1] << 8) | b[2]


def unkey3(k: int) -> str:
    return bytes([(k >> 16) & 0xFF, (k >> 8) & 0xFF, k & 0xFF]).decode("latin-1")


# ------------------------------------------------------------------------------- the functions
def v_varint(inp, out):
    buf = bytearray()
    _put_varint(buf, inp)
    assert hx(buf) == hx(h(out))
    assert _get_varint(h(out), 0) == (inp, len(h(out)))


def v_zigzag(inp, out):
    assert _zz(np.array(inp, dtype=np.int64)).tolist() == out
    assert _unzz(np.array(out, dtype=np.uint32)).tolist() == inp


def v_shuffle(inp, out):
    dt = {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}[inp["width"]]
    assert hx(shuffle(np.array(inp["values"], dtype=dt))) == hx(h(out))
    assert unshuffle(h(out), inp["width"], dt).tolist() == inp["values"]


def v_reg2bin(inp, out):
    assert reg2bin(np.array([inp[0]]), np.array([inp[1]])).tolist() == [out]


def v_sort_key(inp, out):
    fx = np.zeros(1, dtype=[("refid", "<i4"), ("pos", "<i4"), ("flag", "<u2")])
    fx["refid"], fx["pos"], fx["flag"] = inp["refID"], inp["pos"], inp["flag"]
    assert f"{int(sort_keys(fx)[0]):016x}" == out


def v_sorted_header(inp, out):
    assert sorted_header_text(inp) == out
    assert sorted_header_text(out) == out  # a sorted header stays as it is


def v_seq_nibbles(inp, out):
    assert hx(unpack_nibbles(np.frombuffer(h(inp), np.uint8))) == hx(h(out))
    assert hx(pack_nibbles(np.frombuffer(h(out), np.uint8))) == hx(h(inp))


def v_bam_header(inp, out):
    hdr = BamHeader(inp["text"], [Reference(r["name"], r["length"]) for r in inp["references"]])
    assert hx(hdr.to_bytes()) == hx(h(out))
    back, used = parse_header(h(out))
    assert used == len(h(out)) and back == hdr


def _entries(rows) -> np.ndarray:
    e = np.zeros(len(rows), dtype=ENTRY_DTYPE)
    for i, r in enumerate(rows):
        assert set(r) == set(ENTRY_DTYPE.names), f"index entry fields {sorted(r)}"
        for k, v in r.items():
            e[i][k] = v
    return e


def v_index_page(inp, out):
    entries = _entries(inp)
    assert hx(_DZSTD.decompress(encode_index(entries))) == hx(h(out))
    back = decode_index(_ZSTD.compress(h(out)))
    assert back.tobytes() == entries.tobytes()


# names: the frame as {"method": 0, "names": hex} or {"method": 1, "fields": [{"kind", "content"}]}
def names_view(frame: bytes) -> dict:
    if frame[0] == 0:
        content, end = one_zstd_frame(frame, 1)
        assert end == len(frame)
        return {"method": 0, "names": hx(content)}
    assert frame[0] == 1
    nf = frame[1]
    heads = [struct.unpack_from("<BI", frame, 2 + 5 * f) for f in range(nf)]
    p, fields = 2 + 5 * nf, []
    for kind, size in heads:
        content, end = one_zstd_frame(frame[:p + size], p)
        assert end == p + size
        fields.append({"kind": kind, "content": hx(content)})
        p += size
    assert p == len(frame)
    return {"method": 1, "fields": fields}


def names_frame(view: dict) -> bytes:
    if view["method"] == 0:
        return b"\x00" + _ZSTD.compress(h(view["names"]))
    payloads = [_ZSTD.compress(h(f["content"])) for f in view["fields"]]
    return (bytes([1, len(payloads)]) + b"".join(struct.pack("<BI", f["kind"], len(p))
                                                  for f, p in zip(view["fields"], payloads)) + b"".join(payloads))


def _hexnorm(view):
    """The view with every hex string re-spelled canonically (for comparisons)."""
    if isinstance(view, dict):
        return {k: _hexnorm(v) for k, v in view.items()}
    if isinstance(view, list):
        return [_hexnorm(v) for v in view]
    if isinstance(view, str) and re.fullmatch(r"[0-9a-f \n]*", view) and len("".join(view.split())) % 2 == 0:
        return hx(h(view))
    return view


def v_names(inp, out):
    """``inp``: the names, each its l_read_name bytes in hex. A method-0 vector checks the
    writer's choice too; a method-1 vector checks the tokenised layout (choosing it is writer
    policy, §6.7)."""
    raw = [h(x) for x in inp]
    names = np.frombuffer(b"".join(raw), np.uint8)
    l_name = np.array([len(r) for r in raw], dtype=np.int64)
    frame = encode_names(names, l_name, _ZSTD) if out["method"] == 0 else _tokenised(names, l_name, _ZSTD)
    assert frame is not None, "the reference writer cannot tokenise these names"
    assert _hexnorm(names_view(frame)) == _hexnorm(out)
    got, l_dec = decode_names(names_frame(out), len(inp), _DZSTD)
    assert hx(got) == hx(names)
    if l_dec is not None:
        assert l_dec.tolist() == l_name.tolist()


# tags: {"method": 0, "areas": hex} or {"method": 1, "layouts": [[triple, ...], ...],
#        "columns": [[triple, hex], ...], "ids": hex}
def _tag_layouts(frame: bytes) -> tuple[list, int, int]:
    """The layout table of a tags frame of method 1 or 2 (§6.8, §12.3): (layouts, columns, offset)."""
    p = 1
    (nlay,) = struct.unpack_from("<I", frame, p)
    p += 4
    layouts = []
    for _ in range(nlay):
        (nt,) = struct.unpack_from("<H", frame, p)
        p += 2
        layouts.append([frame[p + 3 * i:p + 3 * i + 3].decode("latin-1") for i in range(nt)])
        p += 3 * nt
    (ncol,) = struct.unpack_from("<I", frame, p)
    return layouts, ncol, p + 4


def tags_view(frame: bytes) -> dict:
    if frame[0] == 0:
        content, end = one_zstd_frame(frame, 1)
        assert end == len(frame)
        return {"method": 0, "areas": hx(content)}
    assert frame[0] == 1
    layouts, ncol, p = _tag_layouts(frame)
    cols = []
    for _ in range(ncol):
        cols.append((frame[p:p + 3].decode("latin-1"), struct.unpack_from("<I", frame, p + 3)[0]))
        p += 7
    (idsize,) = struct.unpack_from("<I", frame, p)
    p += 4
    ids, end = one_zstd_frame(frame[:p + idsize], p)
    assert end == p + idsize
    p = end
    columns = []
    for key, size in cols:
        content, end = one_zstd_frame(frame[:p + size], p)
        assert end == p + size
        columns.append([key, hx(content)])
        p = end
    assert p == len(frame)
    return {"method": 1, "layouts": layouts, "columns": columns, "ids": hx(ids)}


def tags_frame(view: dict) -> bytes:
    if view["method"] == 0:
        return b"\x00" + _ZSTD.compress(h(view["areas"]))
    out = [b"\x01", struct.pack("<I", len(view["layouts"]))]
    for lay in view["layouts"]:
        out.append(struct.pack("<H", len(lay)) + b"".join(t.encode("latin-1") for t in lay))
    payloads = [_ZSTD.compress(h(c)) for _, c in view["columns"]]
    out.append(struct.pack("<I", len(payloads)))
    out += [k.encode("latin-1") + struct.pack("<I", len(p)) for (k, _), p in zip(view["columns"], payloads)]
    ids = _ZSTD.compress(h(view["ids"]))
    return b"".join(out) + struct.pack("<I", len(ids)) + ids + b"".join(payloads)


def v_tags(inp, out):
    areas = [h(a) for a in inp]
    buf = np.frombuffer(b"".join(areas), np.uint8)
    lens = np.array([len(a) for a in areas], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    assert _hexnorm(tags_view(encode_tags(buf, starts, lens, _ZSTD))) == _hexnorm(out)
    assert hx(decode_tags(tags_frame(out), lens, _DZSTD)) == hx(buf)


_CIGAR_OPS = "MIDNSHP=X"


def cigar_words(text: str) -> list[int]:
    """SAM CIGAR text -> BAM CIGAR words (``*`` -> none)."""
    if text == "*":
        return []
    return [(int(n) << 4) | _CIGAR_OPS.index(op) for n, op in re.findall(r"(\d+)([MIDNSHP=X])", text)]


def _cigars(texts):
    words = [cigar_words(t) for t in texts]
    return np.array([w for ws in words for w in ws], dtype=np.uint32), np.array([len(w) for w in words], np.int64)


def v_seq(inp, out):
    recs = inp  # [pos, CIGAR text, l_seq, nibbles (hex)] per record
    nib = np.frombuffer(b"".join(h(r[3]) for r in recs), np.uint8)
    l_seq = np.array([r[2] for r in recs], np.int64)
    pos = np.array([r[0] for r in recs], np.int64)
    cigar, n_cig = _cigars([r[1] for r in recs])
    assert hx(encode_seq(nib, l_seq, pos, cigar, n_cig, _ZSTD)) == hx(h(out))
    assert hx(decode_seq(h(out), l_seq, pos, cigar, n_cig, _DZSTD)) == hx(nib)


def tags2_view(frame: bytes) -> dict:
    assert frame[0] == 2
    layouts, ncol, p = _tag_layouts(frame)
    cols = []
    for _ in range(ncol):
        cols.append((frame[p:p + 3].decode("latin-1"), frame[p + 3], struct.unpack_from("<I", frame, p + 4)[0]))
        p += 8
    (idsize,) = struct.unpack_from("<I", frame, p)
    p += 4
    ids, p = one_zstd_frame(frame[:p + idsize], p)
    columns = []
    for key, model, size in cols:
        end = p + size
        if model == 0:
            content, q = one_zstd_frame(frame[:end], p)
        else:
            (fs,) = struct.unpack_from("<I", frame, p)
            flags, q = one_zstd_frame(frame[:p + 4 + fs], p + 4)
            vals, q = one_zstd_frame(frame[:end], q)
            content = {"flags": hx(flags), "values": hx(vals)}
        assert q == end
        columns.append([key, model, content if model else hx(content)])
        p = end
    assert p == len(frame)
    return {"method": 2, "layouts": layouts, "columns": columns, "ids": hx(ids)}


def tags2_frame(view: dict) -> bytes:
    out = [b"\x02", struct.pack("<I", len(view["layouts"]))]
    for lay in view["layouts"]:
        out.append(struct.pack("<H", len(lay)) + b"".join(t.encode("latin-1") for t in lay))
    payloads = []
    for _, model, c in view["columns"]:
        if model == 0:
            payloads.append(_ZSTD.compress(h(c)))
        else:
            f = _ZSTD.compress(h(c["flags"]))
            payloads.append(struct.pack("<I", len(f)) + f + _ZSTD.compress(h(c["values"])))
    out.append(struct.pack("<I", len(payloads)))
    out += [k.encode("latin-1") + bytes((m,)) + struct.pack("<I", len(p))
            for (k, m, _), p in zip(view["columns"], payloads)]
    ids = _ZSTD.compress(h(view["ids"]))
    return b"".join(out) + struct.pack("<I", len(ids)) + ids + b"".join(payloads)


def v_tags2(inp, out):
    areas = [h(a) for a in inp["areas"]]
    buf = np.frombuffer(b"".join(areas), np.uint8)
    lens = np.array([len(a) for a in areas], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    cigar, n_cig = _cigars(inp["cigars"])
    mate = mate_index(np.array(inp["links"], np.int64))
    md_ref = None
    if "seq" in inp:  # [pos, l_seq, nibbles] per record: the block consensus for MD (model 3)
        nib = np.frombuffer(b"".join(h(r[2]) for r in inp["seq"]), np.uint8)
        l_seq = np.array([r[1] for r in inp["seq"]], np.int64)
        pos = np.array([r[0] for r in inp["seq"]], np.int64)
        md_ref = (nib, l_seq, pos, *block_consensus(nib, l_seq, pos, cigar, n_cig))
    frame = encode_tags(buf, starts, lens, _ZSTD, cigar=cigar, n_cigar=n_cig, mate=mate, md_ref=md_ref)
    assert _hexnorm(tags2_view(frame)) == _hexnorm(out)
    got, got_lens = decode_tag_areas(tags2_frame(out), len(areas), _DZSTD, cigar=cigar, n_cigar=n_cig, mate=mate,
                                     md_ref=md_ref)
    assert hx(got) == hx(buf) and got_lens.tolist() == lens.tolist()


def v_lengths_hash(inp, out):
    assert hx(_lengths_hash(np.array(inp)).to_bytes(2, "little")) == hx(h(out))


def v_quals(inp, out):
    lengths = [len(r) for r in inp]
    qual = np.array([q for r in inp for q in r], dtype=np.uint8)
    assert hx(encode_quals(qual, lengths)) == hx(h(out))
    assert decode_quals(h(out), lengths).tolist() == qual.tolist()


def _frame_view(name: str, frame: bytes):
    if name == "name":
        return names_view(frame)
    if name == "tags":
        return tags_view(frame)
    if name == "qual":
        return hx(frame)
    content, end = one_zstd_frame(frame, 0)
    assert end == len(frame)
    return hx(content)


def _frame_from_view(name: str, view) -> bytes:
    if name == "name":
        return names_frame(view)
    if name == "tags":
        return tags_frame(view)
    if name == "qual":
        return h(view)
    return _ZSTD.compress(h(view))


def v_block(inp, out):
    records = h(inp)  # one hex string per record
    batch = RecordBatch.from_records_view(records)
    assert len(batch) == len(inp)
    blk = BlockEncoder(codecs=CODECS_V1).encode(batch)  # §6.11 shows a v1 block
    entry = out["entry"]
    # (crc32 and the stream sizes depend on the zstd encoder's bytes: checked on out["block"])
    assert {k: getattr(blk, k) for k in entry if k != "crc32"} == {k: v for k, v in entry.items() if k != "crc32"}
    frames = split_streams(blk.data, blk.stream_sizes)
    assert list(out["streams"]) == [n for n, _ in STREAMS]
    assert {n: _hexnorm(_frame_view(n, frames[n])) for n in frames} == _hexnorm(out["streams"])
    # the bytes written by the reference writer decode to the records
    data = h(out["block"])
    assert len(data) == sum(out["stream_sizes"]) and zlib.crc32(data) == entry["crc32"]
    got = decode_block(data, out["stream_sizes"], entry["n_records"], entry["ref_id"], entry["first_start"])
    assert hx(got.raw()) == hx(records)
    # ... and so does a block built from the stream contents by another zstd encoder
    rebuilt = [_frame_from_view(n, out["streams"][n]) for n, _ in STREAMS]
    got = decode_block(b"".join(rebuilt), [len(f) for f in rebuilt], entry["n_records"], entry["ref_id"],
                       entry["first_start"])
    assert hx(got.raw()) == hx(records)


def v_manifest(inp, out):
    m = Manifest.from_json(json.dumps(inp).encode())
    assert json.loads(m.to_json()) == out
    assert list(json.loads(m.to_json())) == list(out)  # the writer's field order


FUNCTIONS = {
    "varint": v_varint, "zigzag": v_zigzag, "shuffle": v_shuffle, "reg2bin": v_reg2bin,
    "sort_key": v_sort_key, "sorted_header": v_sorted_header, "seq_nibbles": v_seq_nibbles, "bam_header": v_bam_header,
    "index_page": v_index_page, "names": v_names, "tags": v_tags, "lengths_hash": v_lengths_hash,
    "seq": v_seq, "tags2": v_tags2,
    "quals": v_quals, "block": v_block, "manifest": v_manifest,
}


# ------------------------------------------------------------------------------- the tests
def test_vectors_are_well_formed_and_present(spec_text):
    vecs = _load(spec_text)
    names = [v["name"] for _, _, v in vecs]
    assert len(names) == len(set(names)), "vector names must be unique"
    per = {}
    for section, _, _ in vecs:
        per[section] = per.get(section, 0) + 1
    short = {s: (per.get(s, 0), n) for s, n in MIN_VECTORS.items() if per.get(s, 0) < n}
    assert not short, f"sections with fewer vectors than required (have, need): {short}"
    assert len(vecs) >= MIN_TOTAL
    assert {v["function"] for _, _, v in vecs} == set(FUNCTIONS), "every vector function is used"


@pytest.mark.parametrize("section,line,vector", _all_vectors(), ids=lambda x: x["name"] if isinstance(x, dict) else None)
def test_vector(section, line, vector):
    FUNCTIONS[vector["function"]](vector["input"], vector["output"])


def test_spec_vector_parser_finds_malformed_blocks():
    text = "## 0. X\n\n```bams3-vector\n{\"name\": 1}\n```\n"
    [(section, line, body)] = spec_vectors(text)
    assert section == "0" and line == 3
    with pytest.raises(AssertionError):
        _load(text)
    with pytest.raises(AssertionError):
        spec_vectors("```bams3-vector\n{}\n")  # unterminated
    with pytest.raises(AssertionError):
        spec_vectors("```bams3-vector json\n{}\n```\n")  # misspelt fence


# ----------------------------------------------------------------- tables of the spec vs the code
_TYPES = {"u8": "u1", "u16": "<u2", "u32": "<u4", "u64": "<u8", "i32": "<i4", "i64": "<i8"}


def test_index_entry_table_matches_the_code(spec_text):
    rows = section_table(spec_text, "5.1", "field")
    fields = [(r[0], r[1]) for r in rows]
    want = []
    for name in ENTRY_DTYPE.names:
        dt = ENTRY_DTYPE[name]
        t = {v: k for k, v in _TYPES.items()}[dt.base.str.replace("|", "")]
        want.append((name, f"{dt.shape[0]} × {t}" if dt.shape else t))
    assert fields == want
    assert ENTRY_DTYPE.itemsize == 120 and "120 bytes per entry" in spec_text


def test_stream_table_matches_the_code(spec_text):
    rows = section_table(spec_text, "6.2", "#")
    width = {"u8": 1, "u16": 2, "u32": 4}
    got = []
    for r in rows:
        w = width.get(r[3], 1)
        if r[2].startswith("zstd"):
            assert (r[2] == "zstd, shuffled") == (w > 1), r
        got.append((int(r[0]), r[1], w))
    assert got == [(i, n, w) for i, (n, w) in enumerate(STREAMS)]


def test_manifest_tables_match_the_code(spec_text):
    top = [r[0] for r in section_table(spec_text, "3.1", "field")]
    assert top == [f.name for f in dataclasses.fields(Manifest)]
    para = spec_text[spec_text.index("Required by the reference reader:"):]
    para = para[:para.index("Writers MUST write every field")]
    required = re.findall(r"`(\w+)`", para)
    assert required == [f.name for f in dataclasses.fields(Manifest)
                        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING] \
        + ["format", "version", "streams"]
    ref = [r[0] for r in section_table(spec_text, "3.2", "field")]
    assert ref == [f.name for f in dataclasses.fields(ObjectRef)]


def test_worked_example_tables_match_its_vector(spec_text):
    """The hex shown in the §6.11 stream table is the content the vector checks."""
    [block] = [v for _, _, v in _load(spec_text) if v["name"] == "worked-block"]
    streams = block["output"]["streams"]
    checked = 0
    for name, content, _ in section_table(spec_text, "6.11", "stream"):
        if re.fullmatch(r"[0-9a-f]{2}( [0-9a-f]{2})*", content):
            assert hx(h(streams[name])) == content, name
            checked += 1
        elif content.startswith("frame") and name == "qual":
            assert hx(h(streams[name])) == content.split(" ", 1)[1]
            checked += 1
    assert checked >= 15


def test_decoders_reject_what_the_spec_forbids():
    """§6.7: a string field holds exactly U values and nothing after; §0.1: a shuffled
    length that is not a multiple of the width."""
    view = {"method": 1, "fields": [{"kind": 0, "content": hx(b"a\0b\0")}, {"kind": 1, "content": "01 02 00 00 00 00 00 00"}]}
    names, _ = decode_names(names_frame(view), 2, _DZSTD)
    assert bytes(names) == b"a:1\0b:2\0"
    view["fields"][0]["content"] = hx(b"a\0b\0c")
    with pytest.raises(ValueError):
        decode_names(names_frame(view), 2, _DZSTD)
    with pytest.raises(ValueError):
        unshuffle(b"\0" * 6, 4, "<u4")
