"""The conversion's stages as Prefect tasks: ``plan``, ``shard``, ``verify_shard``, ``commit``
(plus ``verify``, used by the ``verify-dataset`` flow).

Each task is a thin wrapper over the one implementation in :mod:`bams3.stages` /
:mod:`bams3.dataset` / :mod:`bams3.verify`; the ``convert-to-s3`` flow hands them to
:func:`bams3.convert.run_conversion`, the driver ``bams3 convert`` runs too.

* ``shard`` and ``verify_shard`` take and return plain values (a :class:`bams3.stages.ShardJob`
  with the store as a spec, a :class:`bams3.stages.ShardResult`): any task runner runs them —
  threads, a Dask cluster, Ray. Each opens its own store (S3 credentials from the
  ``AwsCredentials`` block the spec names, else the worker's environment).
* ``plan`` and ``commit`` run in the flow's process (called, not submitted): ``commit`` holds
  the run's lease and writes the manifest.
* Results are large (index rows) and only needed by the flow run: ``cache_policy=NONE`` and
  ``persist_result=False``. Resuming is the ledger's job (:mod:`bams3.stages`), so a retried
  ``shard`` reuses the chunks its failed attempt uploaded.
* Tags let Prefect concurrency limits cap the work across flow runs and workers:
  ``bams3-encode`` (CPU: a shard encodes), ``bams3-s3-upload`` (a shard uploads),
  ``bams3-s3-read`` (verification reads). See docs/PREFECT.md.
* I/O tasks retry transient failures only (:mod:`tasks.retry`).
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from bams3 import shardpool, stages
from bams3.dataset import Dataset, DatasetWriter
from bams3.errors import DatasetError, NotFound, PreconditionFailed
from bams3.store import Store, open_store
from bams3.verify import verify_dataset
from bams3core.index import MANIFEST_KEY, IndexError_, Manifest, ObjectRef

from .retry import retry_options

TAG_ENCODE = "bams3-encode"
TAG_UPLOAD = "bams3-s3-upload"
TAG_READ = "bams3-s3-read"

_NO_CACHE = dict(cache_policy=NONE, persist_result=False)


def open_spec(spec: dict) -> Store:
    """A store from a spec (:func:`bams3.stages.store_spec`); ``aws_credentials_block`` in its
    options names a prefect-aws ``AwsCredentials`` block, loaded here (on the worker)."""
    opts = dict(spec.get("options", {}))
    block = opts.pop("aws_credentials_block", None)
    if block:
        from flows.common import aws_options

        opts = {**aws_options(block, opts.pop("region", None)), **opts}
    return open_store(spec["uri"], **{k: v for k, v in opts.items() if v is not None})


def _unquote(value):
    return value.unquote() if hasattr(value, "unquote") else value


def _shard_run_name(parameters: dict) -> str:
    try:
        return f"shard-{_unquote(parameters['job']).number:04d}"
    except Exception:  # noqa: BLE001 - a name is cosmetic
        return "shard"


def _verify_shard_run_name(parameters: dict) -> str:
    try:
        return f"verify-shard-{_unquote(parameters['result']).number:04d}"
    except Exception:  # noqa: BLE001
        return "verify-shard"


def _verify_run_name(parameters: dict) -> str:
    try:
        ref = _unquote(parameters.get("ref"))
        if ref is not None:
            return f"verify-{ref.key.rsplit('/', 1)[-1]}"
        return f"verify-{_unquote(parameters['store']).uri}"
    except Exception:  # noqa: BLE001
        return "verify"


# ---------------------------------------------------------------------------------------------
@task(name="plan", **retry_options(), **_NO_CACHE)
def plan(source: str, job: dict, store: dict, run_id: str, shards: int | None = None, workers: int | None = None,
         shard_bytes: int = stages.DEFAULT_SHARD_BYTES) -> stages.Plan:
    """The shards of converting ``source`` (:func:`bams3.stages.plan`)."""
    p = stages.plan(source, job=job, store=store, run_id=run_id, shards=shards, workers=workers,
                    shard_bytes=shard_bytes, opener=open_spec)
    get_run_logger().info("plan: %d shard(s) of %s (%s)", len(p.jobs), source,
                          "key ranges of the indexed BAM" if p.sharded else "one stream")
    return p


@task(name="shard", tags=[TAG_ENCODE, TAG_UPLOAD], task_run_name=_shard_run_name, **retry_options(), **_NO_CACHE)
def shard(job: stages.ShardJob) -> stages.ShardResult:
    """Encode and upload one shard (:func:`bams3.stages.run_shard`): on a worker process of the
    flow run if it has some here (:mod:`bams3.shardpool`; the flow's own thread pool), else
    right here (a Dask or Ray worker). A retry after a transient error reuses the chunks the
    failed attempt uploaded (the ledger) and encodes the rest."""
    pool = shardpool.serving(job.run_id)
    if pool is not None:
        res, where = pool.result(pool.submit(job), f"shard {job.number}"), "a worker process"
    else:
        res, where = stages.run_shard(job, opener=open_spec), "the task's thread"
    get_run_logger().info("shard %d: %d records in %d chunks (%d reused) in %.1f s on %s", job.number,
                          res.n_records, len(res.chunks), res.reused_chunks, res.seconds, where)
    return res


@task(name="verify_shard", tags=[TAG_READ], task_run_name=_verify_shard_run_name, **retry_options(), **_NO_CACHE)
def verify_shard(store: dict, result: stages.ShardResult, mode: str = "read") -> int:
    """Read back every chunk a shard uploaded (``read``: size and SHA-256; ``head``: size and
    ETag). A mismatch raises DatasetError (never retried): nothing is committed."""
    with open_spec(store) as st:
        return stages.verify_chunks(st, result.chunks, mode)


@task(name="verify", tags=[TAG_READ], task_run_name=_verify_run_name, **retry_options(), **_NO_CACHE)
def verify(store: Store, ref: ObjectRef | None = None, *, chunks: list[int] | None = None,
           decode: bool = True, mode: str = "read") -> dict:
    """Re-read and check what was written.

    * ``ref`` given: one chunk object (:func:`bams3.stages.verify_chunks`).
    * ``ref`` None: the whole dataset on ``store`` (or only ``chunks``, a sample) with
      :func:`bams3.verify.verify_dataset`; returns the report (``ok`` False if corrupt).
    """
    if ref is not None:
        stages.verify_chunks(store, [ref], mode)
        return {"key": ref.key, "size": ref.size, "sha256": ref.sha256, "mode": mode, "ok": True}
    return _verify_dataset(store, chunks, decode)


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


@task(name="commit", **retry_options(), **_NO_CACHE)
def commit(writer: DatasetWriter, results: list) -> Manifest:
    """Write the index objects, the header and — last — the manifest (the commit), from the
    shards' results (:meth:`bams3.dataset.DatasetWriter.commit_shards`).

    Safe to retry: if an earlier attempt already wrote this run's manifest (and then failed,
    e.g. while removing the previous run), the conditional write's PreconditionFailed is
    recognised and the committed manifest returned.
    """
    try:
        manifest = writer.commit_shards(results)
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
