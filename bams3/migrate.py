"""``bams3 migrate`` and the ``migrate`` flow: every BAM/SAM/CRAM under some roots -> datasets.

One implementation for the CLI and the flow:

* :func:`discover` lists the work: each input file under the roots (local directories, walked
  recursively; ``s3://bucket/prefix``; a single file; ``@LIST`` files naming more roots) with
  its *source identity* (URI, size, and mtime or ETag) and its destination
  ``DEST_PREFIX/<name relative to its root>.bams3``.
* :func:`decide` compares that identity with the one the destination's manifest records
  (``extra.source``, FORMAT.md §3.1): the same -> skip; another size/mtime/ETag of the same
  source -> convert again (overwrite); no dataset -> convert.
* :func:`migrate_one` converts one file with :func:`bams3.convert.run_conversion` (the flow
  passes its Prefect stages, as ``convert-to-s3`` does), then optionally compares
  the dataset record for record with the source and deletes the source. It never raises for a
  bad input: the outcome says ``failed`` with a one-line reason, and the next file goes on.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator

from bams3core.index import MANIFEST_KEY, IndexError_, Manifest

from .convert import ConvertOptions, run_conversion
from .errors import Bams3Error, InputError, NotFound
from .stages import store_spec
from .store import Store, open_store, parse_uri

#: names of the inputs migrate picks up (case-insensitive)
EXTENSIONS = (".bam", ".sam", ".sam.gz", ".cram")
DATASET_SUFFIX = ".bams3"


def is_input_name(name: str) -> bool:
    low = name.lower()
    return any(low.endswith(e) for e in EXTENSIONS)


@dataclass
class Item:
    """One input file and where its dataset goes (plain values: picklable, JSON-able)."""

    source: str          # local path (absolute) or s3://bucket/key
    rel: str             # name relative to the root it was found under
    dest: str            # DEST_PREFIX/<rel>.bams3
    size: int
    mtime_ns: int | None = None  # local files
    etag: str | None = None      # S3 objects

    def identity(self) -> dict:
        """What the manifest records in ``extra.source`` (integers only: §3.5 forbids floats)."""
        ident = {"uri": self.source, "size": self.size}
        if self.etag is not None:
            ident["etag"] = self.etag
        else:
            ident["mtime_ns"] = self.mtime_ns
        return ident


@dataclass
class Outcome:
    item: Item
    status: str          # converted | skipped | failed | (dry run) convert | reconvert | skip
    reason: str = ""     # failed: one line; otherwise a note
    records: int = 0
    dataset_bytes: int = 0
    seconds: float = 0.0
    deleted: bool = False
    estimate: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["item"] = asdict(self.item)
        return d


def _join(prefix: str, rel: str) -> str:
    if prefix.startswith("s3://"):
        return prefix.rstrip("/") + "/" + rel
    return os.path.join(prefix, *rel.split("/"))


def _read_list(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except OSError as e:
        raise InputError(f"{path}: cannot read the list file ({e.strerror or e})") from None
    return [ln for ln in lines if ln and not ln.startswith("#")]


def discover(sources: list[str], dest_prefix: str, **s3_options) -> list[Item]:
    """The input files under ``sources`` (see the module doc), sorted per root. A root that
    does not exist is an :class:`InputError` (nothing is done); two inputs with the same
    destination are an error too."""
    roots: list[str] = []
    for s in sources:
        if s.startswith("@"):
            roots.extend(_read_list(s[1:]))
        else:
            roots.append(s)
    if not roots:
        raise InputError("no sources given")
    items: list[Item] = []
    for root in roots:
        items.extend(_discover_s3(root, s3_options) if root.startswith("s3://") else _discover_local(root))
    for it in items:
        it.dest = _join(dest_prefix, it.rel + DATASET_SUFFIX)
    seen: dict[str, str] = {}
    for it in items:
        if it.dest in seen:
            raise InputError(f"{it.source} and {seen[it.dest]} would both become {it.dest}: migrate them separately")
        seen[it.dest] = it.source
    return items


def _discover_local(root: str) -> list[Item]:
    def item(path: str, rel: str) -> Item:
        st = os.stat(path)
        return Item(source=os.path.abspath(path), rel=rel, dest="", size=st.st_size, mtime_ns=st.st_mtime_ns)

    if os.path.isfile(root):
        return [item(root, os.path.basename(root))]
    if not os.path.isdir(root):
        raise InputError(f"{root}: no such file or directory")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.endswith(DATASET_SUFFIX))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if is_input_name(name) and os.path.isfile(path):
                out.append(item(path, os.path.relpath(path, root).replace(os.sep, "/")))
    return out


def _discover_s3(root: str, s3_options: dict) -> list[Item]:
    _scheme, bucket, prefix = parse_uri(root)
    with open_store(f"s3://{bucket}", **s3_options) as st:
        if prefix and is_input_name(prefix):
            try:
                info = st.head(prefix)
                return [Item(source=f"s3://{bucket}/{prefix}", rel=prefix.rsplit("/", 1)[-1], dest="",
                             size=info.size, etag=info.etag)]
            except NotFound:
                pass  # a prefix that merely looks like a file name
        base = prefix + "/" if prefix else ""
        out = [Item(source=f"s3://{bucket}/{o.key}", rel=o.key[len(base):], dest="", size=o.size, etag=o.etag)
               for o in st.list_prefix(base) if is_input_name(o.key) and ".bams3/" not in o.key]
    return sorted(out, key=lambda i: i.rel)


# ---------------------------------------------------------------------------------------------
def recorded_identity(store: Store) -> tuple[bool, dict | None]:
    """(a dataset exists at ``store``, the source identity its manifest records or None)."""
    try:
        m = Manifest.from_json(store.get(MANIFEST_KEY))
    except NotFound:
        return False, None
    except IndexError_:
        return True, None
    ident = m.extra.get("source") if isinstance(m.extra, dict) else None
    return True, ident if isinstance(ident, dict) else None


def decide(item: Item, store: Store) -> tuple[str, str]:
    """("convert" | "reconvert" | "skip" | "refuse", note)."""
    exists, ident = recorded_identity(store)
    if not exists:
        return "convert", ""
    if ident == item.identity():
        return "skip", "already converted (same size and " + ("ETag" if item.etag else "mtime") + ")"
    if ident is None or ident.get("uri") != item.source:
        was = "no source identity" if ident is None else f"source {ident.get('uri')}"
        return "refuse", f"{item.dest} holds a dataset not migrated from this file ({was}); remove it first"
    return "reconvert", "source changed since its conversion"


# ---------------------------------------------------------------------------------------------
def convert_item(item: Item, store: Store, opts: ConvertOptions, *, s3_options: dict | None = None, **kw):
    """Convert one input (local file, or an S3 object streamed by its shard) with its identity
    in the manifest. ``kw``: :func:`bams3.convert.run_conversion` arguments (the flow's stages)."""
    if item.source.startswith("s3://"):
        _scheme, bucket, _key = parse_uri(item.source)
        kw.setdefault("source_store", store_spec(f"s3://{bucket}", **(s3_options or {})))
    return run_conversion(item.source, store, opts, **kw)


def migrate_one(item: Item, base: ConvertOptions, *, store_options: dict | None = None,
                s3_options: dict | None = None, delete_source: bool = False, reference: str | None = None,
                stages: dict | None = None) -> Outcome:
    """Skip, convert (or convert again), verify and delete one input. Never raises an
    ``Exception``: any becomes a ``failed`` outcome with one line (KeyboardInterrupt stops).
    ``stages``: :func:`bams3.convert.run_conversion` arguments (the flow's tasks)."""
    t0 = time.time()
    try:
        with open_store(item.dest, **(store_options or {})) as store:
            action, note = decide(item, store)
            if action == "refuse":
                return Outcome(item, "failed", note, seconds=time.time() - t0)
            if action == "skip":
                out = Outcome(item, "skipped", note)
            else:
                opts = replace(base, overwrite=action == "reconvert", extra={"source": item.identity()},
                               progress=None)
                res = convert_item(item, store, opts, s3_options=s3_options, **(stages or {}))
                m = res.manifest
                out = Outcome(item, "converted", note, records=res.records,
                              dataset_bytes=sum(c.size for c in m.chunks) + sum(i.size for i in m.index)
                              + m.header.size)
            if delete_source:
                compare_with_source(item, store, reference=reference, s3_options=s3_options)
                delete_one(item, s3_options)
                out.deleted = True
    except (Bams3Error, OSError, ValueError) as e:
        return Outcome(item, "failed", _one_line(e), seconds=time.time() - t0)
    except Exception as e:  # noqa: BLE001 - a bug met on one file must not stop the others
        return Outcome(item, "failed", f"internal error: {type(e).__name__}: {_one_line(e)}",
                       seconds=time.time() - t0)
    out.seconds = time.time() - t0
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


# ---------------------------------------------------------------------------------------------
# record-for-record comparison (before --delete-source)
# ---------------------------------------------------------------------------------------------
def _dataset_lines(store: Store) -> tuple[Iterator[bytes], str]:
    from .dataset import Dataset
    from .export import write_sam_any

    ds = Dataset.open(store, refresh=True)

    def lines() -> Iterator[bytes]:
        for batch in ds.query(None):
            buf = io.BytesIO()
            write_sam_any(ds.header, [batch], buf, wide=ds.wide, with_header=False)
            yield from buf.getvalue().splitlines()

    return lines(), ds.manifest.sorted_by


def _source_lines(path: str, reference: str | None) -> Iterator[bytes]:
    import pysam

    kw = {"reference_filename": reference} if reference else {}
    with pysam.AlignmentFile(path, "r", check_sq=False, **kw) as f:
        for rec in f.fetch(until_eof=True):
            yield rec.to_string().encode("utf-8", errors="surrogateescape")


class _MultisetDigest:
    """An order-independent digest of lines: count and sum of SHA-256 values (mod 2^256)."""

    def __init__(self):
        self.n = 0
        self.total = 0

    def add(self, line: bytes) -> None:
        self.n += 1
        self.total = (self.total + int.from_bytes(hashlib.sha256(line).digest(), "big")) & ((1 << 256) - 1)


def compare_with_source(item: Item, store: Store, *, reference: str | None = None,
                        s3_options: dict | None = None) -> int:
    """Decode the dataset and the source (with pysam/htslib, independent of bams3's reader)
    and compare their records as SAM text, streaming both. In order when the dataset keeps the
    input order; as multisets (count + sum of SHA-256 per record) when bams3 sorted it. An S3
    source is first copied to a temporary file (pysam reads files). Returns the record count;
    a difference raises :class:`InputError`."""
    tmpdir = None
    path = item.source
    try:
        if item.source.startswith("s3://"):
            _scheme, bucket, key = parse_uri(item.source)
            tmpdir = tempfile.mkdtemp(prefix="bams3-migrate-")
            path = os.path.join(tmpdir, key.rsplit("/", 1)[-1])
            with open_store(f"s3://{bucket}", **(s3_options or {})) as src, src.open_read(key) as r, \
                    open(path, "wb") as w:
                shutil.copyfileobj(r, w, 4 << 20)
        mine, sorted_by = _dataset_lines(store)
        theirs = _source_lines(path, reference)
        where = f"{item.dest} vs {item.source}"
        if sorted_by == "bams3":
            a, b = _MultisetDigest(), _MultisetDigest()
            for line in mine:
                a.add(line)
            for line in theirs:
                b.add(line)
            if (a.n, a.total) != (b.n, b.total):
                raise InputError(f"{where}: records differ ({a.n} in the dataset, {b.n} in the source); source kept")
            return a.n
        n = 0
        sentinel = object()
        while True:
            x, y = next(mine, sentinel), next(theirs, sentinel)
            if x is sentinel and y is sentinel:
                return n
            n += 1
            if x is sentinel or y is sentinel or x != y:
                raise InputError(f"{where}: record {n} differs; source kept")
    except (ValueError, OSError) as e:  # pysam cannot read the source
        raise InputError(f"{item.source}: cannot read it back to compare ({_one_line(e)}); source kept") from None
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


def delete_one(item: Item, s3_options: dict | None = None) -> None:
    """Delete exactly the input file/object ``item`` names (never an index or anything else),
    and only if it is still what was converted (same size and mtime/ETag)."""
    if item.source.startswith("s3://"):
        _scheme, bucket, key = parse_uri(item.source)
        with open_store(f"s3://{bucket}", **(s3_options or {})) as st:
            info = st.head(key)
            if info.size != item.size or (item.etag and info.etag != item.etag):
                raise InputError(f"{item.source}: changed during the migration; source kept")
            st.delete([key])
        return
    st = os.stat(item.source)
    if st.st_size != item.size or st.st_mtime_ns != item.mtime_ns:
        raise InputError(f"{item.source}: changed during the migration; source kept")
    os.remove(item.source)


# ---------------------------------------------------------------------------------------------
# plan (dry run), progress, summary
# ---------------------------------------------------------------------------------------------
def plan_one(item: Item, *, store_options: dict | None = None, s3_options: dict | None = None,
             chunk_bytes: int = 16 << 20) -> Outcome:
    """What migrating ``item`` would do, with :func:`bams3.pricing.source_estimate` and the
    monthly cost from :func:`bams3core.cost.estimate_costs`. Writes nothing."""
    from bams3core import cost

    from .pricing import source_estimate

    try:
        with open_store(item.dest, **(store_options or {})) as store:
            action, note = decide(item, store)
        if action == "refuse":
            return Outcome(item, "failed", note)
        est = source_estimate(item.source, chunk_bytes=chunk_bytes, **(s3_options or {}))
        costs = cost.estimate_costs(est)
        return Outcome(item, action, note, estimate={"dataset_bytes": est["dataset_bytes"],
                                                     "records": est["records"],
                                                     "monthly_usd": costs["monthly_usd"]})
    except (Bams3Error, OSError, ValueError) as e:
        return Outcome(item, "failed", _one_line(e))


class Progress:
    """Files and bytes done of the total, rate and ETA (bytes of input per second)."""

    def __init__(self, items: list[Item]):
        self.files_total = len(items)
        self.bytes_total = sum(i.size for i in items)
        self.files_done = 0
        self.bytes_done = 0
        self.bytes_converted = 0
        self.t0 = time.monotonic()

    def done(self, out: Outcome) -> None:
        self.files_done += 1
        self.bytes_done += out.item.size
        if out.status == "converted":
            self.bytes_converted += out.item.size

    @property
    def percent(self) -> float:
        if self.bytes_total:
            return 100.0 * self.bytes_done / self.bytes_total
        return 100.0 * self.files_done / max(1, self.files_total)

    def line(self) -> str:
        el = max(time.monotonic() - self.t0, 1e-9)
        rate = self.bytes_converted / el
        left = self.bytes_total - self.bytes_done
        eta = f"{left / rate:.0f} s" if rate > 0 and left else ("0 s" if not left else "?")
        return (f"{self.files_done}/{self.files_total} files, {self.bytes_done / 1e6:.1f}/"
                f"{self.bytes_total / 1e6:.1f} MB ({self.percent:.0f}%), {rate / 1e6:.1f} MB/s, ETA {eta}")


def summary_lines(outcomes: list[Outcome]) -> list[str]:
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("converted", "skipped", "failed")}
    deleted = sum(1 for o in outcomes if o.deleted)
    lines = [f"migrate: {counts['converted']} converted, {counts['skipped']} skipped, {counts['failed']} failed"
             + (f", {deleted} source(s) deleted" if deleted else "")]
    lines += ["failed: " + (o.reason if o.reason.startswith(o.item.source) else f"{o.item.source}: {o.reason}")
              for o in outcomes if o.status == "failed"]
    return lines


def run(items: list[Item], base: ConvertOptions, *, store_options: dict | None = None,
        s3_options: dict | None = None, delete_source: bool = False,
        on_done: Callable[[Outcome, Progress], None] | None = None) -> list[Outcome]:
    """The CLI's loop: every item in turn (each conversion uses ``base.threads`` threads)."""
    prog = Progress(items)
    outcomes = []
    for it in items:
        out = migrate_one(it, base, store_options=store_options, s3_options=s3_options,
                          delete_source=delete_source, reference=base.reference)
        prog.done(out)
        outcomes.append(out)
        if on_done:
            on_done(out, prog)
    return outcomes


def tty_progress(out: Outcome, prog: Progress) -> None:
    """A progress line on stderr, rewritten in place (only when stderr is a terminal)."""
    if sys.stderr.isatty():
        end = "\n" if prog.files_done == prog.files_total else ""
        print(f"\rbams3 migrate: {prog.line()}\033[K", end=end, file=sys.stderr, flush=True)
