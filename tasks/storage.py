"""Tasks that look at what is stored: find datasets, inventory objects, profile a dataset's
index for query costs, and merge lifecycle rules into a bucket's configuration."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from bams3.dataset import Dataset, _split_reads
from bams3.store import Store
from bams3core.cost import merge_lifecycle_rules
from bams3core.index import MANIFEST_KEY
from bams3core.query import plan_reads

from .pipeline import TAG_READ
from .retry import retry_options

_NO_CACHE = dict(cache_policy=NONE, persist_result=False)

# what `bams3 query DATASET` (every record) does: merge reads over gaps < 1 MiB, split > 8 MiB
WHOLE_READ_MAX_GAP = 1 << 20
WHOLE_READ_MAX_BYTES = 8 << 20


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
    whole-dataset read makes (planned exactly as the reader plans them)."""
    ds = Dataset.open(store, refresh=True)
    m = ds.manifest
    rows = ds.all_rows()
    reads = _split_reads(plan_reads(rows, max_gap=WHOLE_READ_MAX_GAP), max_bytes=WHOLE_READ_MAX_BYTES)
    manifest_bytes = store.head(MANIFEST_KEY).size
    return {
        "uri": store.uri,
        "run_id": m.run_id,
        "records": m.n_records,
        "source": m.source,
        "chunks": len(m.chunks),
        "chunk_keys": [c.key for c in m.chunks],
        "chunk_bytes": [c.size for c in m.chunks],
        "blocks": int(len(rows)),
        "block_lengths": [int(x) for x in rows["length"]],
        "manifest_bytes": manifest_bytes,
        "header_bytes": m.header.size,
        "index_bytes": [ix.size for ix in m.index],
        # what a small region query reads of an index: one page (the whole object if unpaged)
        "index_page_bytes": [p[1] for ix in m.index for p in (ix.pages or [[0, ix.size]])],
        "whole_read_sizes": [rr.size for rr in reads],
    }


@task(name="lifecycle", **retry_options(), **_NO_CACHE)
def lifecycle(store, rules: list[dict], apply: bool = False) -> dict:
    """Merge ``rules`` into the bucket's lifecycle configuration by rule ID (other rules are
    kept: a PutBucketLifecycleConfiguration replaces the whole configuration) and, if
    ``apply``, write it back. Returns the existing and the merged rule lists."""
    import botocore.exceptions as bce

    from bams3.store.s3 import translate_error

    client = store.client
    extra = {}
    try:
        resp = client.get_bucket_lifecycle_configuration(Bucket=store.bucket)
        existing = resp.get("Rules", [])
        if resp.get("TransitionDefaultMinimumObjectSize"):
            extra["TransitionDefaultMinimumObjectSize"] = resp["TransitionDefaultMinimumObjectSize"]
    except bce.ClientError as e:
        if e.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
            raise translate_error(e, bucket=store.bucket, op="GetBucketLifecycleConfiguration") from None
        existing = []
    except Exception as e:  # noqa: BLE001
        raise translate_error(e, bucket=store.bucket, op="GetBucketLifecycleConfiguration") from None
    merged = merge_lifecycle_rules(existing, rules)
    log = get_run_logger()
    if apply:
        try:
            client.put_bucket_lifecycle_configuration(Bucket=store.bucket,
                                                      LifecycleConfiguration={"Rules": merged}, **extra)
        except Exception as e:  # noqa: BLE001
            raise translate_error(e, bucket=store.bucket, op="PutBucketLifecycleConfiguration") from None
        log.info("s3://%s: lifecycle configuration written: %d rule(s) (%d from bams3, %d kept)",
                 store.bucket, len(merged), len(rules), len(merged) - len(rules))
    else:
        log.info("s3://%s: dry run: would write %d lifecycle rule(s) (%d from bams3, %d kept)",
                 store.bucket, len(merged), len(rules), len(merged) - len(rules))
    return {"bucket": store.bucket, "existing": existing, "merged": merged, "applied": bool(apply)}
