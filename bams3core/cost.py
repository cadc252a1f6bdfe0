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
# lifecycle rules (S3 API shape, as for put_bucket_lifecycle_configuration)
# ---------------------------------------------------------------------------------------------
def rule_id(kind: str, prefix: str) -> str:
    """A stable rule ID for ``kind`` of rule on ``prefix`` (S3 allows 255 characters)."""
    rid = f"{RULE_ID_PREFIX}:{kind}:{prefix}"
    if len(rid) <= 255:
        return rid
    h = hashlib.sha256(prefix.encode()).hexdigest()[:16]
    return f"{RULE_ID_PREFIX}:{kind}:{prefix[:200]}...{h}"


def _join(prefix: str, rest: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{rest}" if prefix else rest


def _check_days(name: str, days: int | None, minimum: int = 1) -> None:
    if days is None:
        return
    if not isinstance(days, int) or isinstance(days, bool) or days < minimum:
        raise ValueError(f"{name} must be a whole number of days >= {minimum}, got {days!r}")


def dataset_lifecycle_rules(dataset_prefix: str, run_id: str, *, ia_days: int | None = 30,
                            glacier_ir_days: int | None = 90, tmp_expire_days: int | None = 7) -> list[dict]:
    """Lifecycle rules for one dataset (keys relative to the bucket).

    * ``chunks``: the chunk objects of the committed run (``<prefix>/data/<run_id>/chunks/``)
      move to STANDARD_IA after ``ia_days`` and to GLACIER_IR after ``glacier_ir_days`` (either
      may be None). Manifest, header and index objects stay in STANDARD: every query reads them.
    * ``tmp``: spill runs under ``<prefix>/_tmp/`` left by a crashed conversion expire after
      ``tmp_expire_days``.

    Rule IDs are stable per dataset prefix, so a re-run (e.g. after ``--overwrite`` made a new
    run) replaces the dataset's rules instead of adding more.
    """
    _check_days("ia_days", ia_days, MIN_DAYS_BEFORE_IA)
    _check_days("glacier_ir_days", glacier_ir_days, 0)
    _check_days("tmp_expire_days", tmp_expire_days)
    if ia_days is not None and glacier_ir_days is not None and glacier_ir_days < ia_days + MIN_DAYS_IA_BEFORE_NEXT:
        raise ValueError(f"glacier_ir_days ({glacier_ir_days}) must be at least ia_days + "
                         f"{MIN_DAYS_IA_BEFORE_NEXT} ({ia_days + MIN_DAYS_IA_BEFORE_NEXT}): S3 keeps "
                         "objects 30 days in STANDARD_IA before the next transition")
    if not run_id:
        raise ValueError("run_id is empty")
    rules = []
    transitions = []
    if ia_days is not None:
        transitions.append({"Days": ia_days, "StorageClass": "STANDARD_IA"})
    if glacier_ir_days is not None:
        transitions.append({"Days": glacier_ir_days, "StorageClass": "GLACIER_IR"})
    if transitions:
        rules.append({"ID": rule_id("chunks", dataset_prefix.strip("/")), "Status": "Enabled",
                      "Filter": {"Prefix": _join(dataset_prefix, f"data/{run_id}/chunks/")},
                      "Transitions": transitions})
    if tmp_expire_days is not None:
        rules.append({"ID": rule_id("tmp", dataset_prefix.strip("/")), "Status": "Enabled",
                      "Filter": {"Prefix": _join(dataset_prefix, "_tmp/")},
                      "Expiration": {"Days": tmp_expire_days}})
    return rules


def abort_multipart_rule(prefix: str, days: int) -> dict:
    """Abort multipart uploads under ``prefix`` left incomplete for ``days`` days."""
    _check_days("abort_multipart_days", days)
    p = prefix.strip("/")
    return {"ID": rule_id("abort-multipart", p), "Status": "Enabled",
            "Filter": {"Prefix": p + "/" if p else ""},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": days}}


def merge_lifecycle_rules(existing: Sequence[Mapping], new: Sequence[Mapping]) -> list[dict]:
    """The bucket's rules with ``new`` merged in by ID.

    A bucket has one lifecycle configuration and PutBucketLifecycleConfiguration replaces all
    of it, so: rules with an ID in ``new`` are replaced in place, other existing rules are kept
    unchanged (and in order), and new IDs are appended.
    """
    new_by_id: dict[str, dict] = {}
    for r in new:
        rid = r.get("ID")
        if not rid:
            raise ValueError("every new lifecycle rule needs an ID")
        new_by_id[rid] = dict(r)
    out: list[dict] = []
    seen = set()
    for r in existing:
        rid = r.get("ID")
        if rid in new_by_id:
            if rid not in seen:
                out.append(new_by_id[rid])
                seen.add(rid)
        else:
            out.append(dict(r))
    out.extend(r for rid, r in new_by_id.items() if rid not in seen)
    if len(out) > MAX_LIFECYCLE_RULES:
        raise ValueError(f"a bucket allows at most {MAX_LIFECYCLE_RULES} lifecycle rules; "
                         f"this configuration would have {len(out)}")
    return out


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
