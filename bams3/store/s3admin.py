"""Bucket-level S3 operations on an :class:`~bams3.store.s3.S3Store`'s bucket: lifecycle
configuration, versioning status and noncurrent object versions, and restores of archived objects.

Kept apart from the store (which reads and writes a dataset's objects): these calls act on the
bucket or on objects' storage state, and are used by ``bams3 lifecycle`` / ``bams3 restore``
and the ``storage-report`` flow. The rule arithmetic is pure (:mod:`bams3core.cost`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import botocore.exceptions as bce

from bams3core import cost

from ..errors import InputError
from .s3 import S3Store


def _code(e: bce.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code"))


def get_lifecycle(store: S3Store) -> tuple[list[dict], dict]:
    """The bucket's lifecycle rules ([] if none) and the configuration's other top-level
    settings to keep when writing it back (``TransitionDefaultMinimumObjectSize``)."""
    try:
        resp = store.client.get_bucket_lifecycle_configuration(Bucket=store.bucket)
    except bce.ClientError as e:
        if _code(e) == "NoSuchLifecycleConfiguration":
            return [], {}
        raise store._err(e, op="GetBucketLifecycleConfiguration") from None
    except Exception as e:  # noqa: BLE001
        raise store._err(e, op="GetBucketLifecycleConfiguration") from None
    extra = {}
    if resp.get("TransitionDefaultMinimumObjectSize"):
        extra["TransitionDefaultMinimumObjectSize"] = resp["TransitionDefaultMinimumObjectSize"]
    return list(resp.get("Rules", [])), extra


def put_lifecycle(store: S3Store, rules: Sequence[dict], extra: dict | None = None) -> None:
    """Replace the bucket's lifecycle configuration with ``rules``."""
    try:
        store.client.put_bucket_lifecycle_configuration(Bucket=store.bucket,
                                                        LifecycleConfiguration={"Rules": list(rules)},
                                                        **(extra or {}))
    except Exception as e:  # noqa: BLE001
        raise store._err(e, op="PutBucketLifecycleConfiguration") from None


def is_versioned(store: S3Store) -> bool:
    """Is versioning enabled (or suspended: old versions may remain) on the bucket?"""
    try:
        resp = store.client.get_bucket_versioning(Bucket=store.bucket)
    except Exception as e:  # noqa: BLE001
        raise store._err(e, op="GetBucketVersioning") from None
    return resp.get("Status") in ("Enabled", "Suspended")


def noncurrent_versions(store: S3Store) -> list[tuple[str, int, str, bool]]:
    """Every noncurrent object version and delete marker under the store's prefix
    (ListObjectVersions, paginated): ``(key relative to the store, size, storage class,
    is_delete_marker)``. Current versions are left out (``list_prefix`` lists them)."""
    full = store.prefix + "/" if store.prefix else ""
    out = []
    try:
        pages = store.client.get_paginator("list_object_versions").paginate(Bucket=store.bucket, Prefix=full)
        for page in pages:
            for v in page.get("Versions", ()):
                if not v.get("IsLatest"):
                    out.append((store._rel(v["Key"]), int(v.get("Size", 0)), v.get("StorageClass") or "STANDARD",
                                False))
            for m in page.get("DeleteMarkers", ()):
                out.append((store._rel(m["Key"]), 0, "STANDARD", True))
    except Exception as e:  # noqa: BLE001
        raise store._err(e, full or None, "ListObjectVersions", full=True) from None
    return out


def lifecycle(store: S3Store, rules: Sequence[dict], *, apply: bool = False,
              replace_under: str | None = None) -> dict:
    """Merge ``rules`` into the bucket's lifecycle configuration (other rules are kept; bams3's
    own rules under ``replace_under`` are superseded) and, if ``apply``, write it back.

    Returns ``{"bucket", "existing", "merged", "changes", "applied"}``.
    """
    existing, extra = get_lifecycle(store)
    try:
        merged = cost.merge_lifecycle_rules(existing, rules, replace_under=replace_under)
    except ValueError as e:
        raise InputError(f"s3://{store.bucket}: {e}") from None
    if apply:
        put_lifecycle(store, merged, extra)
    return {"bucket": store.bucket, "existing": existing, "merged": merged,
            "changes": cost.lifecycle_changes(existing, merged), "applied": bool(apply)}


# ---------------------------------------------------------------------------------------------
# archived objects
# ---------------------------------------------------------------------------------------------
def restore_objects(store: S3Store, keys: Sequence[str], *, days: int = 7, tier: str = "Standard",
                    request: bool = True) -> dict:
    """Where each of ``keys`` (relative to the store) stands, from HeadObject's ``StorageClass``
    and ``Restore``; with ``request``, a RestoreObject for each archived one not yet requested.

    Returns counts ``{"objects", "readable", "restored", "in_progress", "not_requested",
    "requested"}`` (``requested``: restores asked for by this call, now in progress) and
    ``by_class`` (archived objects per storage class).
    """
    if tier not in cost.RESTORE_TIERS:
        raise InputError(f"unknown restore tier {tier!r}; valid tiers: {', '.join(cost.RESTORE_TIERS)}")
    if not isinstance(days, int) or days < 1:
        raise InputError(f"restore days must be a whole number >= 1, got {days!r}")

    def one(key: str) -> tuple[str, str]:
        full = store._full(key)
        try:
            h = store.client.head_object(Bucket=store.bucket, Key=full)
        except Exception as e:  # noqa: BLE001
            raise store._err(e, full, "HeadObject", full=True) from None
        sc = cost.normalize_class(h.get("StorageClass"))
        state = cost.restore_state(sc, h.get("Restore"))
        if state == "not-requested" and request:
            params = {"Days": days}
            if sc in cost.ARCHIVE_CLASSES:
                params["GlacierJobParameters"] = {"Tier": tier}
            try:
                store.client.restore_object(Bucket=store.bucket, Key=full, RestoreRequest=params)
                state = "requested"
            except bce.ClientError as e:
                if _code(e) != "RestoreAlreadyInProgress":
                    raise store._err(e, full, "RestoreObject", full=True) from None
                state = "in-progress"
            except Exception as e:  # noqa: BLE001
                raise store._err(e, full, "RestoreObject", full=True) from None
        return sc, state

    with ThreadPoolExecutor(max(1, min(store.concurrency, 32))) as pool:
        results = list(pool.map(one, keys))
    out = {"objects": len(results), "readable": 0, "restored": 0, "in_progress": 0, "not_requested": 0,
           "requested": 0, "by_class": {}}
    for sc, state in results:
        out[state.replace("-", "_")] += 1
        if sc in cost.ARCHIVE_CLASSES:
            out["by_class"][sc] = out["by_class"].get(sc, 0) + 1
    return out
