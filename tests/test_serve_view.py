"""The igv.js view of `bams3 serve` in a real browser (Debian's headless Chromium, driven by
Playwright; no browser is downloaded). The alignments igv.js loaded over the server's htsget
endpoint are counted from the page and compared with samtools; the screenshot the README
shows is saved as docs/igv-view.png. Readable errors: unknown dataset, unknown contig, a locus
too wide, a server that stopped.
"""

from __future__ import annotations

import html
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from conftest_data import run_cli, samtools_view
from serve_util import Server

DS = "cohort/s1.bams3"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _find_chromium() -> str | None:
    for path in (os.environ.get("BAMS3_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if path and os.path.exists(path):
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium; apt-get installed here if missing and we may (as the benchmark does
    for samtools). Skipped, saying why, only where it cannot be installed."""
    path = _find_chromium()
    if path is None:
        from bench.util import ensure_tools

        try:
            path = ensure_tools(["chromium"])["chromium"]
        except (RuntimeError, OSError) as e:
            pytest.skip(f"no Chromium and it cannot be installed here: {' '.join(str(e).split())}")
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from bams3.sample import make_sample

    d = tmp_path_factory.mktemp("view")
    paths = make_sample(d / "src", n_pairs=12000, seed=11)
    run_cli("convert", "-q", "--block-size", "64K", paths["bam"], d / "root" / DS)
    server = Server(d / "root", log_path=d / "serve.log")
    try:
        yield {"url": server.url, "bam": paths["bam"], "root": d / "root", "fasta": paths["reference"]}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(chromium):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 560})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url)
    return page, requests


def _wait_drawn(page):
    page.wait_for_function("window.bams3 && window.bams3.loads > 0 || (window.bams3 && window.bams3.error)",
                           timeout=60000)
    assert page.evaluate("window.bams3.error") is None
    # igv.js draws each track's viewport on its own canvas (inside igv.js's shadow DOM)
    page.wait_for_function("""() => { const t = window.bams3.browser.findTracks(t => t.type === "alignment")[0];
        const vp = t && t.trackView.viewports[0];
        return !!(vp && vp.canvas && vp.canvas.width > 0); }""", timeout=30000)


_LOADED = """([beg, end]) => {
    const track = window.bams3.browser.findTracks(t => t.type === "alignment")[0];
    const c = track.getCachedAlignmentContainers()[0];
    const all = c.allAlignments();
    const hits = all.filter(a => a.start < end && a.start + Math.max(a.lengthOnRef, 1) > beg);
    return {chr: c.chr, start: c.start, end: c.end, loaded: all.length, overlapping: hits.length};
}"""


def test_view_loads_every_alignment_of_the_locus(site, browser):
    """igv.js loads, through /reads, exactly the mapped reads samtools returns for the locus
    (igv.js never shows unmapped reads; its QC-fail and duplicate filters are off), and draws
    the coverage and alignment tracks offline."""
    page, requests = _open(browser, f"{site['url']}/view/{DS}?locus=chr1:20,001-21,000")
    _wait_drawn(page)
    got = page.evaluate(_LOADED, [20000, 21000])
    want = int(samtools_view("-c", "-F", "4", site["bam"], "chr1:20001-21000"))
    assert want > 20
    assert got["chr"] == "chr1" and got["start"] <= 20000 and got["end"] >= 21000
    assert got["overlapping"] == want, got
    # everything the page fetched came from this server (igv.js is shipped, never a CDN)
    hosts = {urlparse(u).netloc for u in requests if not u.startswith("data:")}
    assert hosts == {urlparse(site["url"]).netloc}
    assert any("/reads/" + DS in u for u in requests) and any("/data/" + DS in u for u in requests)
    assert page.input_value("#locus").replace(",", "") == "chr1:20001-21000"
    page.wait_for_timeout(300)
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "igv-view.png"))
    page.close()


@pytest.mark.parametrize("path, status, text", [
    ("/view/nope.bams3?locus=chr1:1-100", 404, "no dataset 'nope.bams3'"),
    (f"/view/{DS}?locus=chrZ:1-100", 400, "unknown contig 'chrZ'"),
    (f"/view/{DS}?locus=chr1:1-300000", 400, "spans 300,000 bp; the view shows at most 100,000 bp"),
    (f"/view/{DS}?locus=*", 400, "unplaced reads"),
    (f"/view/{DS}", 200, '"locus": "chr1:'),                                  # no locus: the first reads
])
def test_readable_errors(site, path, status, text):
    r = httpx.get(site["url"] + path)
    assert r.status_code == status
    assert text in html.unescape(r.text) and "Traceback" not in r.text


def test_errors_show_on_the_page(site, browser):
    page, _ = _open(browser, f"{site['url']}/view/{DS}?locus=chr1:1-300,000")
    msg = page.text_content("#error")
    assert "300,000 bp" in msg and "at most 100,000 bp" in msg
    assert page.is_visible("#error")
    # the locus box offers the dataset's reference names
    names = page.eval_on_selector_all("#refs option", "els => els.map(e => e.value)")
    assert names[:3] == ["chr1", "chr2", "chr3"]
    page.fill("#locus", "chrZ:1-100")
    page.click("button[type=submit]")
    page.wait_for_load_state()
    assert "unknown contig 'chrZ'" in page.text_content("#error")
    page.close()


def test_server_unreachable(site, browser, tmp_path):
    """The page says so when the server it came from is gone."""
    server = Server(site["root"], log_path=tmp_path / "serve.log")
    page, _ = _open(browser, f"{server.url}/view/{DS}?locus=chr2:5,001-6,000")
    try:
        _wait_drawn(page)
    finally:
        server.stop()
    page.fill("#locus", "chr2:7,001-8,000")
    page.click("button[type=submit]")
    page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30000)
    assert "cannot be reached" in page.text_content("#error")
    page.close()


def test_fasta_reference(site, browser, tmp_path):
    """--fasta (indexed): igv.js reads the bases from the server (byte ranges of the FASTA)."""
    server = Server(site["root"], "--fasta", site["fasta"], log_path=tmp_path / "serve.log")
    try:
        r = httpx.get(f"{server.url}/fasta/ref.fa", headers={"Range": "bytes=0-9"})
        assert r.status_code == 206 and r.content == Path(site["fasta"]).read_bytes()[:10]
        page, requests = _open(browser, f"{server.url}/view/{DS}?locus=chr1:20,001-20,100")
        _wait_drawn(page)
        seq = page.evaluate("() => window.bams3.browser.genome.getSequence('chr1', 20000, 20030)")
        import pysam

        assert seq.upper() == pysam.FastaFile(site["fasta"]).fetch("chr1", 20000, 20030).upper()
        assert any("/fasta/ref.fa" in u for u in requests)
        page.close()
    finally:
        server.stop()


def test_fasta_must_be_indexed(site, tmp_path):
    fa = tmp_path / "plain.fa"
    fa.write_text(">chr1\nACGT\n")
    r = run_cli("serve", site["root"], "--fasta", fa, "--port", "1", check=False)
    assert r.returncode != 0
    assert r.stderr.decode().strip() == f"bams3: {fa}: not indexed (no {fa}.fai); index it with: samtools faidx {fa}"
