"""The store interface (after zarr-python v3's ``Store``): a flat key/value space of objects
under one dataset prefix, with ranged and conditional reads and conditional writes.

Byte ranges are ``(start, end)`` with ``end`` exclusive, as Python slices.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Sequence

from ..errors import InputError


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store prefix
    size: int
    etag: str | None = None  # S3 ETag (quotes stripped) or a local stand-in (mtime_ns-size)
    version_id: str | None = None
    storage_class: str | None = None
    last_modified: float | None = None  # seconds since the epoch


@dataclass(frozen=True)
class Upload:
    """An unfinished write: an S3 multipart upload, or a local temporary file."""

    key: str  # relative to the store prefix (local: the temporary file's own key)
    upload_id: str | None  # S3 UploadId; None for a local temporary file
    initiated: float | None  # seconds since the epoch, store clock


def parse_uri(uri: str) -> tuple[str, str | None, str]:
    """Split ``uri`` into (scheme, bucket, prefix). Local paths give ("file", None, path)."""
    if uri.startswith("s3://"):
        rest = uri[5:]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise InputError(f"bad S3 URI {uri!r}: expected s3://bucket/prefix")
        return "s3", bucket, prefix.strip("/")
    if "://" in uri:
        raise InputError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    return "file", None, uri


class Store(abc.ABC):
    """A dataset's objects. Implementations: LocalStore (directory), S3Store (bucket/prefix)."""

    uri: str

    # -- reads ---------------------------------------------------------------------------
    @abc.abstractmethod
    def get(self, key: str, byte_range: tuple[int, int] | None = None, *,
            if_match: str | None = None) -> bytes:
        """Return the object's bytes (or ``byte_range`` of them).

        Raises NotFound if absent, PreconditionFailed if ``if_match`` (an ETag) no longer holds.
        """

    def get_with_info(self, key: str) -> tuple[bytes, ObjectInfo]:
        """Whole object plus its info (ETag/version) from a single request where possible."""
        data = self.get(key)
        return data, self.head(key)

    def get_small(self, key: str, *, max_age: float | None = None) -> tuple[bytes, ObjectInfo]:
        """A small metadata object (manifest, index, header), possibly from a local cache.

        ``max_age``: seconds a cached copy may be served without asking the store (S3 only;
        ``float('inf')`` for immutable objects, 0 to force revalidation). Local: plain read.
        """
        return self.get_with_info(key)

    def invalidate(self, key: str) -> None:
        """Forget any cached copy of ``key``."""

    def get_small_range(self, key: str, byte_range: tuple[int, int]) -> bytes:
        """A byte range of an immutable metadata object (index pages), possibly from a local
        cache; the caller checks it (the manifest holds each page's CRC-32)."""
        return self.get(key, byte_range)

    def invalidate_range(self, key: str, byte_range: tuple[int, int]) -> None:
        """Forget a cached copy of :meth:`get_small_range` ``(key, byte_range)``."""

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]], *,
                   if_match: str | None = None) -> list[bytes]:
        """Several ranges of one object (S3: parallel ranged GETs). Order follows ``ranges``."""
        return [self.get(key, r, if_match=if_match) for r in ranges]

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Info for ``key``; raises NotFound."""

    def exists(self, key: str) -> bool:
        from ..errors import NotFound

        try:
            self.head(key)
            return True
        except NotFound:
            return False

    @abc.abstractmethod
    def list_prefix(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (relative keys)."""

    def open_read(self, key: str) -> BinaryIO:
        """A streaming reader over the whole object (used for spill runs)."""
        import io

        return io.BytesIO(self.get(key))

    # -- writes --------------------------------------------------------------------------
    @abc.abstractmethod
    def set(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None,
            content_type: str | None = None, kind: str | None = None) -> ObjectInfo:
        """Write ``data`` at ``key`` atomically (readers never see a partial object).

        ``if_none_match=True`` fails with PreconditionFailed if ``key`` already exists;
        ``if_match`` (the ETag :meth:`get_with_info` returned) fails with PreconditionFailed
        unless ``key`` still holds that version (compare-and-swap).
        ``kind``: what the object is to the dataset: ``"chunk"`` (data), ``"tmp"`` (spill), or
        None (metadata). S3 writes chunks in the configured storage class and tags chunk and
        spill objects (``bams3-object=chunk|tmp``) for lifecycle rules; metadata stays STANDARD.
        S3: multipart above the configured part size (conditional writes: always one
        PutObject), retried with backoff.
        """

    @abc.abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Delete the given keys (missing keys are fine)."""

    def delete_prefix(self, prefix: str) -> int:
        keys = [o.key for o in self.list_prefix(prefix)]
        self.delete(keys)
        return len(keys)

    def cleanup_incomplete(self, prefix: str = "", older_than: float | None = None) -> int:
        """Abort/remove half-written objects under ``prefix`` (S3: multipart uploads), only
        those started more than ``older_than`` seconds ago when given. Whatever their keys:
        bams3 itself aborts only uploads of its own layout (:meth:`incomplete_uploads`)."""
        return 0

    def incomplete_uploads(self, prefix: str = "") -> Iterator[Upload]:
        """Unfinished writes under ``prefix`` (S3 multipart uploads, local temporary files)."""
        return iter(())

    def abort_uploads(self, uploads: Iterable[Upload]) -> None:
        """Abort the given unfinished writes (already finished or aborted ones are fine)."""

    def now(self) -> float:
        """The store's clock (seconds since the epoch): what ``last_modified`` is measured by."""
        import time

        return time.time()

    def close(self) -> None:
        """Release connections / thread pools."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
