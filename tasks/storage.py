"""Tasks that look at what is stored: find datasets, inventory objects (and, in versioned
buckets, noncurrent versions), profile a dataset's index for query costs, and merge lifecycle
rules into a bucket's configuration."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from bams3 import pricing
from bams3.store import Store
from bams3.store import s3admin
from bams3core.index import MANIFEST_KEY

from .pipeline import TAG_READ
from .retry import retry_options

_NO_CACHE = dict(cache_policy=NONE, persist_result=False)


def dataset_prefixes(keys) -> list[str]:
    """Dataset prefixes (relative; "" = the root itself) from the keys of their manifests."""
    out = set()
    for k in keys:
        if k == MANIFEST_KEY:
            out.add("")
        elif k.endswith("/" + MANIFEST_KEY):
            out.add(k[: -len(MANIFEST_KEY) - 1])
    return sorted(out)


def owner(key: str, prefixes_longest_first: list[str]) -> str | None:
    """The dataset prefix a key belongs to (the longest matching one), or None."""
    for p in prefixes_longest_first:
        if p == "" or key.startswith(p + "/"):
            return p
    return None


@task(name="find-datasets", tags=[TAG_READ], **retry_options(), **_NO_CACHE)
def find_datasets(store: Store) -> list[str]:
    """Every dataset at or under ``store``'s prefix (keys ending in ``manifest.json``)."""
    found = dataset_prefixes(o.key for o in store.list_prefix(""))
    get_run_logger().info("%s: %d dataset(s)", store.uri, len(found))
    return found


@task(name="inventory", tags=[TAG_READ], **retry_options(), **_NO_CACHE)
def inventory(store: Store) -> dict:
    """List everything under ``store`` once: datasets, and each object's size and storage class.

    Returns ``{"datasets": [prefix...], "objects": {prefix: [(key, size, class)...]},
    "other": {"objects": n, "bytes": n}}`` with keys relative to the dataset prefix.
    """
    objs = [(o.key, o.size, o.storage_class or "STANDARD") for o in store.list_prefix("")]
    datasets = dataset_prefixes(k for k, _, _ in objs)
    order = sorted(datasets, key=len, reverse=True)
    by_ds: dict[str, list] = {p: [] for p in datasets}
    other = {"objects": 0, "bytes": 0}
    for key, size, sc in objs:
        p = owner(key, order)
        if p is None:
            other["objects"] += 1
            other["bytes"] += size
        else:
            by_ds[p].append((key[len(p) + 1:] if p else key, size, sc))
    get_run_logger().info("%s: %d objects, %d dataset(s)", store.uri, len(objs), len(datasets))
    return {"datasets": datasets, "objects": by_ds, "other": other}


@task(name="profile", tags=[TAG_READ], **retry_options(), **_NO_CACHE)
def profile(store: Store) -> dict:
    """What queries of this dataset read: block sizes from its index, and the range reads a
    whole-dataset read makes (:func:`bams3.pricing.profile`)."""
    return pricing.profile(store)


@task(name="versioned", tags=[TAG_READ], **retry_options(), **_NO_CACHE)
def versioned(store) -> bool:
    """Is versioning enabled (or suspended) on the S3 store's bucket?"""
    return s3admin.is_versioned(store)


@task(name="noncurrent-versions", tags=[TAG_READ], **retry_options(), **_NO_CACHE)
def noncurrent_versions(store, datasets: list[str]) -> dict:
    """The noncurrent versions and delete markers under a versioned bucket's ``store`` prefix
    (ListObjectVersions), by dataset: ``{"by_dataset": {prefix: [(key, size, class,
    is_delete_marker)...]}, "other": [...]}``, keys relative to the dataset prefix."""
    versions = s3admin.noncurrent_versions(store)
    order = sorted(datasets, key=len, reverse=True)
    by_ds: dict[str, list] = {p: [] for p in datasets}
    other = []
    for key, size, sc, dm in versions:
        p = owner(key, order)
        if p is None:
            other.append((key, size, sc, dm))
        else:
            by_ds[p].append((key[len(p) + 1:] if p else key, size, sc, dm))
    get_run_logger().info("%s: %d noncurrent version(s) and delete marker(s)", store.uri, len(versions))
    return {"by_dataset": by_ds, "other": other}


@task(name="lifecycle", **retry_options(), **_NO_CACHE)
def lifecycle(store, rules: list[dict], apply: bool = False, replace_under: str | None = None) -> dict:
    """Merge ``rules`` into the bucket's lifecycle configuration by rule ID (other rules are
    kept: a PutBucketLifecycleConfiguration replaces the whole configuration; bams3's own
    earlier rules under ``replace_under`` are superseded) and, if ``apply``, write it back.
    Returns the existing and the merged rule lists and the changes."""
    res = s3admin.lifecycle(store, rules, apply=apply, replace_under=replace_under)
    merged = res["merged"]
    log = get_run_logger()
    if apply:
        log.info("s3://%s: lifecycle configuration written: %d rule(s) (%d from bams3, %d kept)",
                 store.bucket, len(merged), len(rules), len(merged) - len(rules))
    else:
        log.info("s3://%s: dry run: would write %d lifecycle rule(s) (%d from bams3, %d kept)",
                 store.bucket, len(merged), len(rules), len(merged) - len(rules))
    return res
