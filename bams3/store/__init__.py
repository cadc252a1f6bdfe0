"""Stores: where a dataset's objects live. One interface, two implementations.

``open_store(uri)`` returns a :class:`LocalStore` for a path and an ``S3Store`` for
``s3://bucket/prefix``. Keys are always relative to the dataset prefix and use ``/``.
"""

from .base import ObjectInfo, Store, Upload, parse_uri
from .local import LocalStore


def open_store(uri: str, **s3_options) -> Store:
    """Open the store behind ``uri`` (a local directory or ``s3://bucket/prefix``)."""
    scheme, bucket, prefix = parse_uri(uri)
    if scheme == "s3":
        from .s3 import S3Store  # boto3 is imported only when S3 is used

        return S3Store(bucket, prefix, **{k: v for k, v in s3_options.items() if v is not None})
    return LocalStore(prefix)


__all__ = ["ObjectInfo", "Store", "Upload", "LocalStore", "open_store", "parse_uri"]
