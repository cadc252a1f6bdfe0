"""S3 cost model and lifecycle rules for bams3 datasets: plain data and pure functions.

No I/O and no boto3/prefect here: the ``storage-report`` flow lists objects and reads the index,
then asks these functions what that costs and which lifecycle rules to put on the bucket.

Prices
------
:data:`PRICES` holds Amazon S3's public list prices for **US East (N. Virginia), us-east-1**,
in USD, from https://aws.amazon.com/s3/pricing/ as published in 2024-2025 (storage: first
50 TB/month tier; data transfer out to the internet: first 10 TB/month tier). They change
rarely but they do change, and other regions differ: pass your own table (same shape) to
every function through ``prices=`` rather than editing these numbers in place.

* Sizes are billed in binary gigabytes: 1 GB = 2**30 bytes (S3's definition).
* STANDARD_IA, ONEZONE_IA and GLACIER_IR bill at least 128 KiB per object; GLACIER and
  DEEP_ARCHIVE objects carry 40 KiB of billed overhead each (8 KiB at STANDARD rates, 32 KiB
  at the class rate). Minimum storage durations (30/90/180 days) are listed but only matter
  for objects deleted early, which a report of stored data does not see.
* GLACIER (Flexible Retrieval) and DEEP_ARCHIVE objects cannot be read without a restore, so
  the cost of a *query* against them is ``None`` (not a number).
* Lifecycle transition request prices are per 1,000 objects moved into the target class.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from typing import Iterable, Mapping, Sequence

GB = 1 << 30  # S3 bills binary gigabytes
KiB = 1024

PRICES: dict = {
    "source": "https://aws.amazon.com/s3/pricing/ (US East (N. Virginia)), list prices 2024-2025",
    "region": "us-east-1",
    "currency": "USD",
    "gb_bytes": GB,
    # $ per GB-month (first 50 TB tier; INTELLIGENT_TIERING: frequent access tier)
    "storage_gb_month": {
        "STANDARD": 0.023,
        "INTELLIGENT_TIERING": 0.023,
        "STANDARD_IA": 0.0125,
        "ONEZONE_IA": 0.01,
        "GLACIER_IR": 0.004,
        "GLACIER": 0.0036,
        "DEEP_ARCHIVE": 0.00099,
    },
    # $ per 1,000 PUT, COPY, POST, LIST requests
    "put_per_1000": {
        "STANDARD": 0.005,
        "INTELLIGENT_TIERING": 0.005,
        "STANDARD_IA": 0.01,
        "ONEZONE_IA": 0.01,
        "GLACIER_IR": 0.02,
        "GLACIER": 0.03,
        "DEEP_ARCHIVE": 0.05,
    },
    # $ per 1,000 GET, SELECT and other read requests (GLACIER/DEEP_ARCHIVE: restore first)
    "get_per_1000": {
        "STANDARD": 0.0004,
        "INTELLIGENT_TIERING": 0.0004,
        "STANDARD_IA": 0.001,
        "ONEZONE_IA": 0.001,
        "GLACIER_IR": 0.01,
    },
    # $ per GB retrieved (on top of transfer)
    "retrieval_per_gb": {
        "STANDARD": 0.0,
        "INTELLIGENT_TIERING": 0.0,
        "STANDARD_IA": 0.01,
        "ONEZONE_IA": 0.01,
        "GLACIER_IR": 0.03,
    },
    # $ per 1,000 lifecycle transition requests into the class
    "transition_per_1000": {
        "INTELLIGENT_TIERING": 0.01,
        "STANDARD_IA": 0.01,
        "ONEZONE_IA": 0.01,
        "GLACIER_IR": 0.02,
        "GLACIER": 0.03,
        "DEEP_ARCHIVE": 0.05,
    },
    "min_billable_object_bytes": {"STANDARD_IA": 128 * KiB, "ONEZONE_IA": 128 * KiB, "GLACIER_IR": 128 * KiB},
    "min_storage_days": {"STANDARD_IA": 30, "ONEZONE_IA": 30, "GLACIER_IR": 90, "GLACIER": 90,
                         "DEEP_ARCHIVE": 180},
    # per-object archive overhead: (bytes billed at STANDARD, bytes billed at the class rate)
    "archive_overhead_bytes": {"GLACIER": (8 * KiB, 32 * KiB), "DEEP_ARCHIVE": (8 * KiB, 32 * KiB)},
    # INTELLIGENT_TIERING monitoring, $ per 1,000 objects of at least 128 KiB per month
    "monitoring_per_1000_objects": {"INTELLIGENT_TIERING": 0.0025},
    # $ per GB of data transfer out of S3
    "egress_per_gb": {"internet": 0.09, "inter-region": 0.02, "same-region": 0.0},
}

# S3 lifecycle constraints (https://docs.aws.amazon.com/AmazonS3/latest/userguide/lifecycle-transition-general-considerations.html)
MIN_DAYS_BEFORE_IA = 30           # STANDARD -> STANDARD_IA / ONEZONE_IA needs >= 30 days
MIN_DAYS_IA_BEFORE_NEXT = 30      # objects stay >= 30 days in IA before the next transition
MAX_LIFECYCLE_RULES = 1000
RULE_ID_PREFIX = "bams3"


# ---------------------------------------------------------------------------------------------
# storage classes and units
# ---------------------------------------------------------------------------------------------
def normalize_class(storage_class: str | None) -> str:
    """S3 reports no class (or "STANDARD") for standard objects; keep the others as they are."""
    return (storage_class or "STANDARD").upper()


def readable(storage_class: str | None, prices: Mapping = PRICES) -> bool:
    """Can objects of this class be read with a plain GET (no restore)?"""
    return normalize_class(storage_class) in prices["get_per_1000"]


def gigabytes(nbytes: float, prices: Mapping = PRICES) -> float:
    return nbytes / prices["gb_bytes"]


def _price(table: Mapping[str, float], storage_class: str, what: str) -> float:
    try:
        return table[storage_class]
    except KeyError:
        raise ValueError(f"no {what} price for storage class {storage_class!r} in the price table") from None


# ---------------------------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------------------------
def monthly_storage_cost(objects: Iterable[tuple[int, str | None]], prices: Mapping = PRICES) -> dict:
    """Monthly storage cost of ``objects``, an iterable of ``(size_bytes, storage_class)``.

    Returns ``{"by_class": {cls: {"objects", "bytes", "billable_bytes", "usd"}},
    "objects", "bytes", "usd"}``. Minimum billable sizes and archive overhead are applied;
    the STANDARD-rate part of archive overhead is counted under STANDARD's ``billable_bytes``.
    """
    by_class: dict[str, dict] = {}

    def entry(cls: str) -> dict:
        return by_class.setdefault(cls, {"objects": 0, "bytes": 0, "billable_bytes": 0, "usd": 0.0})

    monitored: dict[str, int] = {}
    for size, sc in objects:
        cls = normalize_class(sc)
        _price(prices["storage_gb_month"], cls, "storage")
        size = int(size)
        e = entry(cls)
        e["objects"] += 1
        e["bytes"] += size
        billable = max(size, prices["min_billable_object_bytes"].get(cls, 0))
        overhead = prices["archive_overhead_bytes"].get(cls)
        if overhead:
            std_part, cls_part = overhead
            billable += cls_part
            entry("STANDARD")["billable_bytes"] += std_part
        e["billable_bytes"] += billable
        if cls in prices["monitoring_per_1000_objects"] and size >= 128 * KiB:
            monitored[cls] = monitored.get(cls, 0) + 1
    total = 0.0
    for cls, e in by_class.items():
        e["usd"] = gigabytes(e["billable_bytes"], prices) * prices["storage_gb_month"][cls]
        e["usd"] += monitored.get(cls, 0) / 1000 * prices["monitoring_per_1000_objects"].get(cls, 0.0)
        total += e["usd"]
    return {"by_class": dict(sorted(by_class.items())),
            "objects": sum(e["objects"] for e in by_class.values()),
            "bytes": sum(e["bytes"] for e in by_class.values()),
            "usd": total}


def transition_cost(n_objects: int, to_class: str, prices: Mapping = PRICES) -> float:
    """One-time cost of lifecycle-transitioning ``n_objects`` into ``to_class``."""
    return n_objects / 1000 * _price(prices["transition_per_1000"], normalize_class(to_class), "transition")


# ---------------------------------------------------------------------------------------------
# requests and transfer
# ---------------------------------------------------------------------------------------------
def read_cost(requests: int, nbytes: int, storage_class: str | None = "STANDARD", *,
              egress: str = "internet", prices: Mapping = PRICES) -> dict | None:
    """Cost of ``requests`` GETs returning ``nbytes`` from objects of ``storage_class``.

    ``egress``: where the bytes go ("internet", "inter-region", "same-region").
    Returns ``{"requests", "bytes", "request_usd", "retrieval_usd", "egress_usd", "usd"}``,
    or None for classes that need a restore before any read (GLACIER, DEEP_ARCHIVE).
    """
    cls = normalize_class(storage_class)
    if not readable(cls, prices):
        return None
    gb = gigabytes(nbytes, prices)
    req = requests / 1000 * prices["get_per_1000"][cls]
    ret = gb * prices["retrieval_per_gb"].get(cls, 0.0)
    out = gb * _price(prices["egress_per_gb"], egress, "egress")
    return {"requests": int(requests), "bytes": int(nbytes), "request_usd": req, "retrieval_usd": ret,
            "egress_usd": out, "usd": req + ret + out}


def region_query_io(block_lengths: Sequence[int], *, manifest_bytes: int, index_bytes: Sequence[int],
                    blocks: int = 1) -> dict:
    """Requests and bytes of a small (~1 kb) region query, from the dataset's index.

    A region that small overlaps ``blocks`` block(s) (usually one): one ranged GET of the
    median block. ``warm``: manifest and index are in the local metadata cache;
    ``cold``: they are fetched first (the manifest, and one index page of median size:
    ``index_bytes`` lists the page sizes, or the object sizes of unpaged indexes).
    """
    med_block = int(statistics.median(block_lengths)) if len(block_lengths) else 0
    med_index = int(statistics.median(index_bytes)) if len(index_bytes) else 0
    data = {"requests": blocks if med_block else 0, "bytes": blocks * med_block}
    return {"median_block_bytes": med_block,
            "warm": data,
            "cold": {"requests": data["requests"] + 1 + (1 if index_bytes else 0),
                     "bytes": data["bytes"] + int(manifest_bytes) + med_index}}


def whole_read_io(read_sizes: Sequence[int], *, metadata_bytes: Sequence[int]) -> dict:
    """Requests and bytes of reading a whole dataset: one GET per planned range read plus
    one per metadata object (manifest, header, index objects)."""
    return {"requests": len(read_sizes) + len(metadata_bytes),
            "bytes": int(sum(read_sizes)) + int(sum(metadata_bytes))}


# ---------------------------------------------------------------------------------------------
# storage classes and object tags
# ---------------------------------------------------------------------------------------------
#: classes a chunk object may be written in (S3's PutObject ``StorageClass`` values bams3 accepts)
STORAGE_CLASSES = ("STANDARD", "INTELLIGENT_TIERING", "STANDARD_IA", "ONEZONE_IA", "GLACIER_IR", "GLACIER",
                   "DEEP_ARCHIVE")
#: classes whose objects cannot be read before a RestoreObject
ARCHIVE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")
RESTORE_TIERS = ("Standard", "Bulk", "Expedited")

#: object tag written on every chunk and spill object; lifecycle rules filter on it, so one
#: rule per prefix covers every dataset (and every run) under it
OBJECT_TAG = "bams3-object"
TAG_CHUNK = "chunk"
TAG_TMP = "tmp"


def check_storage_class(storage_class: str) -> str:
    """The S3 storage class name, upper-cased; ValueError (naming the valid ones) if unknown."""
    cls = str(storage_class).strip().upper()
    if cls not in STORAGE_CLASSES:
        raise ValueError(f"unknown S3 storage class {storage_class!r}; valid classes: {', '.join(STORAGE_CLASSES)}")
    return cls


def restore_state(storage_class: str | None, restore_header: str | None) -> str:
    """Where an object stands for reading, from HeadObject's ``StorageClass`` and ``Restore``:
    "readable" (not archived), "restored" (archived, restored copy available), "in-progress"
    (restore requested, not done) or "not-requested"."""
    if normalize_class(storage_class) not in ARCHIVE_CLASSES:
        return "readable"
    if not restore_header:
        return "not-requested"
    if 'ongoing-request="true"' in restore_header.replace(" ", ""):
        return "in-progress"
    return "restored"


# ---------------------------------------------------------------------------------------------
# lifecycle rules (S3 API shape, as for put_bucket_lifecycle_configuration)
# ---------------------------------------------------------------------------------------------
def rule_id(kind: str, prefix: str) -> str:
    """A stable rule ID for ``kind`` of rule on ``prefix`` (S3 allows 255 characters)."""
    rid = f"{RULE_ID_PREFIX}:{kind}:{prefix}"
    if len(rid) <= 255:
        return rid
    h = hashlib.sha256(prefix.encode()).hexdigest()[:16]
    return f"{RULE_ID_PREFIX}:{kind}:{prefix[:200]}...{h}"


def _check_days(name: str, days: int | None, minimum: int = 1) -> None:
    if days is None:
        return
    if not isinstance(days, int) or isinstance(days, bool) or days < minimum:
        raise ValueError(f"{name} must be a whole number of days >= {minimum}, got {days!r}")


def _key_prefix(prefix: str) -> str:
    p = prefix.strip("/")
    return p + "/" if p else ""


def _tagged(prefix: str, value: str) -> dict:
    tag = {"Key": OBJECT_TAG, "Value": value}
    p = _key_prefix(prefix)
    return {"And": {"Prefix": p, "Tags": [tag]}} if p else {"Tag": tag}


def lifecycle_plan(prefix: str, *, ia_days: int | None = 30, glacier_ir_days: int | None = 90,
                   tmp_expire_days: int | None = 7, abort_multipart_days: int | None = 7,
                   versioned: bool = False, noncurrent_days: int | None = 30,
                   names: Mapping[str, str] | None = None) -> list[dict]:
    """The lifecycle rules for every bams3 dataset under ``prefix`` (bucket-relative; "" = the
    whole bucket): at most 4 rules, however many datasets and runs live there.

    Rules filter on the prefix and on the object tag ``bams3-object`` that bams3 writes on
    chunk objects (``chunk``) and spill objects (``tmp``); manifest, index and header objects
    carry no tag, so no transition ever touches them (every query reads them: they stay STANDARD).

    * ``bams3:chunks:<prefix>``: chunks move to STANDARD_IA after ``ia_days`` and to
      GLACIER_IR after ``glacier_ir_days`` (either may be None);
    * ``bams3:tmp:<prefix>``: spill objects left by a crashed conversion expire after ``tmp_expire_days``;
    * ``bams3:abort-multipart:<prefix>``: incomplete multipart uploads are aborted after
      ``abort_multipart_days`` (S3 allows no tag filter on this action);
    * ``bams3:noncurrent:<prefix>`` (``versioned`` buckets only): noncurrent versions (what
      ``--overwrite`` and deletes leave behind) expire ``noncurrent_days`` after they became
      noncurrent, and expired delete markers are removed.

    ``names`` renames the parameters in error messages (e.g. to the CLI's option names).
    """
    n = {k: k for k in ("ia_days", "glacier_ir_days", "tmp_expire_days", "abort_multipart_days", "noncurrent_days")}
    n.update(names or {})
    _check_days(n["ia_days"], ia_days, MIN_DAYS_BEFORE_IA)
    _check_days(n["glacier_ir_days"], glacier_ir_days, 0)
    _check_days(n["tmp_expire_days"], tmp_expire_days)
    _check_days(n["abort_multipart_days"], abort_multipart_days)
    _check_days(n["noncurrent_days"], noncurrent_days)
    if ia_days is not None and glacier_ir_days is not None and glacier_ir_days < ia_days + MIN_DAYS_IA_BEFORE_NEXT:
        raise ValueError(f"{n['glacier_ir_days']} ({glacier_ir_days}) must be at least {n['ia_days']} + "
                         f"{MIN_DAYS_IA_BEFORE_NEXT} ({ia_days + MIN_DAYS_IA_BEFORE_NEXT}): S3 keeps "
                         "objects 30 days in STANDARD_IA before the next transition")
    p = prefix.strip("/")
    rules = []
    transitions = []
    if ia_days is not None:
        transitions.append({"Days": ia_days, "StorageClass": "STANDARD_IA"})
    if glacier_ir_days is not None:
        transitions.append({"Days": glacier_ir_days, "StorageClass": "GLACIER_IR"})
    if transitions:
        rules.append({"ID": rule_id("chunks", p), "Status": "Enabled", "Filter": _tagged(p, TAG_CHUNK),
                      "Transitions": transitions})
    if tmp_expire_days is not None:
        rules.append({"ID": rule_id("tmp", p), "Status": "Enabled", "Filter": _tagged(p, TAG_TMP),
                      "Expiration": {"Days": tmp_expire_days}})
    if abort_multipart_days is not None:
        rules.append({"ID": rule_id("abort-multipart", p), "Status": "Enabled", "Filter": {"Prefix": _key_prefix(p)},
                      "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": abort_multipart_days}})
    if versioned and noncurrent_days is not None:
        rules.append({"ID": rule_id("noncurrent", p), "Status": "Enabled", "Filter": {"Prefix": _key_prefix(p)},
                      "NoncurrentVersionExpiration": {"NoncurrentDays": noncurrent_days},
                      "Expiration": {"ExpiredObjectDeleteMarker": True}})
    return rules


def rule_prefix(rule: Mapping) -> str:
    """The key prefix a rule applies to ("" = whole bucket), whatever its filter's shape."""
    f = rule.get("Filter")
    if f is None:
        return rule.get("Prefix", "") or ""
    if "And" in f:
        return f["And"].get("Prefix", "") or ""
    return f.get("Prefix", "") or ""


def rule_tags(rule: Mapping) -> dict[str, str]:
    f = rule.get("Filter") or {}
    tags = f.get("And", {}).get("Tags", []) if "And" in f else ([f["Tag"]] if "Tag" in f else [])
    return {t["Key"]: t["Value"] for t in tags}


def rule_applies(rule: Mapping, key: str, tags: Mapping[str, str] | None = None) -> bool:
    """Does an (enabled) rule's filter select the object ``key`` with ``tags``? (Size filters
    are not considered.)"""
    if rule.get("Status", "Enabled") != "Enabled":
        return False
    tags = tags or {}
    return key.startswith(rule_prefix(rule)) and all(tags.get(k) == v for k, v in rule_tags(rule).items())


def is_bams3_rule(rule: Mapping) -> bool:
    return str(rule.get("ID", "")).startswith(RULE_ID_PREFIX + ":")


def merge_lifecycle_rules(existing: Sequence[Mapping], new: Sequence[Mapping], *,
                          replace_under: str | None = None) -> list[dict]:
    """The bucket's rules with ``new`` merged in.

    A bucket has one lifecycle configuration and PutBucketLifecycleConfiguration replaces all
    of it, so: rules with an ID in ``new`` are replaced in place, other existing rules are kept
    unchanged (and in order), and new IDs are appended. With ``replace_under`` (a prefix),
    bams3's own earlier rules (ID ``bams3:...``) for keys under that prefix are dropped too:
    the plan for the prefix supersedes them (e.g. the per-dataset rules of older versions).
    """
    new_by_id: dict[str, dict] = {}
    for r in new:
        rid = r.get("ID")
        if not rid:
            raise ValueError("every new lifecycle rule needs an ID")
        new_by_id[rid] = dict(r)
    under = None if replace_under is None else _key_prefix(replace_under)
    out: list[dict] = []
    seen = set()
    for r in existing:
        rid = r.get("ID")
        if rid in new_by_id:
            if rid not in seen:
                out.append(new_by_id[rid])
                seen.add(rid)
        elif under is not None and is_bams3_rule(r) and rule_prefix(r).startswith(under):
            continue
        else:
            out.append(dict(r))
    out.extend(r for rid, r in new_by_id.items() if rid not in seen)
    if len(out) > MAX_LIFECYCLE_RULES:
        raise ValueError(f"a bucket allows at most {MAX_LIFECYCLE_RULES} lifecycle rules; "
                         f"this configuration would have {len(out)}")
    return out


def lifecycle_changes(existing: Sequence[Mapping], merged: Sequence[Mapping]) -> dict:
    """What writing ``merged`` over ``existing`` changes, by rule ID: added, replaced (same ID,
    different content), removed, unchanged."""
    old = {r.get("ID"): r for r in existing}
    new = {r.get("ID"): r for r in merged}
    return {"added": [i for i in new if i not in old],
            "replaced": [i for i in new if i in old and _canon(old[i]) != _canon(new[i])],
            "removed": [i for i in old if i not in new],
            "unchanged": [i for i in new if i in old and _canon(old[i]) == _canon(new[i])]}


def _canon(rule: Mapping):
    return json.dumps(rule, sort_keys=True, default=str)


def projected_storage_cost(chunk_sizes: Sequence[int], other_sizes: Sequence[int], chunk_class: str,
                           prices: Mapping = PRICES) -> float:
    """Monthly storage cost once chunks are in ``chunk_class`` and the rest in STANDARD."""
    objs = [(s, chunk_class) for s in chunk_sizes] + [(s, "STANDARD") for s in other_sizes]
    return monthly_storage_cost(objs, prices)["usd"]


def fmt_usd(x: float | None) -> str:
    """Dollars for a report: enough digits for tiny per-query costs."""
    if x is None:
        return "n/a"
    if x == 0:
        return "$0"
    if abs(x) >= 1:
        return f"${x:,.2f}"
    digits = max(2, -int(math.floor(math.log10(abs(x)))) + 2)
    return f"${x:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# one dataset: the numbers the storage report and `bams3 cost` show
# ---------------------------------------------------------------------------------------------
def noncurrent_costs(versions: Iterable[tuple[str, int, str | None, bool]], prices: Mapping = PRICES) -> dict:
    """Monthly storage of a versioned bucket's noncurrent versions: ``versions`` are
    ``(key, size, storage_class, is_delete_marker)``. Delete markers are counted apart and
    priced at 0 bytes; noncurrent versions are billed like current objects of their class.

    Returns ``{"versions", "delete_markers", "bytes", "by_class", "monthly_usd"}``.
    """
    versions = list(versions)
    c = monthly_storage_cost(((size, sc) for _k, size, sc, dm in versions if not dm), prices)
    return {"versions": c["objects"], "delete_markers": sum(1 for v in versions if v[3]), "bytes": c["bytes"],
            "by_class": c["by_class"], "monthly_usd": c["usd"]}


def dataset_costs(prefix: str, objects: Sequence[tuple[str, int, str | None]], prof: Mapping, *,
                  egress: str = "internet", prices: Mapping = PRICES,
                  noncurrent: Iterable[tuple[str, int, str | None, bool]] | None = None) -> dict:
    """Storage per class per month, a ~1 kb region query (cold and warm), a whole read, and
    the projected storage with chunks in STANDARD_IA / GLACIER_IR, for one dataset.

    ``objects``: ``(key, size, storage_class)`` of every object under the dataset prefix (keys
    relative to it); ``prof``: what its index says queries read (``bams3.ops.profile``).
    ``noncurrent`` (versioned buckets; None otherwise): the noncurrent versions and delete
    markers under the prefix (see :func:`noncurrent_costs`). With it the result also has
    ``"noncurrent"`` and ``"total"`` (current objects plus noncurrent versions: ``objects``,
    ``bytes``, ``monthly_usd``); ``objects``/``bytes``/``monthly_usd`` stay current objects only.
    """
    storage_cost = monthly_storage_cost(((size, sc) for _k, size, sc in objects), prices)
    chunk_keys = set(prof["chunk_keys"])
    chunks = [(k, size, normalize_class(sc)) for k, size, sc in objects if k in chunk_keys]
    others = [(k, size, normalize_class(sc)) for k, size, sc in objects if k not in chunk_keys]
    by_class: dict[str, int] = {}
    for _k, size, sc in chunks:
        by_class[sc] = by_class.get(sc, 0) + size
    chunk_class = max(by_class, key=by_class.get) if by_class else "STANDARD"
    meta_class = "STANDARD"

    rq = region_query_io(prof["block_lengths"], manifest_bytes=prof["manifest_bytes"],
                         index_bytes=prof["index_page_bytes"])
    warm = read_cost(rq["warm"]["requests"], rq["warm"]["bytes"], chunk_class, egress=egress, prices=prices)
    meta_req = rq["cold"]["requests"] - rq["warm"]["requests"]
    meta_bytes = rq["cold"]["bytes"] - rq["warm"]["bytes"]
    cold = _add(warm, read_cost(meta_req, meta_bytes, meta_class, egress=egress, prices=prices))

    metadata = [prof["manifest_bytes"], prof["header_bytes"], *prof["index_bytes"]]
    whole = _add(read_cost(len(prof["whole_read_sizes"]), sum(prof["whole_read_sizes"]), chunk_class,
                           egress=egress, prices=prices),
                 read_cost(len(metadata), sum(metadata), meta_class, egress=egress, prices=prices))

    chunk_sizes = [s for _k, s, _c in chunks]
    other_sizes = [s for _k, s, _c in others]
    out = {
        "prefix": prefix,
        "run_id": prof["run_id"],
        "records": prof["records"],
        "chunks": prof["chunks"],
        "blocks": prof["blocks"],
        "objects": storage_cost["objects"],
        "bytes": storage_cost["bytes"],
        "by_class": storage_cost["by_class"],
        "monthly_usd": storage_cost["usd"],
        "chunk_class": chunk_class,
        "region_query": {"median_block_bytes": rq["median_block_bytes"], "warm": warm, "cold": cold},
        "whole_read": whole,
        "projected_monthly_usd": {c: projected_storage_cost(chunk_sizes, other_sizes, c, prices)
                                  for c in ("STANDARD_IA", "GLACIER_IR")},
        "transition_usd": {c: transition_cost(len(chunks), c, prices) for c in ("STANDARD_IA", "GLACIER_IR")},
    }
    if noncurrent is not None:
        add_noncurrent(out, noncurrent_costs(noncurrent, prices))
    return out


def add_noncurrent(report: dict, nc: Mapping) -> dict:
    """Set ``report["noncurrent"] = nc`` (from :func:`noncurrent_costs`) and ``report["total"]``:
    the report's current ``objects``/``bytes``/``monthly_usd`` plus the noncurrent versions."""
    report["noncurrent"] = dict(nc)
    report["total"] = {"objects": report["objects"] + nc["versions"], "bytes": report["bytes"] + nc["bytes"],
                       "monthly_usd": report["monthly_usd"] + nc["monthly_usd"]}
    return report


def _add(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return None
    return {k: a[k] + b[k] for k in a}


# ---------------------------------------------------------------------------------------------
# before a migration: a dataset's size from its source file
# ---------------------------------------------------------------------------------------------
#: Measured by the benchmark (bench/results/latest.md, git 6e2fb95, 2026-12-02; format v1.2): 1,024,614
#: records of 2 x 150 bp paired reads (binned qualities); BAM 65.85 MiB, CRAM 3.0 (with
#: reference) 25.31 MiB -> dataset 26.66 MiB.
BENCH = {"records": 1_024_614, "bam_bytes": int(65.85 * (1 << 20)), "cram_bytes": int(25.31 * (1 << 20)),
         "dataset_bytes": int(26.66 * (1 << 20)),
         "source": "the benchmark (bench/results/latest.md, 2026-12-02, git 6e2fb95): 1,024,614 records of "
                   "2x150 bp reads; BAM 65.85 MiB, CRAM 3.0 25.31 MiB -> dataset 26.66 MiB"}
#: dataset bytes per source byte: the benchmark's "dataset bytes vs BAM" (0.405x) and vs CRAM 3.0 (1.05x)
RATIO = {"bam": BENCH["dataset_bytes"] / BENCH["bam_bytes"], "cram": BENCH["dataset_bytes"] / BENCH["cram_bytes"]}
DATASET_VS_BAM = RATIO["bam"]
#: per record in the benchmark: BAM bytes (to count the records of an unindexed BAM) and
#: dataset bytes (for SAM input, whose size says little about the binary record size)
BAM_BYTES_PER_RECORD = BENCH["bam_bytes"] / BENCH["records"]
DATASET_BYTES_PER_RECORD = BENCH["dataset_bytes"] / BENCH["records"]


def estimate_dataset(fmt: str, source_bytes: int, records: int | None, *, records_from: str,
                     chunk_bytes: int = 16 << 20) -> dict:
    """What a BAM/CRAM/SAM file becomes as a dataset, from its record count and a measured ratio.

    ``records``: exact when read from the BAI/CSI or idxstats or counted (``records_from`` says
    where it came from); None estimates it from the file size at the benchmark's
    :data:`BAM_BYTES_PER_RECORD` (BAM) or the CRAM ratio (CRAM). Dataset bytes: BAM and CRAM:
    the file size x the benchmark's measured ratio (:data:`RATIO`: 0.405x of BAM, 1.05x of
    CRAM 3.0), i.e. records x the file's own bytes per record x the ratio; SAM: records x the
    benchmark's :data:`DATASET_BYTES_PER_RECORD`. Chunks: ``chunk_bytes`` each.
    """
    fmt = fmt.lower()
    if fmt not in ("bam", "cram", "sam"):
        raise ValueError(f"cannot estimate a dataset from {fmt!r} input (BAM, CRAM or SAM)")
    if fmt == "sam":
        if records is None:
            raise ValueError("SAM input needs a record count")
        ratio, basis = DATASET_BYTES_PER_RECORD, f"{DATASET_BYTES_PER_RECORD:.2f} dataset bytes per record"
        dataset_bytes = int(round(records * ratio))
    else:
        ratio, basis = RATIO[fmt], f"{RATIO[fmt]:.3f}x of {fmt.upper()}"
        dataset_bytes = int(round(source_bytes * ratio))
        if records is None:
            records = int(round(dataset_bytes / DATASET_BYTES_PER_RECORD))
            records_from = "estimated from the file size (the benchmark's bytes per record)"
    n_chunks = max(1, -(-dataset_bytes // chunk_bytes)) if dataset_bytes else 0
    return {"format": fmt, "source_bytes": int(source_bytes), "records": int(records), "records_from": records_from,
            "ratio": ratio, "ratio_basis": basis, "ratio_source": BENCH["source"],
            "dataset_bytes": dataset_bytes,
            "dataset_bytes_per_record": dataset_bytes / records if records else 0.0, "chunks": n_chunks}


def estimate_costs(est: Mapping, *, egress: str = "internet", prices: Mapping = PRICES) -> dict:
    """Monthly storage of an estimated dataset (:func:`estimate_dataset`) with its chunks in
    each readable class (manifest, header, index in STANDARD: 3 objects of 4 KiB counted), the
    one-time upload (PUT) cost, and a whole read."""
    n = est["chunks"]
    sizes = [est["dataset_bytes"] // n] * n if n else []
    if n:
        sizes[-1] += est["dataset_bytes"] - sum(sizes)
    meta = [4096, 4096, 4096]
    storage = {c: projected_storage_cost(sizes, meta, c, prices)
               for c in ("STANDARD", "INTELLIGENT_TIERING", "STANDARD_IA", "GLACIER_IR")}
    return {"monthly_usd": storage,
            "upload_usd": (n + len(meta)) / 1000 * prices["put_per_1000"]["STANDARD"],
            "whole_read": read_cost(n + len(meta), est["dataset_bytes"] + sum(meta), "STANDARD", egress=egress,
                                    prices=prices)}
