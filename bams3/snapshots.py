"""Snapshots: every commit kept as ``snapshots/<run_id>.json`` for a retention (docs/FORMAT.md §2.6).

A commit writes its manifest also as its snapshot manifest; ``--overwrite`` then removes the
runs of the snapshots beyond the retention (the current one, the ``keep`` most recently
current others, and any written less than ``keep_days`` ago stay). A retained snapshot's run
is a committed run: the dead-run sweep and ``bams3 cleanup`` never touch it (bams3.runs).
:func:`rollback` makes a snapshot current again with one conditional manifest write.
"""

from __future__ import annotations

from bams3core import layout
from bams3core.index import MANIFEST_KEY, IndexError_, Manifest

from .errors import DatasetError, InputError, NotFound, PreconditionFailed
from .store import Store

DEFAULT_KEEP = 1  # the current snapshot plus one previous


def list_snapshots(store: Store) -> list[layout.Snapshot]:
    out = []
    for o in store.list_prefix(layout.SNAPSHOTS):
        run = layout.snapshot_run(o.key)
        if run is not None:
            out.append(layout.Snapshot(run, o.last_modified))
    return out


def check_run_id(run_id: str) -> str:
    if not layout.is_run_id(run_id):
        raise InputError(f"{run_id!r} is not a snapshot (a run id: 16 lowercase hex digits; bams3 log lists them)")
    return run_id


def read_snapshot(store: Store, run_id: str) -> tuple[bytes, Manifest]:
    """The snapshot manifest of ``run_id`` (its bytes and parsed form), checked (§3.5)."""
    check_run_id(run_id)
    key = layout.snapshot_key(run_id)
    try:
        data = store.get(key)
    except NotFound:
        data = _current_if(store, run_id)  # a commit not yet recorded as a snapshot (or from before them)
        if data is None:
            raise DatasetError(f"{store.uri}: no snapshot {run_id} (bams3 log {store.uri} lists the snapshots)") from None
    try:
        m = Manifest.from_json(data)
    except IndexError_ as e:
        raise DatasetError(f"{store.uri}/{key}: {e}") from None
    if m.run_id != run_id:
        raise DatasetError(f"{store.uri}/{key}: names run {m.run_id}, not {run_id} (malformed snapshot)")
    return data, m


def apply_retention(store: Store, *, current: str, previous: str | None, keep: int,
                    keep_days: float | None) -> list[str]:
    """Remove the runs (objects under ``data/<run>/``, then the snapshot manifest) of the
    snapshots beyond the retention, and ``previous`` if it is not retained. Returns them."""
    snaps = list_snapshots(store)
    keepers = layout.retained(snaps, current=current, previous=previous, keep=keep, keep_days=keep_days,
                              now=store.now())
    gone = sorted(({s.run_id for s in snaps} | ({previous} if previous else set())) - keepers)
    for run in gone:
        keys = [o.key for o in store.list_prefix(f"data/{run}/")]
        if keys:
            store.delete(keys)
        store.delete([layout.snapshot_key(run)])  # last: while objects remain, the run stays protected
    return gone


def log(store: Store) -> list[dict]:
    """One entry per snapshot, newest commit first: run id, time, records, bytes, source, current."""
    try:
        current = Manifest.from_json(store.get(MANIFEST_KEY)).run_id
    except NotFound:
        raise DatasetError(f"{store.uri}: no bams3 dataset here (no {MANIFEST_KEY})") from None
    except IndexError_ as e:
        raise DatasetError(f"{store.uri}/{MANIFEST_KEY}: {e}") from None
    out = []
    runs = {s.run_id for s in list_snapshots(store)} | {current}
    for run in runs:
        if run == current:
            _d, m = _current(store)
        else:
            try:
                _d, m = read_snapshot(store, run)
            except DatasetError:
                continue  # removed by a retention meanwhile
        out.append({"run_id": run, "time": m.created, "records": m.n_records,
                    "bytes": sum(c.size for c in m.chunks) + sum(i.size for i in m.index) + m.header.size,
                    "source": m.source, "current": run == current})
    # newest first; `created` has whole seconds: of commits made in the same second the current
    # one is the newest (an older one becomes current again only by a rollback, seconds later)
    out.sort(key=lambda e: (e["time"] or "", e["current"], e["run_id"]), reverse=True)
    return out


def _current_if(store: Store, run_id: str) -> bytes | None:
    """The current manifest's bytes if it is the commit ``run_id``."""
    try:
        data = store.get(MANIFEST_KEY)
    except NotFound:
        return None
    try:
        return data if Manifest.from_json(data).run_id == run_id else None
    except IndexError_:
        return None


def _current(store: Store) -> tuple[bytes, Manifest]:
    data = store.get(MANIFEST_KEY)
    return data, Manifest.from_json(data)


def rollback(store: Store, run_id: str) -> Manifest:
    """Make snapshot ``run_id`` current: one write of its manifest, conditional on the current
    manifest being the one read (S3 ``If-Match``; local: the manifest's compare-and-swap)."""
    check_run_id(run_id)
    try:
        cur_data, info = store.get_with_info(MANIFEST_KEY)
    except NotFound:
        raise DatasetError(f"{store.uri}: no bams3 dataset here (no {MANIFEST_KEY})") from None
    data, m = read_snapshot(store, run_id)
    try:
        cur = Manifest.from_json(cur_data)
    except IndexError_:
        cur = None
    if cur is not None and cur.run_id == run_id:
        return m
    if cur is not None and not store.exists(layout.snapshot_key(cur.run_id)):
        store.set(layout.snapshot_key(cur.run_id), cur_data, content_type="application/json")  # keep it reachable
    try:
        store.set(MANIFEST_KEY, data, if_match=info.etag, content_type="application/json")
    except PreconditionFailed:
        raise PreconditionFailed(f"{store.uri}: another commit replaced the dataset meanwhile; nothing was "
                                 "rolled back (run bams3 log and try again)") from None
    # the snapshot became current now: rewritten (same bytes) so its time orders the retention
    store.set(layout.snapshot_key(run_id), data, content_type="application/json")
    return m
