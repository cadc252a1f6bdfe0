"""The keys a bams3 writer creates under a dataset prefix, and which runs' keys may be removed.

Pure (no I/O): :func:`classify` names the writer object behind a key (or None for a key no
bams3 writer creates), and :func:`plan_removal` decides, from listings and a clock, which
objects and unfinished uploads belong to *dead* runs (docs/FORMAT.md §2.1, §2.4). A tool may
delete only what these functions attribute to a dead run: keys outside this exact layout are
never touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

RUN_ID = r"[0-9a-f]{16}"
LEASES = "runs/"
SNAPSHOTS = "snapshots/"
LOCK_KEY = ".manifest.json.lock"  # local store: the lock of the manifest's compare-and-swap

#: a run's lease is refreshed every LEASE_TTL / HEARTBEATS_PER_TTL seconds
LEASE_TTL = 600.0
HEARTBEATS_PER_TTL = 20
#: a run without a lease (a writer from before leases, or one killed before writing it) is
#: dead once every object it left is older than this
STALE_SECONDS = 3600.0

_RUN_ID_RE = re.compile(rf"^{RUN_ID}$")
_OBJECT_RES = [re.compile(p) for p in (
    rf"^data/({RUN_ID})/header\.sam$",
    rf"^data/({RUN_ID})/index/(?:0|[1-9][0-9]*|unplaced)\.b3i$",
    rf"^data/({RUN_ID})/chunks/[0-9]{{6,}}\.b3c$",
    rf"^_tmp/({RUN_ID})/run-[0-9]{{6,}}$",
    rf"^_tmp/({RUN_ID})/chunk-[0-9]{{6,}}\.json$",  # the resume ledger (bams3.stages)
    rf"^_tmp/({RUN_ID})/resume\.json$",
)]
_LEASE_RE = re.compile(rf"^runs/({RUN_ID})\.json$")
_SNAPSHOT_RE = re.compile(rf"^snapshots/({RUN_ID})\.json$")
# local store: a write in progress is a temporary file next to its target (mkstemp's names)
_TEMP_RE = re.compile(rf"^(?:data/({RUN_ID})/(?:index/|chunks/)?|_tmp/({RUN_ID})/|runs/|snapshots/|)"
                      r"\.tmp-[a-z0-9_]{8}$")
_MANIFEST_RUN_RE = re.compile(rf"data/({RUN_ID})/")


def is_run_id(text: str) -> bool:
    return bool(_RUN_ID_RE.match(text))


def lease_key(run_id: str) -> str:
    return f"{LEASES}{run_id}.json"


def snapshot_key(run_id: str) -> str:
    """The key of the snapshot manifest of the commit ``run_id`` (§2.6)."""
    return f"{SNAPSHOTS}{run_id}.json"


def snapshot_run(key: str) -> str | None:
    """The run a snapshot manifest key names, or None."""
    m = _SNAPSHOT_RE.match(key)
    return m.group(1) if m else None


@dataclass(frozen=True)
class KeyKind:
    kind: str  # "manifest" | "lock" | "object" | "lease" | "snapshot" | "temp"
    run_id: str | None  # None: manifest, lock, and temporary files of the manifest, a lease or a snapshot


def classify(key: str) -> KeyKind | None:
    """What a bams3 writer wrote at ``key`` (relative to the dataset prefix), or None."""
    if key == "manifest.json":
        return KeyKind("manifest", None)
    if key == LOCK_KEY:
        return KeyKind("lock", None)
    for rx in _OBJECT_RES:
        m = rx.match(key)
        if m:
            return KeyKind("object", m.group(1))
    m = _LEASE_RE.match(key)
    if m:
        return KeyKind("lease", m.group(1))
    m = _SNAPSHOT_RE.match(key)
    if m:
        return KeyKind("snapshot", m.group(1))
    m = _TEMP_RE.match(key)
    if m:
        return KeyKind("temp", m.group(1) or m.group(2))
    return None


def upload_run(key: str) -> str | None:
    """The run an unfinished (multipart) upload of ``key`` belongs to; None if ``key`` is not
    a run's object, lease or spill run (then it is never aborted)."""
    c = classify(key)
    return c.run_id if c is not None and c.kind in ("object", "lease") else None


def manifest_runs(manifest: bytes | None) -> set[str]:
    """Every run id a manifest's text refers to (read as text, so a manifest this reader cannot
    parse still protects the runs it names)."""
    if not manifest:
        return set()
    return set(_MANIFEST_RUN_RE.findall(manifest.decode("utf-8", errors="replace")))


@dataclass(frozen=True)
class Listed:
    key: str
    time: float | None  # last modified (objects) or initiated (uploads), store clock
    upload_id: str | None = None  # None for an object (or a local temporary file)


@dataclass
class Removal:
    """What may be removed: objects (keys) and unfinished uploads, and the runs they belong to."""

    objects: list[str] = field(default_factory=list)
    uploads: list[Listed] = field(default_factory=list)
    dead_runs: list[str] = field(default_factory=list)
    live_runs: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.objects or self.uploads)


def plan_removal(objects: list[Listed], uploads: list[Listed], *, now: float, committed: set[str],
                 own: set[str] = frozenset(), lease_ttl: float = LEASE_TTL,
                 stale_seconds: float = STALE_SECONDS) -> Removal:
    """Decide what of ``objects`` (listed under ``runs/``, ``data/``, ``_tmp/``) and
    ``uploads`` (unfinished uploads, local temporary files) belongs to dead runs.

    ``committed``: runs the current manifest and every retained snapshot manifest refer to
    (read *after* listing); ``own``: runs of
    the caller. A run R of neither is dead if its lease ``runs/R.json`` is older than
    ``lease_ttl``, or it has no lease and everything it left is older than ``stale_seconds``.
    A committed run is never removed; only its spill runs and (stale or absent lease) its
    unfinished uploads are. Temporary files of no run go once older than ``stale_seconds``.
    """
    by_run: dict[str, list[Listed]] = {}
    leases: dict[str, float | None] = {}
    orphans: list[Listed] = []
    for item in objects + uploads:
        c = classify(item.key)
        if c is None or c.kind in ("manifest", "lock", "snapshot"):
            continue  # not ours to remove (a snapshot goes only by its retention, §2.6)
        if c.run_id is None:
            orphans.append(item)
            continue
        by_run.setdefault(c.run_id, []).append(item)
        if c.kind == "lease" and item.upload_id is None:
            leases[c.run_id] = item.time
    out = Removal()

    def old(t: float | None, age: float) -> bool:
        return t is not None and now - t > age

    for run, items in sorted(by_run.items()):
        if run in own:
            continue
        lease_dead = old(leases[run], lease_ttl) if run in leases else \
            all(old(i.time, stale_seconds) for i in items)
        if run in committed:
            if not lease_dead:
                continue
            # the dataset's own run: only its spill runs and unfinished uploads are leftovers
            items = [i for i in items if i.upload_id is not None or i.key.startswith("_tmp/")
                     or classify(i.key).kind in ("lease", "temp")]
        elif not lease_dead:
            out.live_runs.append(run)
            continue
        if not items:
            continue
        out.dead_runs.append(run)
        for i in items:
            if i.upload_id is None and classify(i.key).kind != "temp":
                out.objects.append(i.key)
            else:
                out.uploads.append(i)  # an unfinished upload, or a local temporary file
    for i in orphans:
        if old(i.time, stale_seconds):
            out.uploads.append(i)
    # a run's lease goes last: while any of its objects remain, it stays attributable
    out.objects.sort(key=lambda k: (k.startswith(LEASES), k))
    return out


@dataclass(frozen=True)
class Snapshot:
    run_id: str
    time: float | None  # when the snapshot manifest was last written (it became current then)


def retained(snapshots: list[Snapshot], *, current: str | None, previous: str | None = None,
             keep: int = 1, keep_days: float | None = None, now: float = 0.0) -> set[str]:
    """The runs whose snapshots a retention keeps (§2.6): the current one, the ``keep`` most
    recently current others (``previous``, the one just replaced, first; then by time, newest
    first), and (``keep_days``) every snapshot written less than that many days ago."""
    keep_set = {current} if current else set()
    others = [s for s in snapshots if s.run_id != current]
    others.sort(key=lambda s: (s.run_id != previous, -(s.time or 0.0), s.run_id))
    keep_set.update(s.run_id for s in others[:max(0, keep)])
    if keep_days is not None:
        keep_set.update(s.run_id for s in others if s.time is not None and now - s.time < keep_days * 86400)
    return keep_set
