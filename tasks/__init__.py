"""Prefect tasks over bams3: thin wrappers of the one implementation in ``bams3``/``bams3core``.

Conversion stages (the ``convert-to-s3`` and ``migrate`` flows; plain values in and out):

* ``plan``         -- the shards of a source (in the flow's process)
* ``shard``        -- encode and upload one shard (tags ``bams3-encode``, ``bams3-s3-upload``)
* ``verify_shard`` -- re-read the chunks a shard uploaded (tag ``bams3-s3-read``)
* ``commit``       -- index objects, header and the manifest (in the flow's process)
* ``verify``       -- re-read one chunk, or a whole/sampled dataset (tag ``bams3-s3-read``)

Storage (``verify-dataset``, ``storage-report``): ``find_datasets``, ``inventory``,
``profile``, ``lifecycle``.

I/O tasks retry transient errors only, with exponential backoff and jitter (:mod:`tasks.retry`).
"""

from __future__ import annotations

import importlib

from .pipeline import TAG_ENCODE, TAG_READ, TAG_UPLOAD, commit, plan, shard, verify, verify_shard
from .retry import is_transient, retry_on_transient

# the storage tasks (boto3's admin calls, the cost model) are imported on first use: a
# conversion does not need them
_LAZY = {"find_datasets", "inventory", "lifecycle", "profile"}

__all__ = ["plan", "shard", "verify_shard", "commit", "verify", "find_datasets", "inventory", "profile", "lifecycle",
           "is_transient", "retry_on_transient", "TAG_ENCODE", "TAG_UPLOAD", "TAG_READ"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module("tasks.storage"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
