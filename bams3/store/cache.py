"""A small on-disk cache for S3 metadata objects (manifest, index, header).

One file per (endpoint, bucket, key) holding the bytes of the version last seen, its ETag /
version id, and when it was last validated against S3. A reader trusts an entry for a short
while (the TTL) with zero requests, then revalidates it with a conditional GET
(``If-None-Match: <etag>``): 304 costs one tiny request, 200 replaces the entry.

Properties:
- safe for concurrent processes: entries are written to a temp file and ``os.replace``d;
- size-bounded: least recently used entries (file mtime = last use) are evicted beyond
  ``max_bytes``;
- never fatal: a corrupt, truncated or unreadable entry is a miss, and an unwritable cache
  directory just disables caching.

Location: ``$BAMS3_CACHE_DIR``, else ``$XDG_CACHE_HOME/bams3``, else ``~/.cache/bams3``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass

log = logging.getLogger(__name__)

_MAGIC = b"BAMS3C1\n"
_HDR = struct.Struct("<I")  # JSON header length
_FORMAT_DIR = "s3-v1"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 3600.0


def default_cache_dir() -> str:
    env = os.environ.get("BAMS3_CACHE_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bams3")


@dataclass
class CacheEntry:
    data: bytes
    etag: str | None
    version_id: str | None
    size: int
    storage_class: str | None
    last_modified: float | None
    validated_at: float  # time.time() of the last 200/304 from S3


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class MetadataCache:
    """Disk cache of small S3 objects, keyed by (namespace=endpoint, bucket, full key)."""

    def __init__(self, root: str | None = None, max_bytes: int = 512 * 1024 * 1024):
        self.root = os.path.join(root or default_cache_dir(), _FORMAT_DIR)
        self.max_bytes = int(max_bytes)
        self.enabled = True

    # -- paths ----------------------------------------------------------------------------
    def _path(self, ns: str, bucket: str, key: str) -> str:
        h = _digest(ns, bucket, key)
        return os.path.join(self.root, "objects", h[:2], h + ".obj")

    def _disable(self, why: str) -> None:
        if self.enabled:
            log.warning("bams3 metadata cache disabled (%s): %s", self.root, why)
        self.enabled = False

    # -- objects --------------------------------------------------------------------------
    def load(self, ns: str, bucket: str, key: str, *, etag: str | None = None) -> CacheEntry | None:
        """The cached entry, or None (missing, corrupt, or not for ``etag`` when given)."""
        if not self.enabled:
            return None
        path = self._path(ns, bucket, key)
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.debug("cache read failed for %s: %s", path, e)
            return None
        entry = self._decode(blob, ns, bucket, key)
        if entry is None:
            log.debug("ignoring corrupt cache entry %s", path)
            self._unlink(path)
            return None
        if etag is not None and entry.etag != etag:
            return None
        try:
            os.utime(path)  # mtime = last use, for LRU eviction
        except OSError:
            pass
        return entry

    @staticmethod
    def _decode(blob: bytes, ns: str, bucket: str, key: str) -> CacheEntry | None:
        try:
            if not blob.startswith(_MAGIC):
                return None
            (hlen,) = _HDR.unpack_from(blob, len(_MAGIC))
            start = len(_MAGIC) + _HDR.size
            meta = json.loads(blob[start:start + hlen])
            data = blob[start + hlen:]
            if (meta["ns"], meta["bucket"], meta["key"]) != (ns, bucket, key):
                return None  # hash collision or foreign file
            if len(data) != meta["len"] or zlib.crc32(data) != meta["crc32"]:
                return None
            return CacheEntry(data=data, etag=meta.get("etag"), version_id=meta.get("version_id"),
                              size=meta.get("size", len(data)),
                              storage_class=meta.get("storage_class"),
                              last_modified=meta.get("last_modified"),
                              validated_at=float(meta["validated_at"]))
        except (ValueError, KeyError, TypeError, struct.error):
            return None

    def store(self, ns: str, bucket: str, key: str, data: bytes, *, etag: str | None,
              version_id: str | None = None, size: int | None = None,
              storage_class: str | None = None, last_modified: float | None = None,
              validated_at: float | None = None) -> bool:
        """Write (replace) the entry. Returns False if not cached (disabled, too big, I/O error)."""
        if not self.enabled or (etag is None and version_id is None):
            return False
        data = bytes(data)
        if len(data) > self.max_bytes // 4:
            return False  # not "small"; caching it would churn the cache
        meta = {"ns": ns, "bucket": bucket, "key": key, "etag": etag, "version_id": version_id,
                "size": len(data) if size is None else size, "storage_class": storage_class,
                "last_modified": last_modified,
                "validated_at": time.time() if validated_at is None else validated_at,
                "len": len(data), "crc32": zlib.crc32(data)}
        header = json.dumps(meta, separators=(",", ":")).encode()
        path = self._path(ns, bucket, key)
        d = os.path.dirname(path)
        try:
            os.makedirs(d, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=_TMP_PREFIX)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_MAGIC + _HDR.pack(len(header)) + header)
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                self._unlink(tmp)
                raise
        except OSError as e:
            self._disable(str(e))
            return False
        self.evict(keep=path)  # a scan of a few hundred small files; cheap
        return True

    def mark_validated(self, ns: str, bucket: str, key: str, entry: CacheEntry,
                       when: float | None = None) -> None:
        """Record that ``entry`` is still current (after a 304)."""
        entry.validated_at = time.time() if when is None else when
        self.store(ns, bucket, key, entry.data, etag=entry.etag, version_id=entry.version_id,
                   size=entry.size, storage_class=entry.storage_class,
                   last_modified=entry.last_modified, validated_at=entry.validated_at)

    def invalidate(self, ns: str, bucket: str, key: str) -> None:
        self._unlink(self._path(ns, bucket, key))

    # -- small text values (bucket regions) -----------------------------------------------
    def get_value(self, name: str, max_age: float) -> str | None:
        if not self.enabled:
            return None
        path = os.path.join(self.root, "values", _digest(name) + ".json")
        try:
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
            if time.time() - float(rec["t"]) <= max_age and rec["name"] == name:
                return str(rec["value"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def put_value(self, name: str, value: str) -> None:
        if not self.enabled:
            return
        d = os.path.join(self.root, "values")
        try:
            os.makedirs(d, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=_TMP_PREFIX)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"name": name, "value": value, "t": time.time()}, f)
            os.replace(tmp, os.path.join(d, _digest(name) + ".json"))
        except OSError as e:
            self._disable(str(e))

    # -- size bound -----------------------------------------------------------------------
    def _scan(self) -> list[tuple[float, int, str]]:
        out = []
        objdir = os.path.join(self.root, "objects")
        now = time.time()
        try:
            subdirs = list(os.scandir(objdir))
        except OSError:
            return out
        for sub in subdirs:
            try:
                it = list(os.scandir(sub.path))
            except OSError:
                continue
            for e in it:
                try:
                    st = e.stat()
                except OSError:
                    continue
                if e.name.startswith(_TMP_PREFIX):
                    if now - st.st_mtime > _STALE_TMP_SECONDS:  # left by a crashed process
                        self._unlink(e.path)
                    continue
                out.append((st.st_mtime, st.st_size, e.path))
        return out

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self._scan())

    def evict(self, keep: str | None = None) -> int:
        """Delete least recently used entries until the cache fits ``max_bytes``."""
        files = self._scan()
        total = sum(size for _, size, _ in files)
        removed = 0
        if total <= self.max_bytes:
            return 0
        for _mtime, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            if self._unlink(path):
                removed += 1
            total -= size
        return removed

    def clear(self) -> None:
        for _, _, path in self._scan():
            self._unlink(path)

    @staticmethod
    def _unlink(path: str) -> bool:
        try:
            os.unlink(path)
            return True
        except OSError:
            return False
