"""The datasets under the server's root: ids, stores, and the listing the index page shows.

An id is a dataset's path relative to the root (``cohort/sample.bams3``), so ids may hold
``/`` (the htsget spec allows it). Ids are checked before they reach a store: no empty,
``.`` or ``..`` segment, so a request can never name anything outside the root.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from bams3core.index import MANIFEST_KEY

from ..dataset import Dataset
from ..errors import Bams3Error, DatasetError, NotFound
from ..store import Store, open_store, parse_uri


class UnknownDataset(Bams3Error):
    """No dataset with this id under the root."""


@dataclass(frozen=True)
class Entry:
    id: str
    records: int
    references: int
    bytes: int
    created: str  # the last commit's time (ISO 8601), from the manifest


class Catalog:
    """Opens datasets by id under ``root`` (a directory or ``s3://bucket/prefix``).

    Stores are kept (an S3 store holds a client and a connection pool) for up to
    ``max_stores`` ids; each request opens its own :class:`Dataset` on them, reading the
    manifest through the store's cache, so a new commit is seen without a restart."""

    def __init__(self, root: str, *, store_options: dict | None = None, max_stores: int = 64,
                 listing_ttl: float = 30.0, refresh: bool = False):
        self.scheme, self.bucket, prefix = parse_uri(root)
        self.root = root.rstrip("/") if self.scheme == "s3" else os.path.abspath(root)
        self.store_options = dict(store_options or {})
        self.max_stores = max_stores
        self.listing_ttl = listing_ttl
        self.refresh = refresh  # revalidate cached manifests (and index, header) on every request
        self._stores: OrderedDict[str, Store] = OrderedDict()
        self._lock = threading.Lock()
        self._listing: tuple[float, list[Entry]] | None = None
        # the root itself may be one dataset: then its id is its last path segment
        self.single = self._root_is_dataset()
        self.single_id = self.root.rstrip("/").rsplit("/", 1)[-1] if self.single else None

    def _root_is_dataset(self) -> bool:
        if self.scheme == "s3":
            try:
                return self._store_at(self.root).exists(MANIFEST_KEY)
            except Bams3Error:
                return False
        return os.path.isfile(os.path.join(self.root, MANIFEST_KEY))

    # -- ids -----------------------------------------------------------------------------
    def uri(self, ds_id: str) -> str:
        """The dataset URI behind ``ds_id``; UnknownDataset if the id is malformed."""
        if self.single:
            if ds_id != self.single_id:
                raise UnknownDataset(f"no dataset {ds_id!r} (this server serves {self.single_id!r})")
            return self.root
        parts = ds_id.split("/")
        if not ds_id or any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
            raise UnknownDataset(f"no dataset {ds_id!r}: an id is a path under the root without empty, "
                                 "'.' or '..' segments")
        return f"{self.root}/{ds_id}"

    def _store_at(self, uri: str) -> Store:
        with self._lock:
            store = self._stores.get(uri)
            if store is not None:
                self._stores.move_to_end(uri)
                return store
        store = open_store(uri, **self.store_options)
        with self._lock:
            self._stores[uri] = store
            while len(self._stores) > self.max_stores:
                _, old = self._stores.popitem(last=False)
                old.close()
        return store

    def store(self, ds_id: str) -> Store:
        return self._store_at(self.uri(ds_id))

    def open(self, ds_id: str, *, run: str | None = None) -> Dataset:
        """The dataset ``ds_id`` at its current commit, or at commit ``run`` (a ticket's)."""
        uri = self.uri(ds_id)
        if self.scheme == "file" and not os.path.isfile(os.path.join(uri, MANIFEST_KEY)):
            raise UnknownDataset(f"no dataset {ds_id!r} under the server's root")
        try:
            ds = Dataset.open(self._store_at(uri), refresh=self.refresh)
        except NotFound:
            raise UnknownDataset(f"no dataset {ds_id!r} under the server's root") from None
        except DatasetError as e:
            if "no bams3 dataset here" in str(e):
                raise UnknownDataset(f"no dataset {ds_id!r} under the server's root") from None
            raise
        if run is None or ds.manifest.run_id == run:
            return ds
        try:  # committed again since the ticket was issued: its snapshot, if kept (FORMAT.md §2.6)
            return Dataset.open(self._store_at(uri), snapshot=run, refresh=self.refresh)
        except (DatasetError, NotFound):
            raise UnknownDataset(f"dataset {ds_id!r} was replaced after the ticket was issued (commit {run} is "
                                 "no longer kept); request a new ticket") from None

    # -- listing -------------------------------------------------------------------------
    def ids(self) -> list[str]:
        """Every dataset id under the root, sorted."""
        if self.single:
            return [self.single_id]
        if self.scheme == "file":
            found = []
            for d, dirs, files in os.walk(self.root):
                if MANIFEST_KEY in files and d != self.root:
                    found.append(os.path.relpath(d, self.root).replace(os.sep, "/"))
                    dirs[:] = []  # a dataset's own objects are not datasets
                else:
                    dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            return sorted(found)
        root = self._store_at(self.root)
        return sorted(o.key[: -len(MANIFEST_KEY) - 1] for o in root.list_prefix("")
                      if o.key.endswith("/" + MANIFEST_KEY))

    def listing(self) -> list[Entry]:
        """One entry per dataset (read from its manifest), cached for ``listing_ttl`` seconds."""
        now = time.monotonic()
        cached = self._listing
        if cached is not None and now - cached[0] < self.listing_ttl:
            return cached[1]
        out = []
        for ds_id in self.ids():
            try:
                m = self.open(ds_id).manifest
            except Bams3Error:
                continue  # removed or damaged since it was listed
            size = sum(c.size for c in m.chunks) + sum(i.size for i in m.index) + m.header.size
            out.append(Entry(ds_id, m.n_records, len(m.references), size, m.created))
        self._listing = (now, out)
        return out

    def close(self) -> None:
        with self._lock:
            for s in self._stores.values():
                s.close()
            self._stores.clear()
