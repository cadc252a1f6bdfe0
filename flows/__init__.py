"""Prefect flows for bams3 (see docs/PREFECT.md).

* ``convert-to-s3``  -- :func:`convert_to_s3`: BAM/SAM/CRAM -> dataset on S3 (or local)
* ``verify-dataset`` -- :func:`verify_dataset_flow`: full or sampled verification, fails if corrupt
* ``storage-report`` -- :func:`storage_report`: sizes, costs, lifecycle policy (dry run by default)
* ``migrate``        -- :func:`migrate`: every BAM/SAM/CRAM under directories/S3 prefixes -> datasets

Each runs as a plain Python call (Prefect starts a temporary local server if none is
configured), or deployed with deployments/prefect.yaml.

``storage_report`` and ``verify_dataset_flow`` are imported on first use: a conversion does not
pay for their imports (boto3's admin calls, the cost model).
"""

from __future__ import annotations

import importlib

# ``migrate`` is imported here, not lazily: the name is also the submodule's, and the package
# attribute must be the flow whatever was imported first
from flows.convert import convert_to_s3
from flows.migrate import migrate

_LAZY = {"storage_report": "flows.storage", "verify_dataset_flow": "flows.verify"}

__all__ = ["convert_to_s3", "verify_dataset_flow", "storage_report", "migrate"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flows' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
