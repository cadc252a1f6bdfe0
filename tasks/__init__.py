"""Prefect tasks over bams3: thin wrappers of the one implementation in ``bams3``/``bams3core``.

Pipeline (used by the ``convert-to-s3`` flow through :class:`flows.convert.PrefectExecutor`):

* ``chunk``  -- encode a slice of planned blocks (tag ``bams3-encode``)
* ``upload`` -- upload one chunk object, idempotent (tag ``bams3-s3-upload``)
* ``verify`` -- re-read one uploaded chunk, or a whole/sampled dataset (tag ``bams3-s3-read``)
* ``index``  -- write index, header and the manifest: the commit

Storage (``verify-dataset``, ``storage-report``): ``find_datasets``, ``inventory``,
``profile``, ``lifecycle``.

I/O tasks retry transient errors only, with exponential backoff and jitter (:mod:`tasks.retry`).
"""

from .pipeline import TAG_ENCODE, TAG_READ, TAG_UPLOAD, chunk, index, upload, verify
from .retry import is_transient, retry_on_transient
from .storage import find_datasets, inventory, lifecycle, profile

__all__ = ["chunk", "upload", "verify", "index", "find_datasets", "inventory", "profile", "lifecycle",
           "is_transient", "retry_on_transient", "TAG_ENCODE", "TAG_UPLOAD", "TAG_READ"]
