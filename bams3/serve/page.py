"""The HTML pages of ``bams3 serve``: the dataset list and the igv.js view of one dataset.

The view page loads igv.js from the package (``/static/igv.min.js``, never a CDN) and points
an alignment track at the server's own htsget endpoint. Without ``--fasta`` igv.js gets the
dataset's references as a chrom.sizes reference (names and lengths, no sequence), so reads
show without a genome. Errors a person can act on (unknown dataset, unknown contig, a locus
too wide) are answered by the server with the page and a message; the page's script reports
an unreachable server itself.
"""

from __future__ import annotations

import html
import json
from urllib.parse import quote

from bams3core.regions import MAX_END, RegionError, parse_region

from ..errors import Bams3Error
from .catalog import Catalog, UnknownDataset

#: the widest locus the view opens (bp); igv.js is told the same as its visibility window
MAX_LOCUS = 100_000
DEFAULT_WIDTH = 10_000
IGV_VERSION = "3.8.10"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; }
header { background: #24435e; color: #fff; padding: 8px 16px; display: flex; gap: 16px; align-items: center; flex-wrap: wrap; }
header a { color: #fff; text-decoration: none; font-weight: 600; }
header form { display: flex; gap: 6px; align-items: center; }
header input[type=text] { width: 22em; padding: 3px 6px; }
main { padding: 12px 16px; }
table { border-collapse: collapse; }
th, td { padding: 4px 12px; border-bottom: 1px solid #ddd; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.error { background: #fdecea; border: 1px solid #e0a4a0; color: #7a1c14; padding: 8px 12px; margin: 8px 0; }
.error:empty { display: none; }
.note { color: #555; font-size: 90%; }
#igv { margin-top: 8px; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _doc(title: str, body: str, head: str = "") -> str:
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<style>{_STYLE}</style>{head}</head>\n<body>\n{body}\n</body></html>\n")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def error_page(title: str, message: str) -> str:
    body = f"<header><a href=\"/\">bams3</a></header><main><h1>{_e(title)}</h1><div class=\"error\">{_e(message)}</div></main>"
    return _doc(title, body)


def index_page(root: str, entries) -> str:
    rows = "\n".join(
        f"<tr><td><a href=\"/view/{quote(e.id, safe='/')}\">{_e(e.id)}</a></td><td class=\"num\">{e.records:,}</td>"
        f"<td class=\"num\">{e.references:,}</td><td class=\"num\">{_size(e.bytes)}</td><td>{_e(e.created)}</td>"
        f"<td><a href=\"/reads/{quote(e.id, safe='/')}?class=header\">htsget</a></td></tr>"
        for e in entries)
    table = ("<table><thead><tr><th>dataset</th><th>records</th><th>references</th><th>size</th>"
             f"<th>last commit</th><th></th></tr></thead><tbody>\n{rows}\n</tbody></table>"
             if entries else "<p>No datasets under this root yet (make one with <code>bams3 convert</code>).</p>")
    body = (f"<header><a href=\"/\">bams3</a><span>{_e(root)}</span></header><main><h1>Datasets</h1>{table}"
            "<p class=\"note\">Open a dataset to look at its reads in igv.js; the htsget endpoint is "
            "<code>/reads/{id}</code> (GA4GH htsget 1.3, BAM).</p></main>")
    return _doc("bams3 datasets", body)


class LocusError(ValueError):
    pass


def parse_locus(text: str, references: list[dict], max_locus: int) -> tuple[str, int, int]:
    """``chr:beg-end`` (1-based, commas allowed; a contig name alone is the whole contig) ->
    (name, beg, end) 0-based half-open, clamped to the contig; LocusError says what is wrong."""
    ref_ids = {r["name"]: i for i, r in enumerate(references)}
    text = text.strip().replace(" ", "")
    if text == "*":
        raise LocusError("unplaced reads ('*') have no position to show; give a locus on a reference")
    try:
        region = parse_region(text, ref_ids)
    except RegionError as e:
        msg = str(e)
        if msg.startswith("unknown reference"):
            msg = msg.replace("unknown reference", "unknown contig", 1) + " (not in this dataset's header)"
        raise LocusError(msg) from None
    ref = references[region.ref_id]
    beg, end = region.beg, min(region.end, ref["length"]) if region.end != MAX_END else ref["length"]
    if beg >= ref["length"]:
        raise LocusError(f"{text}: starts after the end of {ref['name']} ({ref['length']:,} bp)")
    if end - beg > max_locus:
        mid = (beg + end) // 2
        a = max(0, mid - max_locus // 2)
        raise LocusError(f"{text} spans {end - beg:,} bp; the view shows at most {max_locus:,} bp at once: zoom in, "
                         f"e.g. {ref['name']}:{a + 1:,}-{min(ref['length'], a + max_locus):,}")
    return ref["name"], beg, end


def _default_locus(ds) -> tuple[str, int, int] | None:
    """The first DEFAULT_WIDTH bp from the first placed record, or None without one."""
    placed = sorted((ix for ix in ds.manifest.index if ix.ref_id >= 0 and ix.n_records), key=lambda ix: ix.ref_id)
    if not placed:
        return None
    ix = placed[0]
    ref = ds.manifest.references[ix.ref_id]
    pages = ix.index_pages()
    if pages:  # the page directory in the manifest says where the reference's first block starts
        beg = pages[0].first_start
    else:  # an index written before paging: read it (one GET)
        rows = ds.index(ix.ref_id)
        beg = int(rows["first_start"][0]) if len(rows) else 0
    beg = max(0, min(beg, ref["length"] - 1))
    return ref["name"], beg, min(ref["length"], beg + DEFAULT_WIDTH)


def view_page(catalog: Catalog, ds_id: str, locus: str | None, *, fasta_name: str | None = None,
              max_locus: int = MAX_LOCUS) -> tuple[str, int]:
    """The igv.js page for ``ds_id`` at ``locus``, and its HTTP status."""
    try:
        ds = catalog.open(ds_id)
    except UnknownDataset as e:
        return _view_doc(ds_id, None, locus or "", str(e) + ".", None, max_locus, fasta_name), 404
    except Bams3Error as e:
        return _view_doc(ds_id, None, locus or "", f"cannot open dataset {ds_id!r}: {e}", None, max_locus,
                         fasta_name), 502
    refs = ds.manifest.references
    if ds.wide:
        return _view_doc(ds_id, refs, locus or "", "this dataset has positions beyond 2^31-1 (format v1.1), which "
                         "BAM and so igv.js cannot show", None, max_locus, fasta_name), 400
    if not locus:
        where = _default_locus(ds)
        if where is None:
            return _view_doc(ds_id, refs, "", "this dataset has no placed reads to show (only unplaced ones, or "
                             "none)", None, max_locus, fasta_name), 200
    else:
        try:
            where = parse_locus(locus, refs, max_locus)
        except LocusError as e:
            return _view_doc(ds_id, refs, locus, str(e), None, max_locus, fasta_name), 400
    name, beg, end = where
    text = f"{name}:{beg + 1}-{end}"
    return _view_doc(ds_id, refs, text, "", (name, beg, end), max_locus, fasta_name), 200


def _view_doc(ds_id: str, refs, locus_text: str, error: str, where, max_locus: int, fasta_name) -> str:
    qid = quote(ds_id, safe="/")
    options = "".join(f"<option value=\"{_e(r['name'])}\">{r['length']:,} bp</option>" for r in (refs or []))
    config = None
    if where is not None:
        name, beg, end = where
        config = {
            "id": ds_id,
            "readsPath": f"/reads/{qid}",
            "locus": f"{name}:{beg + 1}-{end}",
            "maxLocus": max_locus,
            "reference": ({"id": ds_id, "name": ds_id, "fastaURL": f"/fasta/{quote(fasta_name)}",
                           "indexURL": f"/fasta/{quote(fasta_name)}.fai"} if fasta_name else
                          {"id": ds_id, "name": ds_id, "format": "chromsizes", "fastaURL": f"/sizes/{qid}",
                           "wholeGenomeView": False, "showIdeogram": False}),
        }
    head = ""
    script = ""
    if config is not None:
        blob = json.dumps(config).replace("</", "<\\/")
        head = "<script src=\"/static/igv.min.js\"></script>"
        script = (f"<script id=\"bams3-config\" type=\"application/json\">{blob}</script>"
                  "<script src=\"/static/view.js\"></script>")
    form = (f"<form id=\"locus-form\" action=\"/view/{qid}\" method=\"get\">"
            f"<label for=\"locus\">locus</label><input type=\"text\" id=\"locus\" name=\"locus\" list=\"refs\" "
            f"value=\"{_e(locus_text)}\" placeholder=\"chr1:1,000-2,000\"><datalist id=\"refs\">{options}</datalist>"
            "<button type=\"submit\">Go</button></form>")
    names = ", ".join(_e(r["name"]) for r in (refs or [])[:50]) + (" …" if refs and len(refs) > 50 else "")
    body = (f"<header><a href=\"/\">bams3</a><span id=\"dataset\">{_e(ds_id)}</span>{form if refs else ''}</header>"
            f"<main><div id=\"error\" class=\"error\" role=\"alert\">{_e(error)}</div>"
            + (f"<p class=\"note\">references: {names}. At most {max_locus:,} bp at once; reads come from "
               f"<code>/reads/{_e(ds_id)}</code> (htsget){'' if fasta_name else ', no reference sequence'}.</p>"
               if refs else "")
            + f"<div id=\"igv\"></div></main>{script}")
    return _doc(f"{ds_id} — bams3", body, head)
