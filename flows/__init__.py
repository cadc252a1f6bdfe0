"""Prefect flows for bams3 (see docs/PREFECT.md).

* ``convert-to-s3``  -- :func:`convert_to_s3`: BAM/SAM/CRAM -> dataset on S3 (or local)
* ``verify-dataset`` -- :func:`verify_dataset_flow`: full or sampled verification, fails if corrupt
* ``storage-report`` -- :func:`storage_report`: sizes, costs, lifecycle policy (dry run by default)
* ``migrate``        -- :func:`migrate`: every BAM/SAM/CRAM under directories/S3 prefixes -> datasets

Each runs as a plain Python call (Prefect starts a temporary local server if none is
configured), or deployed with deployments/prefect.yaml.
"""

from flows.convert import convert_to_s3
from flows.migrate import migrate
from flows.storage import storage_report
from flows.verify import verify_dataset_flow

__all__ = ["convert_to_s3", "verify_dataset_flow", "storage_report", "migrate"]
