"""A dataset in a local directory."""

from __future__ import annotations

import os
import tempfile
from typing import Iterable, Iterator

from ..errors import NotFound, PreconditionFailed, StoreError
from .base import ObjectInfo, Store


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

    def set(self, key, data, *, if_none_match=False, content_type=None, kind=None):
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
            else:
                os.replace(tmp, path)
        except PermissionError:
            raise StoreError(f"{path}: permission denied") from None
        except OSError as e:
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"{path}: {e.strerror or e}") from None
        return self.head(key)

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
