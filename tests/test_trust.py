"""Never trust unchecked bytes (issue #13 items 2, 3, 7 and its fuzz test; issue #10 item 4).

- the manifest carries a checksum of its canonical JSON (FORMAT.md §3.5), checked on every read;
- a poisoned metadata cache entry (valid cache CRC, same ETag) is dropped and fetched again;
- object keys named by a manifest stay inside the dataset;
- ``Manifest.to_json`` survives a reference named like its old splice tokens;
- fuzz: flipped, truncated and swapped bytes of every object kind, local and on S3: every
  command gives the original answer or one line on stderr and exit 1; ``verify`` always fails.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading

import pytest

from bams3core.index import IndexError_, Manifest, ObjectRef, canonical_json, check_key, manifest_checksum
from conftest_data import BAMS3, samtools_view

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*argv, timeout: float = 60.0) -> tuple[int, bytes, str]:
    """``bams3 ARGV`` in-process (stdout as bytes, stderr as text), failing the test on a hang."""
    from bams3.cli import main

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="surrogateescape")
    err = io.StringIO()
    res: dict = {}

    def run():
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            res["rc"] = main([str(a) for a in argv])
        except SystemExit as e:
            res["rc"] = e.code
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            res["exc"] = e
        finally:
            sys.stdout, sys.stderr = saved

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"bams3 {argv} did not finish in {timeout} s"
    if "exc" in res:
        raise res["exc"]
    out.flush()
    return res["rc"], out.buffer.getvalue(), err.getvalue()


def one_line_error(rc, err: str, *needles) -> str:
    assert rc == 1, (rc, err)
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small dataset with several chunks, index objects of one and of two pages."""
    from bams3.sample import make_sample

    d = tmp_path_factory.mktemp("trust")
    paths = make_sample(d, n_pairs=400, seed=3)
    ds = d / "ds"
    rc, _, err = cli("convert", "-q", "--chunk-size", "8K", "--block-size", "2K", paths["bam"], ds)
    assert rc == 0, err
    return {"bam": paths["bam"], "ds": ds}


def _copy(small, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(small["ds"], ds)
    return ds


def _rewrite_manifest(ds, edit) -> None:
    """Apply ``edit`` to the parsed manifest and store it with a checksum that matches."""
    d = json.loads((ds / "manifest.json").read_bytes())
    edit(d)
    d["checksum"] = manifest_checksum(d)
    (ds / "manifest.json").write_text(json.dumps(d, indent=1))


# -- 1. the manifest checksum ---------------------------------------------------------------
def test_edited_manifest_is_refused_by_every_command(small, tmp_path):
    ds = _copy(small, tmp_path)
    text = (ds / "manifest.json").read_text()
    assert text.count('"name": "chr1"') == 1
    (ds / "manifest.json").write_text(text.replace('"name": "chr1"', '"name": "chr0"'))
    for argv in (["query", ds, "chr0"], ["query", ds], ["query", "-c", ds], ["stats", ds],
                 ["export", ds, tmp_path / "o.bam"], ["verify", ds]):
        rc, out, err = cli(*argv)
        one_line_error(rc, err, "manifest checksum mismatch", "corrupted")
        assert b"chr0" not in out


def test_flipped_flagstat_digit_is_refused(small, tmp_path):
    ds = _copy(small, tmp_path)
    text = (ds / "manifest.json").read_text()
    m = re.search(r'"flagstat": \[\s*\[\s*(\d+)', text)
    n = int(m.group(1))
    (ds / "manifest.json").write_text(text[:m.start(1)] + str(n + 1) + text[m.end(1):])
    for argv in (["stats", ds], ["stats", "--json", ds], ["verify", ds]):
        rc, out, err = cli(*argv)
        one_line_error(rc, err, "manifest checksum mismatch")
        assert out == b""


def test_manifest_checksum_is_written_and_round_trips(small):
    data = (small["ds"] / "manifest.json").read_bytes()
    d = json.loads(data)
    assert list(d)[-1] == "checksum" and re.fullmatch(r"sha256:[0-9a-f]{64}", d["checksum"])
    assert d["checksum"] == manifest_checksum(d)
    m = Manifest.from_json(data)
    assert m.checksum == d["checksum"] and m.to_json() == data  # the writer's bytes, reproduced


def test_manifest_without_checksum_reads_as_legacy(small, tmp_path):
    """Manifests written before the checksum existed (bams3 0.1) stay readable (§3.5)."""
    ds = _copy(small, tmp_path)
    d = json.loads((ds / "manifest.json").read_bytes())
    del d["checksum"]
    (ds / "manifest.json").write_text(json.dumps(d, indent=1))
    rc, out, err = cli("query", "-c", ds, "chr1")
    assert rc == 0 and out == cli("query", "-c", small["ds"], "chr1")[1], err
    rc, out, err = cli("verify", ds)
    assert rc == 0 and b"OK" in out and b"no checksum" in out, err


@pytest.mark.parametrize("bad", ['{"a": 1, "a": 2}', '{"a": 1.5}', '{"a": NaN}'])
def test_manifest_json_that_has_no_canonical_form_is_refused(bad):
    with pytest.raises(IndexError_):
        Manifest.from_json(bad.encode())


def _spec_blocks(tag: str) -> list[str]:
    text = open(os.path.join(ROOT, "docs", "FORMAT.md"), encoding="utf-8").read()
    return re.findall(r"```" + re.escape(tag) + r"\n(.*?)```", text, flags=re.S)


def test_format_md_manifest_checksum_example():
    """The worked example of FORMAT.md §3.5, parsed from the document."""
    (doc,) = _spec_blocks("json manifest-checksum-example")
    (canon,) = _spec_blocks("text manifest-checksum-canonical")
    (digest,) = _spec_blocks("text manifest-checksum-value")
    d = json.loads(doc)
    body = {k: v for k, v in d.items() if k != "checksum"}
    assert canonical_json(body) == canon.rstrip("\n").encode("ascii")
    assert manifest_checksum(d) == digest.strip() == d["checksum"]


# -- 2. poisoned cache entries ----------------------------------------------------------------
def _cache_entries(cache_dir):
    """(path, meta, data) of every entry of the S3 metadata cache."""
    from bams3.store.cache import _HDR, _MAGIC

    for dirpath, _dirs, files in os.walk(cache_dir):
        for name in files:
            if not name.endswith(".obj"):
                continue
            blob = open(os.path.join(dirpath, name), "rb").read()
            (hlen,) = _HDR.unpack_from(blob, len(_MAGIC))
            start = len(_MAGIC) + _HDR.size
            yield json.loads(blob[start:start + hlen]), blob[start + hlen:]


def _poison(cache_dir, pick, change, *, validated_at=None) -> int:
    """Rewrite matching cache entries with ``change(data)``: valid cache CRC, same ETag."""
    from bams3.store.cache import MetadataCache

    cache = MetadataCache(cache_dir)
    n = 0
    for meta, data in list(_cache_entries(os.path.join(cache_dir, "s3-v1"))):
        if pick(meta["key"]):
            cache.store(meta["ns"], meta["bucket"], meta["key"], change(data), etag=meta["etag"],
                        version_id=meta["version_id"], size=meta["size"],
                        validated_at=meta["validated_at"] if validated_at is None else validated_at)
            n += 1
    return n


def _flip(data: bytes, at: int | None = None) -> bytes:
    b = bytearray(data)
    b[len(b) // 2 if at is None else at] ^= 0x5A
    return bytes(b)


def test_poisoned_cache_entries_are_dropped_and_fetched_again(small, s3_env, tmp_path):
    uri = s3_env.uri("poison")
    assert cli("convert", "-q", "--chunk-size", "8K", "--block-size", "2K", small["bam"], uri)[0] == 0
    local = small["ds"]
    cmds = [["query", "-c", "{}", "chr1:1-150000"], ["query", "{}", "chr2"], ["query", "--no-PG", "-H", "{}"],
            ["stats", "{}"]]
    want = [cli(*[local if a == "{}" else a for a in c])[1] for c in cmds]

    def answers():
        return [cli(*[uri if a == "{}" else a for a in c]) for c in cmds]

    assert [a[1] for a in answers()] == want  # warms the cache: manifest, header, index, pages
    cache = s3_env.cache_dir
    # the manifest: same ETag, valid cache CRC, validated long ago (revalidation answers 304)
    assert _poison(cache, lambda k: k.endswith("manifest.json"),
                   lambda d: d.replace(b'"name": "chr1"', b'"name": "chr0"'), validated_at=0.0) == 1
    assert _poison(cache, lambda k: k.endswith("header.sam"), _flip) == 1
    assert _poison(cache, lambda k: "/index/" in k, _flip) == 2  # a page range (chr1), a whole object (chr2)
    for rc, out, err in answers():
        assert rc == 0, err
    assert [a[1] for a in answers()] == want
    # the entries were replaced by good bytes: poison none of them again and nothing changes
    assert all(b"chr0" not in data for meta, data in _cache_entries(cache) if meta["key"].endswith(".json"))

    # bad in the cache AND in the bucket: one line, exit 1 (evicted, fetched once, still bad)
    client = s3_env.client()
    hkey = next(meta["key"] for meta, _ in _cache_entries(cache) if meta["key"].endswith("header.sam"))
    body = client.get_object(Bucket=s3_env.bucket, Key=hkey)["Body"].read()
    client.put_object(Bucket=s3_env.bucket, Key=hkey, Body=_flip(body))
    _poison(cache, lambda k: k.endswith("header.sam"), _flip)
    rc, out, err = cli("query", "-H", uri)
    one_line_error(rc, err, "checksum mismatch", "header")
    rc, out, err = cli("verify", uri)
    one_line_error(rc, err, "checksum mismatch")


def test_corrupt_index_object_on_s3_without_cache(small, s3_env):
    """--no-cache reads straight from the bucket: a corrupt index object is one line, exit 1."""
    uri = s3_env.uri("nocache")
    assert cli("convert", "-q", "--chunk-size", "8K", "--block-size", "2K", small["bam"], uri)[0] == 0
    client = s3_env.client()
    key = "nocache/" + json.loads(client.get_object(Bucket=s3_env.bucket, Key="nocache/manifest.json")
                                  ["Body"].read())["index"][0]["key"]
    body = client.get_object(Bucket=s3_env.bucket, Key=key)["Body"].read()
    client.put_object(Bucket=s3_env.bucket, Key=key, Body=_flip(body, 10))
    for argv in (["query", "--no-cache", uri, "chr1:1-10000"], ["query", "--no-cache", uri]):
        rc, out, err = cli(*argv)
        one_line_error(rc, err, "checksum mismatch", "index")


# -- 3. keys stay inside the dataset ----------------------------------------------------------
@pytest.mark.parametrize("key", ["{rel}", "{abs}", "data/x/../../{rel}", "data\\..\\..\\x", "data/x/\u0000/h",
                                 "header.sam", "data//header.sam", "data/./x/header.sam"])
def test_manifest_keys_outside_the_dataset_are_refused(small, tmp_path, key):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"@CO\tsecret outside the dataset\n")
    ds = _copy(small, tmp_path)
    key = key.format(rel=os.path.relpath(secret, ds), abs=str(secret))

    def edit(d):
        d["header"].update(key=key, size=secret.stat().st_size,
                           sha256=hashlib.sha256(secret.read_bytes()).hexdigest())

    _rewrite_manifest(ds, edit)
    rc, out, err = cli("query", "-H", ds)
    one_line_error(rc, err, "is not a key inside the dataset")
    assert b"secret" not in out


def test_check_key():
    for ok in ("data/0123456789abcdef/header.sam", "data/r/index/0.b3i", "data/r/chunks/000001.b3c"):
        assert check_key(ok) == ok
    for bad in ("", "/data/r/x", "data", "data/x", "../data/r/x", "data/r/../../x", "data/r\\x", "data/r/x\x00",
                "manifest.json", "_tmp/r/run-000000", "data/r/", None, 7):
        with pytest.raises(IndexError_):
            check_key(bad)


def test_local_store_refuses_keys_outside_its_root(tmp_path):
    from bams3.errors import StoreError
    from bams3.store.local import LocalStore

    (tmp_path / "outside.txt").write_text("x")
    st = LocalStore(str(tmp_path / "ds"))
    for key in ("../outside.txt", "/etc/hostname", "a/../../outside.txt", "a\\..\\..\\outside.txt", "a/\x00b"):
        with pytest.raises(StoreError):
            st.get(key)
        with pytest.raises(StoreError):
            st.set(key, b"y")
    assert (tmp_path / "outside.txt").read_text() == "x"
    st.set("data/r/x.b3c", b"ok")
    assert st.get("data/r/x.b3c") == b"ok"


# -- 4. to_json without splicing --------------------------------------------------------------
def test_manifest_json_with_reference_named_like_a_splice_token():
    names = ["@@pages0@@", "@@pages1@@", '"@@pages0@@"', "chr1"]
    index = [ObjectRef(key=f"data/r/index/{i}.b3i", size=30, sha256="0" * 64, n_blocks=3, n_records=9, ref_id=i,
                       pages=[[0, 10, 2, 5, 900, 1], [10, 20, 1, 800, 1200, 2 + i]]) for i in range(2)]
    m = Manifest(references=[{"name": n, "length": 2000} for n in names],
                 header=ObjectRef("data/r/header.sam", 1, "1" * 64), chunks=[], index=index, n_records=9,
                 stats={}, run_id="r", created="now", tool="t", block_bytes=1, chunk_bytes=1)
    back = Manifest.from_json(m.to_json())
    assert [r["name"] for r in back.references] == names
    assert [ix.pages for ix in back.index] == [ix.pages for ix in index]


def test_dataset_with_reference_named_like_a_splice_token(tmp_path):
    sam = tmp_path / "in.sam"
    recs = [f"r{i}\t0\t@@pages0@@\t{10 * i + 1}\t60\t4M\t*\t0\t0\tACGT\tIIII" for i in range(3)]
    recs += [f"s{i}\t0\t@@pages1@@\t{10 * i + 1}\t60\t4M\t*\t0\t0\tACGT\tIIII" for i in range(2)]
    sam.write_text("@HD\tVN:1.6\tSO:coordinate\n@SQ\tSN:@@pages0@@\tLN:1000\n@SQ\tSN:@@pages1@@\tLN:1000\n"
                   + "\n".join(recs) + "\n")
    ds = tmp_path / "ds"
    rc, _, err = cli("convert", "-q", sam, ds)
    assert rc == 0, err
    rc, out, err = cli("query", ds)
    assert rc == 0 and out.decode() == samtools_view(sam), err
    rc, out, err = cli("query", "-c", ds, "@@pages1@@")
    assert (rc, out) == (0, b"2\n"), err
    rc, out, err = cli("verify", ds)
    assert rc == 0, err


# -- 5. fuzz: every object kind, local and S3 --------------------------------------------------
class _LocalObjects:
    def __init__(self, ds):
        self.ds = ds

    def get(self, key):
        return (self.ds / key).read_bytes()

    def put(self, key, data):
        (self.ds / key).write_bytes(data)


class _S3Objects:
    def __init__(self, s3_env, prefix):
        self.client, self.bucket, self.prefix = s3_env.client(), s3_env.bucket, prefix

    def get(self, key):
        return self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"].read()

    def put(self, key, data):
        self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=data)


def _mutations(manifest: dict, rng: random.Random, n_per_kind: int, ops=("flip", "truncate", "swap-bytes")):
    """(name, {key: new bytes} builder) for flips, truncations and swaps of every object kind."""
    chunks = [c["key"] for c in manifest["chunks"]]
    paged = max(manifest["index"], key=lambda ix: len(ix.get("pages") or []))
    kinds = {"manifest": ["manifest.json"], "header": [manifest["header"]["key"]],
             "index": [ix["key"] for ix in manifest["index"]], "chunk": chunks}
    out = []
    for kind, keys in kinds.items():
        for op in ops:
            for _ in range(n_per_kind):
                out.append((kind, op, rng.choice(keys), rng.random(), rng.random(), rng.randrange(1, 256)))
    # a flip inside the second page of the paged index (what a region query reads)
    p = paged["pages"][-1]
    out.append(("index-page", "flip-at", paged["key"], p[0] + rng.randrange(p[1]), 0.0, 0x01))
    i, j = rng.sample(range(len(chunks)), 2)
    out.append(("chunk", "swap-objects", chunks[i], 0.0, 0.0, j))
    return out, chunks


def _apply(obj, op, key, a, b, c, chunks, orig) -> dict[str, bytes]:
    data = orig(key)
    if op == "flip":
        k = int(a * len(data))
        return {key: data[:k] + bytes([data[k] ^ c]) + data[k + 1:]}
    if op == "flip-at":
        return {key: data[:int(a)] + bytes([data[int(a)] ^ c]) + data[int(a) + 1:]}
    if op == "truncate":
        return {key: data[:int(a * len(data))]}
    if op == "swap-bytes":
        i, j = sorted((int(a * len(data)), int(b * len(data))))
        b2 = bytearray(data)
        b2[i], b2[j] = b2[j], b2[i]
        return {key: bytes(b2)}
    other = chunks[c]
    return {key: orig(other), other: data}


def _matters(key, old: bytes, new: bytes) -> bool:
    if old == new:
        return False
    if key == "manifest.json":
        try:
            return json.loads(new) != json.loads(old)
        except ValueError:
            return True
    return True


def _fuzz(objects, uri, tmp_path, rng, n_per_kind, set_cache=None, ops=None, quick=False) -> int:
    orig_cache: dict[str, bytes] = {}

    def orig(key):
        if key not in orig_cache:
            orig_cache[key] = objects.get(key)
        return orig_cache[key]

    manifest = json.loads(orig("manifest.json"))
    out_bam = tmp_path / "fuzz-out.bam"
    cmds = [["query", uri], ["query", uri, "chr1:100000-300000", "chr2:1-50000"], ["query", "-c", uri, "chr1:1-150000"],
            ["query", "-c", uri], ["query", "--no-PG", "-H", uri], ["stats", uri], ["export", uri, out_bam],
            ["verify", uri]]
    if quick:  # these read every object: the manifest, index pages, whole index objects, chunks
        cmds = [cmds[1], cmds[3], cmds[7]]

    def run_all(tag):
        if set_cache:
            set_cache(tag)
        res = []
        for argv in cmds:
            if out_bam.exists():
                out_bam.unlink()
            rc, out, err = cli(*argv)
            if argv[0] == "export" and rc == 0:
                out = out_bam.read_bytes()
            res.append((rc, out, err))
        return res

    base = run_all("base")
    assert all(rc == 0 for rc, _, _ in base), [err for _, _, err in base]
    muts, chunks = _mutations(manifest, rng, n_per_kind, **({"ops": ops} if ops else {}))
    n = 0
    for i, (kind, op, key, a, b, c) in enumerate(muts):
        new = _apply(objects, op, key, a, b, c, chunks, orig)
        matters = any(_matters(k, orig(k), v) for k, v in new.items())
        for k, v in new.items():
            objects.put(k, v)
        try:
            got = run_all(f"m{i}")
        finally:
            for k in new:
                objects.put(k, orig(k))
        for argv, (rc, out, err), (_, want, _) in zip(cmds, got, base):
            what = f"{kind} {op} {key} ({a:.3f}, {b:.3f}, {c}): bams3 {' '.join(map(str, argv))}"
            if rc == 0:
                assert out == want, what
            else:
                assert rc == 1 and "Traceback" not in err and "internal error" not in err, (what, rc, err)
                assert len([x for x in err.splitlines() if x.strip()]) == 1, (what, err)
        if matters:
            assert got[-1][0] == 1, f"verify passed after {kind} {op} of {key}"
        n += 1
    return n


def test_fuzz_local(small, tmp_path):
    ds = _copy(small, tmp_path)
    n = _fuzz(_LocalObjects(ds), str(ds), tmp_path, random.Random(1301), n_per_kind=1)
    assert n >= 14


def test_fuzz_s3(small, s3_env, tmp_path, monkeypatch):
    uri = s3_env.uri("fuzz")  # fewer, larger chunks than the local copy: fewer requests per command
    assert cli("convert", "-q", "--chunk-size", "32K", "--block-size", "2K", small["bam"], uri)[0] == 0

    def fresh_cache(tag):  # each mutation starts cold, then the commands share the cache
        monkeypatch.setenv("BAMS3_CACHE_DIR", str(tmp_path / f"cache-{tag}"))

    n = _fuzz(_S3Objects(s3_env, "fuzz"), uri, tmp_path, random.Random(1302), n_per_kind=1,
              set_cache=fresh_cache, quick=True)
    assert n >= 14


def test_fuzz_subprocess_never_a_traceback_or_a_hang(small, tmp_path):
    """A few of the fuzz cases through the real CLI process, with a timeout."""
    ds = _copy(small, tmp_path)
    m = json.loads((ds / "manifest.json").read_bytes())
    cases = [("manifest.json", lambda d: _flip(d, len(d) // 3)),
             (m["chunks"][1]["key"], lambda d: d[:len(d) // 2])]
    env = dict(os.environ, BAMS3_CACHE_DIR=str(tmp_path / "cache"))
    for key, change in cases:
        path = ds / key
        orig = path.read_bytes()
        path.write_bytes(change(orig))
        try:
            for argv in (["query", ds], ["verify", ds]):
                r = subprocess.run(BAMS3 + [str(a) for a in argv], capture_output=True, timeout=60, env=env)
                err = r.stderr.decode()
                if r.returncode != 0:
                    one_line_error(r.returncode, err)
                else:
                    assert False, (key, argv, "exit 0 on a damaged dataset")
        finally:
            path.write_bytes(orig)


# -- 6. --refresh (issue #12 item 3, in part) ---------------------------------------------------
def test_refresh_sees_a_commit_made_by_another_machine(small, s3_env, tmp_path, monkeypatch):
    uri = s3_env.uri("refresh")
    assert cli("convert", "-q", small["bam"], uri)[0] == 0
    rc, before, err = cli("stats", "--json", uri)  # cached: trusted for the TTL (300 s)
    assert rc == 0, err
    sam = tmp_path / "other.sam"
    sam.write_text("@HD\tVN:1.6\tSO:coordinate\n@SQ\tSN:chrX\tLN:1000\nr1\t0\tchrX\t5\t60\t4M\t*\t0\t0\tACGT\tIIII\n")
    monkeypatch.setenv("BAMS3_CACHE_DIR", str(tmp_path / "machine-b"))  # another machine's cache
    assert cli("convert", "-q", "--overwrite", sam, uri)[0] == 0
    monkeypatch.setenv("BAMS3_CACHE_DIR", s3_env.cache_dir)
    assert cli("stats", "--json", uri)[1] == before  # the stale copy, within its TTL
    rc, out, err = cli("stats", "--json", "--refresh", uri)
    assert rc == 0 and json.loads(out)["records"] == 1, err
    assert cli("query", "-c", "--refresh", uri)[1] == b"1\n"
    assert cli("query", uri)[1].startswith(b"r1\t0\tchrX\t5\t")  # the cache now holds the new commit
