"""Runs on a store: each writer's lease (heartbeat), and removing what dead runs left.

A run announces itself with a lease object ``runs/<run_id>.json`` before it writes anything
else, refreshes it from a background thread while it runs, and deletes it after its commit
or abort. :func:`find_leftovers` lists the dataset's layout keys and unfinished uploads and
hands them to :func:`bams3core.layout.plan_removal`, which attributes them to runs and keeps
every run that may be alive (docs/FORMAT.md §2.4). Nothing outside the layout is touched.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bams3core import layout
from bams3core.index import MANIFEST_KEY

from . import __version__
from .errors import NotFound
from .store import Store, Upload

#: the prefixes where a run's objects live (listed separately: at a bucket root, never the
#: whole bucket)
RUN_PREFIXES = (layout.LEASES, "data/", "_tmp/")


class Lease:
    """The lease of one run: written by :meth:`start`, refreshed every
    ``LEASE_TTL / HEARTBEATS_PER_TTL`` seconds by a daemon thread, deleted by :meth:`end`."""

    def __init__(self, store: Store, run_id: str):
        self.store = store
        self.run_id = run_id
        self.key = layout.lease_key(run_id)
        self.started = time.time()
        self.last_beat: float | None = None  # local time of the last successful refresh
        self.ttl = layout.LEASE_TTL
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self, failed: bool = False) -> bytes:
        body = {"run_id": self.run_id, "tool": f"bams3 {__version__}", "host": socket.gethostname(),
                "pid": os.getpid(), "started": round(self.started, 3), "heartbeat": round(time.time(), 3),
                "ttl": self.ttl}
        if failed:
            body["failed"] = True  # stopped for good: `--resume` may take the run over at once
        return (json.dumps(body) + "\n").encode()

    def beat(self) -> None:
        t = time.time()
        self.store.set(self.key, self._body(), content_type="application/json")
        self.last_beat = t

    def start(self) -> None:
        self.beat()  # synchronously: no other object of the run exists before its lease
        self._thread = threading.Thread(target=self._run, name=f"bams3-lease-{self.run_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / layout.HEARTBEATS_PER_TTL):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat; holds() tells the writer
                pass

    def holds(self) -> bool:
        """True while no other process can have judged this run dead: the last refresh is
        less than half the TTL old (the other half is margin for clocks and slow requests)."""
        return self.last_beat is not None and time.time() - self.last_beat < self.ttl / 2

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def fail(self) -> None:
        """Stop refreshing and mark the lease failed (the run's objects stay, for a resume)."""
        self.stop()
        self.store.set(self.key, self._body(failed=True), content_type="application/json")

    def end(self) -> None:
        """Stop refreshing and delete the lease (the run's other objects must be gone or
        committed by now)."""
        self.stop()
        self.store.delete([self.key])


def find_leftovers(store: Store, *, own: set[str] = frozenset(), empty_before: bool = False) -> layout.Removal:
    """What dead runs left on ``store`` (nothing of ``own`` runs, of runs that may be alive,
    or of the committed dataset). Listings first, then the manifest, then the clock.

    ``empty_before``: the caller listed the whole prefix, found no object at all, and only then
    wrote its lease. Every object there now was written after that listing, so it is too young
    to be a dead run's (a lease younger than the TTL, objects younger than an hour) and no run
    is committed: only unfinished uploads (which listings do not show) can be dead, so only
    they are listed."""
    if empty_before:
        uploads = [layout.Listed(u.key, u.initiated, u.upload_id) for u in store.incomplete_uploads("")
                   if layout.classify(u.key) is not None]
        if not uploads:
            return layout.Removal()
        return find_leftovers(store, own=own)  # an upload is left: judge it as usual, on the listings
    # the run prefixes and the unfinished uploads are listed at once (one round trip instead
    # of four); each listing is a snapshot of some moment anyway, and all of them end before
    # the snapshots are listed and the manifest is read
    with ThreadPoolExecutor(len(RUN_PREFIXES) + 1, thread_name_prefix="bams3-list") as pool:
        listings = [pool.submit(lambda p: list(store.list_prefix(p)), p) for p in RUN_PREFIXES]
        pending = pool.submit(lambda: list(store.incomplete_uploads("")))
        listed = [f.result() for f in listings]
        unfinished = pending.result()
    objects, seen = [], set()
    for infos in listed:
        for o in infos:
            if layout.classify(o.key) is not None and o.key not in seen:
                seen.add(o.key)
                objects.append(layout.Listed(o.key, o.last_modified))
    uploads = [layout.Listed(u.key, u.initiated, u.upload_id) for u in unfinished
               if u.key not in seen and layout.classify(u.key) is not None]
    # the runs of retained snapshots (§2.6) are committed runs too: listed after the runs
    snapshot_runs = {r for r in (layout.snapshot_run(o.key) for o in store.list_prefix(layout.SNAPSHOTS)) if r}
    try:
        manifest = store.get(MANIFEST_KEY)
    except NotFound:
        manifest = None
    return layout.plan_removal(objects, uploads, now=store.now(),
                               committed=layout.manifest_runs(manifest) | snapshot_runs,
                               own=set(own), lease_ttl=layout.LEASE_TTL, stale_seconds=layout.STALE_SECONDS)


def remove(store: Store, plan: layout.Removal) -> None:
    """Abort the plan's unfinished uploads, then delete its objects (leases last)."""
    if plan.uploads:
        store.abort_uploads([Upload(u.key, u.upload_id, u.time) for u in plan.uploads])
    leases = [k for k in plan.objects if k.startswith(layout.LEASES)]
    rest = [k for k in plan.objects if not k.startswith(layout.LEASES)]
    if rest:
        store.delete(rest)
    if leases:
        store.delete(leases)


def foreign_key(store: Store) -> str | None:
    """The first key under the dataset prefix that no bams3 writer creates, or None."""
    return survey(store)[0]


def survey(store: Store) -> tuple[str | None, bool]:
    """(:func:`foreign_key`, whether the prefix holds no object at all), from one listing."""
    empty = True
    for o in store.list_prefix(""):
        empty = False
        if layout.classify(o.key) is None:
            return o.key, False
    return None, empty
