"""A dataset in a local directory."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import time
from typing import Iterable, Iterator

from ..errors import NotFound, PreconditionFailed, StoreError
from .base import ObjectInfo, Store, Upload


_UMASK = os.umask(0)
os.umask(_UMASK)


class LocalStore(Store):
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.uri = self.root

    def _path(self, key: str) -> str:
        """The file of ``key``; a key that would leave the dataset directory (absolute, a ``..``
        segment, a backslash or NUL) is refused, whoever names it."""
        parts = key.split("/") if isinstance(key, str) else [""]
        if (not key or key.startswith("/") or "\\" in key or "\0" in key
                or any(p in ("", ".", "..") for p in parts)):
            raise StoreError(f"{self.root}: refusing object key {str(key)[:100]!r} (outside the dataset directory)")
        path = os.path.join(self.root, *parts)
        if os.path.commonpath([self.root, os.path.normpath(path)]) != self.root:
            raise StoreError(f"{self.root}: refusing object key {key[:100]!r} (outside the dataset directory)")
        return path

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(key=key, size=st.st_size, etag=f"{st.st_mtime_ns:x}-{st.st_size:x}",
                          last_modified=st.st_mtime)

    def get(self, key, byte_range=None, *, if_match=None):
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                if if_match is not None and self._info(key, os.fstat(f.fileno())).etag != if_match:
                    raise PreconditionFailed(f"{path} changed since it was indexed")
                if byte_range is None:
                    return f.read()
                start, end = byte_range
                f.seek(start)
                return f.read(end - start)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{path}: no such file") from None
        except IsADirectoryError:
            raise StoreError(f"{path}: is a directory, expected a file") from None
        except PermissionError:
            raise StoreError(f"{path}: permission denied") from None

    def get_with_info(self, key):
        """The bytes and, as their ETag, their MD5 (a content hash, as S3 gives for a
        single-part object): what :meth:`set` ``if_match=`` compares."""
        data = self.get(key)
        info = self.head(key)
        return data, ObjectInfo(key=key, size=len(data), etag=hashlib.md5(data).hexdigest(),
                                last_modified=info.last_modified)

    def head(self, key):
        path = self._path(key)
        try:
            return self._info(key, os.stat(path))
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{path}: no such file") from None

    def list_prefix(self, prefix=""):
        if not os.path.isdir(self.root):
            return iter(())
        return self._walk(prefix)

    def _walk(self, prefix) -> Iterator[ObjectInfo]:
        for dirpath, _dirs, files in os.walk(self.root):
            for name in sorted(files):
                full = os.path.join(dirpath, name)
                key = os.path.relpath(full, self.root).replace(os.sep, "/")
                if key.startswith(prefix):
                    try:
                        yield self._info(key, os.stat(full))
                    except FileNotFoundError:
                        continue

    def open_read(self, key):
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFound(f"{self._path(key)}: no such file") from None

    def set(self, key, data, *, if_none_match=False, if_match=None, content_type=None, kind=None):
        path = self._path(key)
        d = os.path.dirname(path)
        try:
            os.makedirs(d, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; datasets are shared files
            if if_none_match:
                try:
                    os.link(tmp, path)  # atomic create-if-absent
                except FileExistsError:
                    raise PreconditionFailed(f"{path}: already exists; use --overwrite to replace it") from None
                finally:
                    os.unlink(tmp)
            elif if_match is not None:
                try:
                    self._swap(key, path, tmp, if_match)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except PermissionError:
            raise StoreError(f"{path}: permission denied") from None
        except OSError as e:
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"{path}: {e.strerror or e}") from None
        return self.head(key)

    def _swap(self, key: str, path: str, tmp: str, if_match: str) -> None:
        """Compare-and-swap: under an exclusive lock on ``.<name>.lock`` (held by every
        conditional replace of ``key``), replace ``path`` by ``tmp`` only if it still holds the
        version ``if_match`` names (MD5 of its content, or the mtime-size stand-in)."""
        if not os.path.exists(path):  # (no lock file for a key that was never written)
            raise PreconditionFailed(f"{path} was removed since it was read")
        lock = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
        with open(lock, "a") as lf:
            fcntl.flock(lf.fileno(), fcntl.LOCK_EX)  # released when the file is closed
            try:
                with open(path, "rb") as f:
                    current = f.read()
                    stand_in = self._info(key, os.fstat(f.fileno())).etag
            except FileNotFoundError:
                raise PreconditionFailed(f"{path} was removed since it was read") from None
            if if_match not in (hashlib.md5(current).hexdigest(), stand_in):
                raise PreconditionFailed(f"{path} was replaced since it was read")
            os.replace(tmp, path)

    def delete(self, keys: Iterable[str]):
        dirs = set()
        for key in keys:
            path = self._path(key)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            dirs.add(os.path.dirname(path))
        # prune directories left empty (never the dataset root itself)
        for d in sorted(dirs, key=len, reverse=True):
            while d.startswith(self.root + os.sep):
                try:
                    os.rmdir(d)
                except OSError:
                    break
                d = os.path.dirname(d)

    def cleanup_incomplete(self, prefix="", older_than=None):
        import time

        n = 0
        cutoff = None if older_than is None else time.time() - older_than
        for dirpath, _dirs, files in os.walk(self._path(prefix.rstrip("/")) if prefix.rstrip("/") else self.root):
            for name in files:
                path = os.path.join(dirpath, name)
                if name.startswith(".tmp-") and (cutoff is None or os.path.getmtime(path) < cutoff):
                    os.unlink(path)
                    n += 1
        return n

    def incomplete_uploads(self, prefix=""):
        """Temporary files of writes in progress (or of writers that died) under ``prefix``."""
        top = self._path(prefix.rstrip("/")) if prefix.rstrip("/") else self.root  # a prefix may end in "/"
        for dirpath, _dirs, files in os.walk(top):
            for name in sorted(files):
                if name.startswith(".tmp-"):
                    full = os.path.join(dirpath, name)
                    try:
                        mtime = os.path.getmtime(full)
                    except FileNotFoundError:
                        continue
                    yield Upload(os.path.relpath(full, self.root).replace(os.sep, "/"), None, mtime)

    def abort_uploads(self, uploads):
        self.delete(u.key for u in uploads)

    def now(self):
        return time.time()
