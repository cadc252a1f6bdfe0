"""GA4GH htsget 1.3 (reads): request parameters, tickets, and the spec's errors.

No web framework here: :func:`parse_reads_query` turns a ticket request's query parameters
into a :class:`Slice` (or raises :class:`HtsgetError`), :func:`ticket` turns a slice into the
JSON ticket, and the data URLs it names carry the slice in :func:`encode_parts` form, which
:func:`decode_parts` reads back.

A ticket is: one ``header`` URL (the BAM header, BGZF-compressed), body URLs (records,
BGZF-compressed: one per region, or one per reference for a whole-dataset request, so a
client can retry a part alone), and BGZF's EOF block inline as a ``data:`` URI. Their
concatenation is a complete BAM file. Coordinates are htsget's: ``start`` 0-based inclusive,
``end`` exclusive — a :class:`bams3core.regions.Region` exactly.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from urllib.parse import urlencode

from bams3core.bgzf import EOF
from bams3core.index import Manifest
from bams3core.regions import MAX_END, Region

HTSGET_VERSION = "1.3.0"
CONTENT_TYPE = f"application/vnd.ga4gh.htsget.v{HTSGET_VERSION}+json; charset=utf-8"
MAX_U32 = (1 << 32) - 1

STATUS = {"InvalidAuthentication": 401, "PermissionDenied": 403, "NotFound": 404, "PayloadTooLarge": 413,
          "UnsupportedFormat": 400, "InvalidInput": 400, "InvalidRange": 400}


class HtsgetError(Exception):
    """An error of the htsget spec: ``kind`` is its error type, which fixes the HTTP status."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def status(self) -> int:
        return STATUS.get(self.kind, 500)

    def body(self) -> dict:
        return {"htsget": {"error": self.kind, "message": self.message}}


@dataclass(frozen=True)
class Slice:
    """What a ticket covers: the header only, every record (``regions`` None), or the records
    overlapping ``regions`` (one, from a GET)."""

    header_only: bool = False
    regions: tuple[Region, ...] | None = None


_TICKET_PARAMS = ("format", "class", "referenceName", "referenceMD5", "start", "end", "fields", "tags", "notags",
                  "encryptionScheme")
_FIELDS = {"QNAME", "FLAG", "RNAME", "POS", "MAPQ", "CIGAR", "RNEXT", "PNEXT", "TLEN", "SEQ", "QUAL"}


def _one(params, name: str) -> str | None:
    values = params.getlist(name) if hasattr(params, "getlist") else ([params[name]] if name in params else [])
    if len(values) > 1:
        raise HtsgetError("InvalidInput", f"{name} is given {len(values)} times")
    return values[0] if values else None


def _u32(params, name: str) -> int | None:
    text = _one(params, name)
    if text is None:
        return None
    if not re.fullmatch(r"[0-9]+", text) or int(text) > MAX_U32:
        raise HtsgetError("InvalidInput", f"{name}={text!r} is not a 32-bit unsigned integer")
    return int(text)


def _md5_refs(header_text: str) -> dict[str, str]:
    """@SQ M5 -> SN, from the SAM header text."""
    out = {}
    for line in header_text.splitlines():
        if line.startswith("@SQ\t"):
            tags = dict(f.split(":", 1) for f in line.split("\t")[1:] if ":" in f)
            if "M5" in tags and "SN" in tags:
                out[tags["M5"].lower()] = tags["SN"]
    return out


def parse_reads_query(params, manifest: Manifest, header_text=lambda: "") -> Slice:
    """The slice a ``GET /reads/{id}`` asks for, checked as the spec says (errors: HtsgetError)."""
    fmt = _one(params, "format")
    if fmt is not None and fmt.upper() != "BAM":
        kind = "UnsupportedFormat" if fmt.upper() in ("CRAM", "SAM", "VCF", "BCF") else "InvalidInput"
        raise HtsgetError(kind, f"format {fmt!r} is not served here; this server serves BAM")
    if _one(params, "encryptionScheme") is not None:
        raise HtsgetError("InvalidInput", "encryptionScheme is not supported: this server serves plain BAM")
    cls = _one(params, "class")
    if cls is not None and cls != "header":
        raise HtsgetError("InvalidInput", f"class={cls!r}: the only class is 'header'")
    if cls == "header":
        others = [p for p in _TICKET_PARAMS if p not in ("format", "class") and p in params]
        if others:
            raise HtsgetError("InvalidInput", f"class=header takes no other parameter than format (got {', '.join(others)})")
        return Slice(header_only=True)
    fields = _one(params, "fields")
    if fields is not None:  # all fields are always returned (servers may return more than asked)
        bad = [f for f in fields.split(",") if f not in _FIELDS]
        if bad:
            raise HtsgetError("InvalidInput", f"fields: unknown field {bad[0]!r} (known: {', '.join(sorted(_FIELDS))})")
    tags, notags = _one(params, "tags"), _one(params, "notags")
    if tags is not None and notags is not None:
        both = set(filter(None, tags.split(","))) & set(filter(None, notags.split(",")))
        if both:
            raise HtsgetError("InvalidInput", f"tags and notags both name {', '.join(sorted(both))}")

    name, md5 = _one(params, "referenceName"), _one(params, "referenceMD5")
    start, end = _u32(params, "start"), _u32(params, "end")
    if md5 is not None:
        by_md5 = _md5_refs(header_text())
        sn = by_md5.get(md5.lower())
        if sn is None:
            raise HtsgetError("NotFound", f"no reference with MD5 {md5} in this dataset's header (@SQ M5)")
        if name is not None and name != sn:
            raise HtsgetError("InvalidInput", f"referenceName {name!r} and referenceMD5 {md5} name different references")
        name = sn
    if name is None:
        if start is not None or end is not None:
            raise HtsgetError("InvalidInput", "start and end need referenceName (or referenceMD5)")
        return Slice()
    if name == "*":
        if start is not None or end is not None:
            raise HtsgetError("InvalidInput", "start and end cannot be given with referenceName=*")
        return Slice(regions=(Region(-1, 0, MAX_END, "*"),))
    ref_id = manifest.ref_ids.get(name)
    if ref_id is None:
        raise HtsgetError("NotFound", f"no reference {name!r} in this dataset's header")
    if start is not None and end is not None and start > end:
        raise HtsgetError("InvalidRange", f"start {start} is greater than end {end}")
    beg = start or 0
    stop = MAX_END if end is None else end
    return Slice(regions=(Region(ref_id, beg, stop, name),))


MAX_POST_BYTES = 1 << 20


def parse_reads_body(body: bytes, manifest: Manifest, header_text=lambda: "") -> Slice:
    """The slice a ``POST /reads/{id}`` asks for (JSON body: format, class, fields, tags,
    notags, regions), checked as the spec says."""
    if len(body) > MAX_POST_BYTES:
        raise HtsgetError("PayloadTooLarge", f"the request body is over {MAX_POST_BYTES:,} bytes")
    try:
        obj = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise HtsgetError("InvalidInput", f"the request body is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise HtsgetError("InvalidInput", "the request body must be a JSON object")
    unknown = set(obj) - {"format", "class", "fields", "tags", "notags", "regions", "encryptionScheme"}
    if unknown:
        raise HtsgetError("InvalidInput", f"unknown member(s) {', '.join(sorted(unknown))} in the request body")
    params: dict[str, str] = {}
    for key in ("format", "class", "encryptionScheme"):
        if key in obj:
            if not isinstance(obj[key], str):
                raise HtsgetError("InvalidInput", f"{key} must be a string")
            params[key] = obj[key]
    for key in ("fields", "tags", "notags"):
        if key in obj:
            v = obj[key]
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise HtsgetError("InvalidInput", f"{key} must be an array of strings")
            params[key] = ",".join(v)
    if "fields" in params and not params["fields"]:
        params.pop("fields")
    if params.get("class") == "header" and "regions" in obj:
        raise HtsgetError("InvalidInput", "class=header takes no other parameter than format (got regions)")
    sl = parse_reads_query(params, manifest, header_text)
    if sl.header_only or "regions" not in obj:
        return sl
    regions = obj["regions"]
    if not isinstance(regions, list) or not regions:
        raise HtsgetError("InvalidInput", "regions must be a non-empty array")
    out = []
    for i, reg in enumerate(regions):
        if not isinstance(reg, dict) or "referenceName" not in reg or set(reg) - {"referenceName", "start", "end"}:
            raise HtsgetError("InvalidInput", f"regions[{i}] must be an object with referenceName and optional "
                                              "start and end")
        one = {"referenceName": reg["referenceName"]}
        for key in ("start", "end"):
            if key in reg:
                v = reg[key]
                if isinstance(v, bool) or not isinstance(v, int):
                    raise HtsgetError("InvalidInput", f"regions[{i}].{key} must be an unsigned integer")
                one[key] = str(v)
        if not isinstance(one["referenceName"], str):
            raise HtsgetError("InvalidInput", f"regions[{i}].referenceName must be a string")
        if "start" in reg and "end" in reg and reg["start"] >= reg["end"]:
            raise HtsgetError("InvalidRange", f"regions[{i}]: start {reg['start']} is not less than end {reg['end']}")
        out.extend(parse_reads_query(one, manifest).regions)
    return Slice(regions=tuple(out))


# -- data URLs -------------------------------------------------------------------------------
def encode_parts(region: Region | None = None, whole_ref: int | None = None) -> str:
    """A body part in a data URL: ``R:B-E`` (records overlapping a region), ``*`` (unplaced
    reads), or ``=R`` (every record of reference R's index: a whole-dataset request)."""
    if whole_ref is not None:
        return "*" if whole_ref < 0 else f"={whole_ref}"
    if region.ref_id < 0:
        return "*"
    return f"{region.ref_id}:{region.beg}-{region.end}"


_PART = re.compile(r"^(?:(\*)|=(\d+)|(\d+):(\d+)-(\d+))$")


def decode_parts(values: list[str], manifest: Manifest) -> tuple[list[Region], list[int]]:
    """Regions and whole references of a data URL (HtsgetError InvalidInput if malformed)."""
    regions, whole = [], []
    n_refs = len(manifest.references)
    for v in values:
        m = _PART.match(v)
        if not m:
            raise HtsgetError("InvalidInput", f"malformed data URL part {v!r}")
        if m.group(1):  # unplaced reads: all of them, whether asked as a region or as a reference
            regions.append(Region(-1, 0, MAX_END, "*"))
        elif m.group(2) is not None:
            whole.append(int(m.group(2)))
        else:
            ref_id, beg, end = int(m.group(3)), int(m.group(4)), int(m.group(5))
            regions.append(Region(ref_id, beg, end))
    if any(r >= n_refs for r in whole) or any(r.ref_id >= n_refs for r in regions):
        raise HtsgetError("InvalidInput", "data URL names a reference this dataset does not have")
    if regions and whole:
        raise HtsgetError("InvalidInput", "a data URL holds regions or whole references, not both")
    return regions, whole


def body_parts(sl: Slice, manifest: Manifest) -> list[list[str]]:
    """The data URL parts of each body URL: one URL per reference holding records (a whole
    dataset), one for a region, or one for several regions (a POST: records in file order,
    each once, as the spec asks)."""
    if sl.header_only:
        return []
    if sl.regions is None:
        refs = sorted((ix.ref_id for ix in manifest.index if ix.n_records), key=lambda r: (r < 0, r))
        return [[encode_parts(whole_ref=r)] for r in refs]
    parts = list(dict.fromkeys(encode_parts(r) for r in sl.regions if r.ref_id < 0 or r.beg < r.end))
    return [parts] if parts else []


def ticket(sl: Slice, manifest: Manifest, data_url: str) -> dict:
    """The ticket JSON for ``sl``; ``data_url`` is the absolute URL of this dataset's data."""
    run = manifest.run_id
    urls = [{"url": f"{data_url}?{urlencode({'run': run, 'part': 'header'})}", "class": "header"}]
    if not sl.header_only:
        for parts in body_parts(sl, manifest):
            query = urlencode([("run", run), ("part", "body")] + [("r", p) for p in parts])
            urls.append({"url": f"{data_url}?{query}", "class": "body"})
    # the EOF block ends the file (a header-only ticket too: it then reads as a BAM without records)
    urls.append({"url": "data:application/vnd.ga4gh.bam;base64," + base64.b64encode(EOF).decode(),
                 "class": "header" if sl.header_only else "body"})
    return {"htsget": {"format": "BAM", "urls": urls}}


def service_info(version: str, base_url: str) -> dict:
    return {
        "id": "org.bams3.htsget",
        "name": "bams3 htsget server",
        "description": "GA4GH htsget reads served from bams3 datasets (columnar, region-indexed)",
        "version": version,
        "organization": {"name": "bams3", "url": base_url},
        "type": {"group": "org.ga4gh", "artifact": "htsget", "version": HTSGET_VERSION},
        "htsget": {"datatype": "reads", "formats": ["BAM"], "fieldsParameterEffective": False,
                   "tagsParametersEffective": False},
    }
