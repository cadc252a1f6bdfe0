"""`bams3 serve` as an htsget 1.3 server, against samtools (pysam's, built with libcurl: htslib
follows htsget tickets itself) and the GA4GH `htsget` Python client.

One server for the module, on a local root holding a simulated dataset converted with small
blocks (regions cross block boundaries) and a damaged copy of it; one more on an S3 root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import httpx
import pysam
import pytest

from bams3.dataset import Dataset
from bams3.store import LocalStore
from conftest_data import run_cli, samtools_view
from serve_util import Server

DS = "cohort/s1.bams3"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from bams3.sample import make_sample

    d = tmp_path_factory.mktemp("serve")
    paths = make_sample(d / "src", n_pairs=8000, seed=3)
    root = d / "root"
    ds = root / DS
    run_cli("convert", "-q", "--block-size", "16K", "--chunk-size", "128K", paths["bam"], ds)
    shutil.copytree(ds, root / "damaged.bams3")
    server = Server(root, log_path=d / "serve.log")
    try:
        yield {"url": server.url, "bam": paths["bam"], "root": root, "ds": ds, "server": server}
    finally:
        server.stop()


def _reads(served, ds=DS, **params) -> str:
    q = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{served['url']}/reads/{ds}" + (f"?{q}" if q else "")


def _block_boundary(ds_path) -> int:
    """A position on chr1 where one block ends and the next begins."""
    rows = Dataset.open(LocalStore(str(ds_path))).index(0)
    assert len(rows) > 10
    return int(rows["first_start"][len(rows) // 2])


def _empty_window(bam) -> tuple[str, int, int]:
    """A 20 bp window no read overlaps (0-based, half-open)."""
    with pysam.AlignmentFile(str(bam)) as f:
        for name, length in zip(f.references, f.lengths):
            for beg in range(0, length - 20, 97):
                if f.count(name, beg, beg + 20) == 0:
                    return name, beg, beg + 20
    raise AssertionError("no empty window in the sample")


def test_samtools_follows_tickets(served):
    """samtools view URL == samtools view SOURCE.bam REGION, region by region (htsget coordinates:
    start 0-based inclusive, end exclusive)."""
    boundary = _block_boundary(served["ds"])
    ename, ebeg, eend = _empty_window(served["bam"])
    cases = [
        (dict(referenceName="chr1", start=999, end=2000), ["chr1:1000-2000"]),
        (dict(referenceName="chr1", start=boundary - 400, end=boundary + 400), [f"chr1:{boundary - 399}-{boundary + 400}"]),
        (dict(referenceName="chr3"), ["chr3"]),
        (dict(referenceName=ename, start=ebeg, end=eend), [f"{ename}:{ebeg + 1}-{eend}"]),  # no reads there
        (dict(referenceName="chrM", start=16000), ["chrM:16001"]),                    # start only
        (dict(referenceName="chr2", end=3000), ["chr2:1-3000"]),                      # end only
        (dict(referenceName="*"), ["*"]),                                            # unplaced reads
        ({}, []),                                                                    # every record
    ]
    for params, region in cases:
        want = samtools_view(served["bam"], *region)
        got = samtools_view(_reads(served, **params))
        assert got == want, (params, len(got.splitlines()), len(want.splitlines()))
    assert samtools_view(_reads(served, referenceName=ename, start=ebeg, end=eend)) == ""
    assert len(samtools_view(_reads(served, referenceName="*")).splitlines()) > 50
    # an empty range (start == end) is a valid, empty BAM
    assert samtools_view(_reads(served, referenceName="chr1", start=5000, end=5000)) == ""


def test_header_class(served):
    want = samtools_view("--no-PG", "-H", served["bam"])
    assert samtools_view("--no-PG", "-H", _reads(served, **{"class": "header"})) == want
    assert samtools_view("--no-PG", "-H", _reads(served, referenceName="chr1", start=0, end=10)) == want
    t = httpx.get(_reads(served, **{"class": "header"})).json()["htsget"]
    assert [u["class"] for u in t["urls"]] == ["header", "header"]
    assert t["urls"][1]["url"].startswith("data:")  # the EOF block


def test_ticket_shape(served):
    r = httpx.get(_reads(served, referenceName="chr1", start=999, end=2000, format="BAM"))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/vnd.ga4gh.htsget.v1.3.0+json")
    assert r.text.startswith('{"htsget":')
    t = r.json()["htsget"]
    assert t["format"] == "BAM"
    assert [u["class"] for u in t["urls"]] == ["header", "body", "body"]
    assert t["urls"][0]["url"].startswith(served["url"] + "/data/cohort/s1.bams3?")
    # a whole-dataset ticket: one body URL per reference holding records, then the EOF
    t = httpx.get(_reads(served)).json()["htsget"]
    n_refs = len(pysam.AlignmentFile(served["bam"]).references)
    assert len(t["urls"]) == 1 + n_refs + 1 + 1  # header, references, unplaced, EOF
    info = httpx.get(served["url"] + "/reads/service-info").json()
    assert info["type"] == {"group": "org.ga4gh", "artifact": "htsget", "version": "1.3.0"}
    assert info["htsget"]["formats"] == ["BAM"] and info["htsget"]["datatype"] == "reads"


def test_htsget_client(served, tmp_path):
    """The GA4GH `htsget` client downloads a BAM whose records are samtools' for the region."""
    htsget = pytest.importorskip("htsget")
    for kw, region in ((dict(reference_name="chr2", start=50000, end=60000), ["chr2:50001-60000"]),
                       (dict(reference_name="chrM"), ["chrM"])):
        out = tmp_path / "client.bam"
        with open(out, "wb") as f:
            htsget.get(f"{served['url']}/reads/{DS}", f, **kw)
        assert samtools_view(out) == samtools_view(served["bam"], *region), kw
        assert samtools_view("--no-PG", "-H", out) == samtools_view("--no-PG", "-H", served["bam"])


def test_cors(served):
    origin = "http://viewer.example"
    r = httpx.options(_reads(served), headers={"Origin": origin, "Access-Control-Request-Method": "GET",
                                               "Access-Control-Request-Headers": "range,authorization"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == origin
    assert "GET" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"].lower() == "range,authorization"
    assert r.headers["access-control-max-age"] == str(30 * 86400)
    r = httpx.get(_reads(served, referenceName="chr1", start=0, end=100), headers={"Origin": origin})
    assert r.headers["access-control-allow-origin"] == origin
    body_url = r.json()["htsget"]["urls"][1]["url"]
    r = httpx.get(body_url, headers={"Origin": origin})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    err = httpx.get(_reads(served, ds="nope"), headers={"Origin": origin})
    assert err.status_code == 404 and err.headers["access-control-allow-origin"] == origin


@pytest.mark.parametrize("path, status, error", [
    ("/reads/nope", 404, "NotFound"),
    ("/reads/cohort/%2E%2E/cohort/s1.bams3", 404, "NotFound"),  # ".." (httpx would resolve it)
    ("/reads/cohort", 404, "NotFound"),
    (f"/reads/{DS}?referenceName=chrZ", 404, "NotFound"),
    (f"/reads/{DS}?referenceMD5=0123456789abcdef0123456789abcdef", 404, "NotFound"),
    (f"/reads/{DS}?referenceName=chr1&start=2000&end=1000", 400, "InvalidRange"),
    (f"/reads/{DS}?start=10", 400, "InvalidInput"),
    (f"/reads/{DS}?referenceName=*&start=10", 400, "InvalidInput"),
    (f"/reads/{DS}?referenceName=chr1&start=ten", 400, "InvalidInput"),
    (f"/reads/{DS}?referenceName=chr1&end=4294967296", 400, "InvalidInput"),
    (f"/reads/{DS}?referenceName=chr1&referenceName=chr2", 400, "InvalidInput"),
    (f"/reads/{DS}?format=CRAM", 400, "UnsupportedFormat"),
    (f"/reads/{DS}?class=body", 400, "InvalidInput"),
    (f"/reads/{DS}?class=header&referenceName=chr1", 400, "InvalidInput"),
    (f"/reads/{DS}?fields=QNAME,NOPE", 400, "InvalidInput"),
    (f"/reads/{DS}?tags=NM,MD&notags=MD", 400, "InvalidInput"),
    (f"/data/{DS}?part=header", 400, "InvalidInput"),
    (f"/data/{DS}?run=0123456789abcdef&part=header", 404, "NotFound"),
])
def test_errors_are_the_spec_json(served, path, status, error):
    r = httpx.get(served["url"] + path)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/vnd.ga4gh.htsget")
    body = r.json()
    assert set(body) == {"htsget"} and body["htsget"]["error"] == error
    assert body["htsget"]["message"] and "Traceback" not in r.text


def test_bad_data_parts(served):
    t = httpx.get(_reads(served, referenceName="chr1", start=0, end=100)).json()["htsget"]
    body = t["urls"][1]["url"]
    for bad in ("r=99%3A0-10", "r=x", "r=%3D0&r=0%3A1-2"):
        r = httpx.get(body.split("&r=")[0] + "&" + bad)
        assert r.status_code == 400 and r.json()["htsget"]["error"] == "InvalidInput", bad


def test_concurrent_requests(served):
    """Eight clients at once, each getting its own region right."""
    regions = [("chr1", 10000 * i, 10000 * i + 5000) for i in range(6)] + [("chr2", 0, 100000), ("chr3", 500, 90000)]
    results, errors = {}, []

    def fetch(name, beg, end):
        try:
            results[(name, beg)] = samtools_view(_reads(served, referenceName=name, start=beg, end=end))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=fetch, args=r) for r in regions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for name, beg, end in regions:
        assert results[(name, beg)] == samtools_view(served["bam"], f"{name}:{beg + 1}-{end}")


def test_damaged_chunk_mid_stream_cuts_the_response(served):
    """A chunk that cannot be read after the response started: the transfer is cut short (no
    final chunk), so a client sees a truncated response rather than a short BAM; the server
    logs one line and keeps serving."""
    ds = served["root"] / "damaged.bams3"
    chunks = sorted((ds / "data").glob("*/chunks/*.b3c"))
    assert len(chunks) > 4
    t = httpx.get(_reads(served, ds="damaged.bams3", referenceName="chr1")).json()["htsget"]
    chunks[3].unlink()
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("GET", t["urls"][1]["url"]) as r:
            assert r.status_code == 200
            for _ in r.iter_bytes():
                pass
    # a request whose first block is missing gets an error status, not a stream
    chunks[0].unlink()
    r = httpx.get(t["urls"][1]["url"])
    assert r.status_code >= 400 and r.json()["htsget"]["error"]
    assert "cut short" in served["server"].log() and "Traceback" not in served["server"].log()
    assert httpx.get(served["url"] + "/reads/service-info").status_code == 200


def test_ids_with_slashes_and_the_listing(served):
    r = httpx.get(served["url"] + "/")
    assert r.status_code == 200
    assert DS in r.text and "damaged.bams3" in r.text
    n = int(samtools_view("-c", served["bam"]).strip())
    assert f"{n:,}" in r.text


def test_s3_root(s3_env, served, tmp_path):
    """The root can be an s3:// prefix: the same answers as for the local dataset."""
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION", "BAMS3_CACHE_DIR", "AWS_SHARED_CREDENTIALS_FILE",
                                      "AWS_CONFIG_FILE", "AWS_EC2_METADATA_DISABLED")}
    run_cli("convert", "-q", "--block-size", "16K", served["bam"], s3_env.uri("root/" + DS), env=env)
    server = Server(s3_env.uri("root"), env=env, log_path=tmp_path / "s3serve.log")
    try:
        url = f"{server.url}/reads/{DS}"
        # samtools in another process: moto runs in this one, and pysam's samtools holds the GIL
        got = subprocess.run([sys.executable, "-c", "import pysam, sys; sys.stdout.write(pysam.samtools.view(sys.argv[1]))",
                              url + "?referenceName=chr1&start=999&end=2000"], capture_output=True, text=True, timeout=120)
        assert got.returncode == 0, got.stderr
        assert got.stdout == samtools_view(served["bam"], "chr1:1000-2000")
        htsget = pytest.importorskip("htsget")
        out = tmp_path / "s3.bam"
        with open(out, "wb") as f:
            htsget.get(url, f, reference_name="*")
        assert samtools_view(out) == samtools_view(served["bam"], "*")
        r = httpx.get(f"{server.url}/reads/root-missing")
        assert r.status_code == 404 and r.json()["htsget"]["error"] == "NotFound"
        assert DS in httpx.get(server.url + "/").text
    finally:
        server.stop()


def test_cli_errors_are_one_line(served, tmp_path):
    port = served["url"].rsplit(":", 1)[1]
    for args, want in ((["--port", port], f"bams3: cannot listen on 127.0.0.1:{port}: Address already in use"),
                       ([], None)):
        root = served["root"] if args else tmp_path / "missing"
        r = run_cli("serve", root, *args, check=False)
        assert r.returncode == 1
        err = r.stderr.decode()
        assert err.count("\n") == 1 and "Traceback" not in err
        if want:
            assert err.strip() == want
        else:
            assert err.strip() == f"bams3: {root}: no such directory (DATASET_ROOT is a directory or s3://bucket/prefix)"


def _download(ticket: dict, path) -> None:
    import base64

    with open(path, "wb") as f:
        for u in ticket["htsget"]["urls"]:
            if u["url"].startswith("data:"):
                f.write(base64.b64decode(u["url"].split(",", 1)[1]))
            else:
                r = httpx.get(u["url"], headers=u.get("headers", {}))
                assert r.status_code == 200
                f.write(r.content)


def test_post_regions(served, tmp_path):
    """POST: several regions, answered in file order with each record once (samtools view -M)."""
    body = {"format": "BAM", "fields": ["QNAME", "POS"], "regions": [
        {"referenceName": "chr2", "start": 2000, "end": 3000},
        {"referenceName": "chr1", "start": 999, "end": 2000},
        {"referenceName": "chr1", "start": 1500, "end": 2500},
        {"referenceName": "*"}]}
    r = httpx.post(_reads(served), json=body)
    assert r.status_code == 200, r.text
    _download(r.json(), tmp_path / "post.bam")
    want = samtools_view("-M", served["bam"], "chr2:2001-3000", "chr1:1000-2000", "chr1:1501-2500", "*")
    assert samtools_view(tmp_path / "post.bam") == want and want
    for bad, err in (({"regions": []}, "InvalidInput"), ({"regions": [{"start": 1}]}, "InvalidInput"),
                     ({"regions": [{"referenceName": "chr1", "start": 5, "end": 5}]}, "InvalidRange"),
                     ({"regions": [{"referenceName": "chrZ"}]}, "NotFound"),
                     ({"class": "header", "regions": [{"referenceName": "chr1"}]}, "InvalidInput"),
                     ({"format": "CRAM"}, "UnsupportedFormat"), ([1, 2], "InvalidInput")):
        r = httpx.post(_reads(served), json=bad)
        assert r.status_code in (400, 404) and r.json()["htsget"]["error"] == err, (bad, r.text)
    r = httpx.post(_reads(served), content=b"x" * (2 << 20))
    assert r.status_code == 413 and r.json()["htsget"]["error"] == "PayloadTooLarge"
    r = httpx.post(_reads(served, referenceName="chr1"), json={})
    assert r.status_code == 400 and r.json()["htsget"]["error"] == "InvalidInput"


def test_bgzf_encoder(tmp_path):
    """bams3core.bgzf: blocks htslib reads back, incompressible input included."""
    import gzip

    from bams3core.bgzf import BLOCK_INPUT, EOF, BgzfEncoder, compress_block

    data = os.urandom(150_000) + b"ACGT" * 60_000
    enc = BgzfEncoder()
    out = b"".join(enc.encode(data[i:i + 7777]) for i in range(0, len(data), 7777)) + enc.flush() + EOF
    assert gzip.decompress(out) == data
    (tmp_path / "x.gz").write_bytes(out)
    with pysam.BGZFile(str(tmp_path / "x.gz")) as f:
        assert f.read() == data
    assert len(compress_block(os.urandom(BLOCK_INPUT))) <= 1 << 16
    with pytest.raises(ValueError):
        compress_block(b"x" * (BLOCK_INPUT + 1))
