"""The conversion pipeline's steps as Prefect tasks: ``chunk``, ``upload``, ``verify``, ``index``.

Each task is a thin wrapper over the one implementation in :mod:`bams3.convert` /
:mod:`bams3.dataset` / :mod:`bams3.verify`; the ``convert-to-s3`` flow plugs them into
:func:`bams3.convert.convert` through :class:`PrefectExecutor`.

* Inputs are large (a ~16 MB chunk payload, a few MB of record blocks) and live only in memory:
  every task uses ``cache_policy=NONE`` (no input hashing) and ``persist_result=False``, and
  the flow passes big arguments wrapped in :func:`prefect.utilities.annotations.quote` so
  Prefect does not walk them looking for futures.
* Tags let Prefect concurrency limits cap the work across flow runs and workers:
  ``bams3-encode`` (CPU: encoding blocks), ``bams3-s3-upload`` (S3 writes),
  ``bams3-s3-read`` (S3 reads by verification). See docs/PREFECT.md.
* I/O tasks retry transient failures only (:mod:`tasks.retry`); encoding is deterministic
  CPU work and is not retried.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from bams3.convert import encode_slice
from bams3.dataset import Dataset, DatasetWriter
from bams3.errors import DatasetError, NotFound, PreconditionFailed
from bams3.store import Store
from bams3.verify import verify_dataset
from bams3core.index import MANIFEST_KEY, IndexError_, Manifest, ObjectRef
from bams3core.planner import PlannedChunk

from .retry import retry_options

TAG_ENCODE = "bams3-encode"
TAG_UPLOAD = "bams3-s3-upload"
TAG_READ = "bams3-s3-read"

_NO_CACHE = dict(cache_policy=NONE, persist_result=False)


def _unquote(value):
    return value.unquote() if hasattr(value, "unquote") else value


def _upload_run_name(parameters: dict) -> str:
    try:
        return f"upload-{_unquote(parameters['planned']).number:06d}"
    except Exception:  # noqa: BLE001 - a name is cosmetic
        return "upload"


def _verify_run_name(parameters: dict) -> str:
    try:
        ref = _unquote(parameters.get("ref"))
        if ref is not None:
            return f"verify-{ref.key.rsplit('/', 1)[-1]}"
        return f"verify-{_unquote(parameters['store']).uri}"
    except Exception:  # noqa: BLE001
        return "verify"


# ---------------------------------------------------------------------------------------------
@task(name="chunk", tags=[TAG_ENCODE], retries=0, **_NO_CACHE)
def chunk(blocks: list) -> list[tuple]:
    """Encode a slice of planned blocks (``encode_slice``): [(EncodedBlock, fixed, flagstat)]."""
    return encode_slice(blocks)


@task(name="upload", tags=[TAG_UPLOAD], task_run_name=_upload_run_name, **retry_options(), **_NO_CACHE)
def upload(writer: DatasetWriter, planned: PlannedChunk) -> ObjectRef:
    """Upload one chunk object; idempotent (same key, same bytes), so a retry is safe."""
    ref = writer.upload_chunk(planned)
    get_run_logger().debug("uploaded %s (%d bytes, %d records)", ref.key, ref.size, ref.n_records)
    return ref


@task(name="verify", tags=[TAG_READ], task_run_name=_verify_run_name, **retry_options(), **_NO_CACHE)
def verify(store: Store, ref: ObjectRef | None = None, *, chunks: list[int] | None = None,
           decode: bool = True, mode: str = "read") -> dict:
    """Re-read and check what was written.

    * ``ref`` given: one uploaded chunk object. ``mode="read"`` reads it back and compares
      size and SHA-256 with the :class:`ObjectRef`; ``mode="head"`` compares size and ETag
      only (cheap; the upload's CRC32 was already checked by S3). A mismatch raises
      :class:`DatasetError` (never retried): the manifest must not be committed.
    * ``ref`` None: the whole dataset on ``store`` (or only ``chunks``, a sample) with
      :func:`bams3.verify.verify_dataset`; returns the report (``ok`` False if corrupt).
    """
    if ref is not None:
        return _verify_object(store, ref, mode)
    return _verify_dataset(store, chunks, decode)


def _verify_object(store: Store, ref: ObjectRef, mode: str) -> dict:
    where = f"{store.uri}/{ref.key}"
    try:
        if mode == "head":
            info = store.head(ref.key)
            size, digest = info.size, None
            if ref.etag and info.etag and info.etag != ref.etag:
                raise DatasetError(f"{where}: ETag {info.etag} != uploaded {ref.etag} (object replaced?)")
        elif mode == "read":
            data = store.get(ref.key)
            size, digest = len(data), hashlib.sha256(data).hexdigest()
        else:
            raise ValueError(f"unknown verify mode {mode!r}: use 'read' or 'head'")
    except NotFound:
        raise DatasetError(f"{where}: missing right after its upload") from None
    if size != ref.size:
        raise DatasetError(f"{where}: {size} bytes stored, {ref.size} uploaded (corrupt upload)")
    if digest is not None and digest != ref.sha256:
        raise DatasetError(f"{where}: SHA-256 of the stored object differs from the uploaded bytes (corrupt upload)")
    return {"key": ref.key, "size": size, "sha256": ref.sha256, "mode": mode, "ok": True}


def _verify_dataset(store: Store, chunks: list[int] | None, decode: bool) -> dict:
    try:
        ds = Dataset.open(store, refresh=True)
    except DatasetError as e:
        return {"uri": store.uri, "ok": False, "chunks_checked": 0, "blocks_checked": 0, "records_checked": 0,
                "bytes_read": 0, "problems": [str(e)], "chunks_total": 0, "records": 0, "sampled": chunks is not None}
    rep = verify_dataset(ds, chunks=chunks, decode=decode)
    out = asdict(rep)
    out.update(chunks_total=len(ds.manifest.chunks), records=ds.manifest.n_records, sampled=chunks is not None)
    log = get_run_logger()
    (log.info if rep.ok else log.error)(rep.summary())
    for p in rep.problems[:20]:
        log.error("%s: %s", store.uri, p)
    return out


@task(name="index", **retry_options(), **_NO_CACHE)
def index(writer: DatasetWriter) -> Manifest:
    """Write the remaining index objects, the header and — last — the manifest (the commit).

    Safe to retry: if an earlier attempt already wrote this run's manifest (and then failed,
    e.g. while removing the previous run), the conditional write's PreconditionFailed is
    recognised and the committed manifest returned.
    """
    try:
        manifest = writer.commit()
    except PreconditionFailed:
        manifest = _committed_by(writer)
        if manifest is None:
            raise
    get_run_logger().info("committed %s: %d records in %d chunks (run %s)", writer.store.uri,
                          manifest.n_records, len(manifest.chunks), manifest.run_id)
    return manifest


def _committed_by(writer: DatasetWriter) -> Manifest | None:
    try:
        manifest = Manifest.from_json(writer.store.get(MANIFEST_KEY))
    except (NotFound, IndexError_):
        return None
    return manifest if manifest.run_id == writer.run_id else None
