"""Flow ``convert-to-s3``: BAM/SAM/CRAM -> a bams3 dataset on S3 (or a local directory).

The stages, as tasks passing plain values (the driver is :func:`bams3.convert.run_conversion`,
the code ``bams3 convert`` runs)::

    plan ─▶ shard × N (encode + upload; any task runner) ─▶ [verify_shard × N] ─▶ commit

(``verify_shard`` tasks only with ``verify_mode`` ``head`` or ``read``; the default, ``upload``,
relies on what each upload proved and adds no task run.)

``plan`` cuts a coordinate-sorted BAM with a .bai/.csi (local or next to an
``s3://`` object) into key ranges balanced by compressed
bytes (anything else is one stream shard); each ``shard`` task opens the input and the store
itself, so the shards run wherever the task runner puts them: the default thread pool (where
the task hands a key-range shard to one of ``threads`` worker processes of the flow run, as
``bams3 convert`` does: :mod:`bams3.shardpool`), a Dask cluster
(``convert_to_s3.with_options(task_runner=DaskTaskRunner(...))``), Ray. Nothing
is committed unless every chunk passed the check ``verify_mode`` chooses (by default what the
upload itself proved; ``read`` reads every chunk back). With ``resume`` (the default) a failed run
keeps its chunks and a rerun with the same source and options reuses them.

Run ad hoc (no server needed: Prefect starts a temporary one)::

    from flows import convert_to_s3
    convert_to_s3(source="sample.bam", destination="s3://bucket/sample")
"""

from __future__ import annotations

import os
import queue
import time
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from bams3.convert import ConvertOptions, ConvertResult, run_conversion
from bams3.dataset import DatasetWriter
from bams3.errors import DatasetError, InputError
from bams3 import shardpool, stages
from bams3.stages import Plan, may_be_sharded, store_spec
from bams3.store import parse_uri
from bams3core.planner import DEFAULT_BLOCK_BYTES, DEFAULT_CHUNK_BYTES
from tasks import pipeline as steps

from flows.common import artifact_key, aws_options, human_bytes, is_s3, md_table, open_target, parse_size

#: threads of the flow's default task runner: shard and verify tasks running at once
MAX_WORKERS = int(os.environ.get("BAMS3_PREFECT_MAX_WORKERS", str(max(2, os.cpu_count() or 2))))
#: seconds between progress artifact updates
PROGRESS_EVERY = float(os.environ.get("BAMS3_PROGRESS_SECONDS", "5"))


class Progress:
    """Keeps a progress artifact current while the shards run anywhere: the chunk bytes listed
    under the run's prefix against the input size (whole shards once they finish)."""

    def __init__(self, key: str, source: str):
        self.id = create_progress_artifact(progress=0.0, key=key, description=f"Converting {source}")
        self.pct = 0.0
        self.plan: Plan | None = None
        self.writer: DatasetWriter | None = None

    def start(self, plan: Plan, writer: DatasetWriter) -> None:
        self.plan, self.writer = plan, writer

    def poll(self, done: int) -> None:
        """Update from a listing of the run's chunks (``done`` shards finished)."""
        if self.plan is None or self.writer is None:
            return
        total = self.plan.input_bytes
        pct = 100.0 * done / max(1, len(self.plan.jobs))
        if total:
            try:
                written = sum(o.size for o in self.writer.store.list_prefix(f"{self.writer.prefix}chunks/"))
            except Exception:  # noqa: BLE001 - progress is cosmetic
                written = 0
            pct = max(pct, 100.0 * written / total)
        self.pct = max(self.pct, min(99.0, pct))
        update_progress_artifact(self.id, self.pct)
        get_run_logger().info("%d of %d shard(s) done (~%.0f%%)", done, len(self.plan.jobs), self.pct)

    def finish(self) -> None:
        update_progress_artifact(self.id, 100.0)


def _failed(future) -> bool:
    """Whether a finished shard's task failed, from its own final state. ``wait(timeout=)``
    returns futures whose final state is not yet set; their ``state`` is then read from the API,
    which may still say Running — taken for a failure, that once stopped the remaining shards
    from being submitted (and the count check refused the commit). ``wait()`` on a finished
    future sets the final state from the task's result."""
    future.wait()
    st = future.state
    return st.is_failed() or st.is_crashed() or st.is_cancelled()


def _ended(ended: "queue.SimpleQueue", timeout: float) -> list:
    """The futures that ended since the last call: waits up to ``timeout`` seconds for one."""
    out = []
    try:
        out.append(ended.get(timeout=timeout))
        while True:
            out.append(ended.get_nowait())
    except queue.Empty:
        return out


def prefect_stages(verify_mode: str, progress: Progress | None, spec: dict, processes: int = 1) -> dict:
    """``run_conversion`` keyword arguments that run the stages as Prefect tasks (``spec``:
    the destination store as plain values, for ``verify_shard``; ``processes`` > 1: the
    ``shard`` tasks hand key-range shards to that many worker processes of this flow run)."""

    def planner(source, **kw):
        return steps.plan(source, **kw)

    def runner(jobs, *, store, inp, opts):
        if inp is not None:
            raise InputError("a flow reads its source itself: pass a file path or an s3:// URI")
        pool = _process_pool(jobs, processes)
        if pool is None:
            limit = _shards_at_once(opts.threads)
        else:  # the shard tasks hand their jobs to this flow run's worker processes
            jobs, limit = shardpool.share(jobs, pool.processes), pool.processes
            shardpool.serve(jobs[0].run_id, pool)
        ok = False
        try:
            # the next shard starts as soon as one ends (prefect.futures.wait returns only when
            # all have ended, or at its timeout: a free slot once stayed idle for seconds)
            pending, futures, running, ended = list(jobs), [], [], queue.SimpleQueue()
            n_done = 0
            while True:
                while pending and len(running) < limit:
                    running.append(steps.shard.submit(pending.pop(0)))
                    running[-1].add_done_callback(ended.put)
                    futures.append(running[-1])
                done = _ended(ended, PROGRESS_EVERY)
                n_done += len(done)
                running = [f for f in running if not any(f is d for d in done)]
                if progress is not None:
                    progress.poll(n_done)
                if any(_failed(f) for f in done):
                    pending = []  # a failed shard fails the run: start no more
                if not running and not pending:
                    break
            wait(futures)
            results = [f.result() for f in futures]  # raises the first failure (every shard has ended)
            ok = True
        finally:
            if pool is not None:
                shardpool.unserve(jobs[0].run_id)
                pool.close(stop=not ok)
        if len(results) != len(jobs):  # never commit without every shard
            raise DatasetError(f"internal error: {len(jobs) - len(results)} shard(s) were not run")
        return results

    def verify(store, results):
        if verify_mode == "upload":
            # What the uploads proved: each PUT/part carried its CRC32 and S3 stored exactly
            # those bytes (a local store: the file's size after the write). Chunks reused from
            # a killed run were not uploaded by this run: their size and ETag are checked
            # against the ledger (one HEAD each, here). No task runs, no read-back.
            reused = [c for r in results for c in r.chunks[:r.reused_chunks]]
            stages.verify_chunks(store, reused, "head")
            get_run_logger().info("%d chunk(s) checked at upload, %d reused chunk(s) by HEAD",
                                  sum(len(r.chunks) for r in results) - len(reused), len(reused))
            return
        # plain values (no ``quote``: a Dask task runner would receive the annotation as a tuple)
        futures = [steps.verify_shard.submit(spec, r, mode=verify_mode) for r in results if r.chunks]
        wait(futures)
        n = sum(f.result() for f in futures)  # DatasetError on a corrupt upload: no commit
        get_run_logger().info("verified %d uploaded chunk(s) (%s)", n, verify_mode)

    def commit(writer, results):
        return steps.commit(quote(writer), quote(results))  # in this process: it holds the lease

    return {"planner": planner, "runner": runner, "verify": verify, "commit": commit}


@flow(name="convert-to-s3", task_runner=ThreadPoolTaskRunner(max_workers=MAX_WORKERS))
def convert_to_s3(
    source: str,
    destination: str,
    chunk_size: int | str = DEFAULT_CHUNK_BYTES,
    block_size: int | str = DEFAULT_BLOCK_BYTES,
    part_size: int | str | None = None,
    concurrency: int | None = None,
    storage_class: str | None = None,
    sse: Literal["AES256", "aws:kms"] | None = None,
    sse_kms_key_id: str | None = None,
    overwrite: bool = False,
    max_memory: int | str = "768M",
    threads: int = 2,
    reference: str | None = None,
    region: str | None = None,
    aws_credentials_block: str | None = None,
    verify_mode: Literal["upload", "head", "read"] = "upload",
    shards: int | None = None,
    resume: bool = True,
) -> dict:
    """Convert ``source`` (a local BAM/SAM/CRAM path, or ``s3://bucket/key.bam``: an indexed
    one is sharded and read with ranged GETs, anything else streamed) into a bams3 dataset at ``destination`` (``s3://bucket/prefix`` or a local directory).

    Sizes accept bytes or strings like ``"16M"``. ``concurrency``: parallel S3 requests and
    chunk uploads (default 2 x ``threads``). ``aws_credentials_block``: name of a prefect-aws
    ``AwsCredentials`` block (default: boto3's standard credential chain).
    ``verify_mode``: how the chunks are checked before the commit: ``upload`` (what each
    upload proved: S3 verified its CRC32; chunks reused from a killed run by HEAD), ``head``
    (a HEAD per chunk: size and ETag) or ``read`` (every chunk read back: size and SHA-256). ``threads``: on
    the default thread pool, the worker processes (one thread each) the shards of an indexed BAM run
    on, else each shard's threads. ``shards``: key ranges of an indexed,
    coordinate-sorted BAM (default: one per 64 MB, at least two per worker process or Dask worker; 1: one
    stream). ``resume``: take over a failed or killed run of the same conversion (same source
    size and mtime, or size and ETag on S3; same options), reusing its chunks; a failure keeps this run's chunks.
    """
    log = get_run_logger()
    if source == "-":
        raise InputError("source '-' (standard input) cannot be used by a flow: pass a file path or an s3:// URI")
    if not is_s3(destination) and os.path.isfile(destination):
        raise InputError(f"{destination}: exists and is a file; destination must be a directory or s3://bucket/prefix")
    opts = ConvertOptions(reference=reference, threads=threads, max_memory=parse_size(max_memory, "max_memory"),
                          block_bytes=parse_size(block_size, "block_size"),
                          chunk_bytes=parse_size(chunk_size, "chunk_size"), overwrite=overwrite,
                          upload_concurrency=concurrency, shards=shards, resume=resume)
    aws = aws_options(aws_credentials_block, region)
    if aws_credentials_block:
        log.info("S3 credentials from the AwsCredentials block %r", aws_credentials_block)
    store_opts = dict(part_size=parse_size(part_size, "part_size"), concurrency=concurrency or 2 * max(1, threads),
                      storage_class=storage_class, sse=sse, sse_kms_key_id=sse_kms_key_id)
    # what the shard tasks open on their workers: plain values, the credentials block by name
    spec = store_spec(destination, region=region, aws_credentials_block=aws_credentials_block, **store_opts)
    source_store = None
    if is_s3(source):
        _scheme, bucket, obj = parse_uri(source)
        if not obj:
            raise InputError(f"{source}: expected s3://bucket/path/to/file.bam")
        source_store = store_spec(f"s3://{bucket}", region=region, aws_credentials_block=aws_credentials_block)
    processes = _processes(threads, spec, source_store)
    if processes > 1 and shards != 1 and may_be_sharded(source):
        shardpool.prestart()  # the workers' forkserver loads what they need while the plan runs
    key = artifact_key("convert", destination)
    t0 = time.time()
    input_bytes = _input_bytes(source, aws)
    with open_target(destination, aws, **store_opts) as store:
        log.info("converting %s -> %s", source, store.uri)
        progress = Progress(key + "-progress", source)
        stages = prefect_stages(verify_mode, progress, spec, processes)
        res = run_conversion(source, store, opts, spec=spec, source_store=source_store, on_plan=progress.start,
                             workers=_runner_workers(processes), **stages)
        progress.finish()
    return _publish(res, source, destination, input_bytes, time.time() - t0, key)


def _input_bytes(source: str, aws: dict) -> int | None:
    if is_s3(source):
        _scheme, bucket, obj = parse_uri(source)
        with open_target(f"s3://{bucket}", aws) as src:
            return src.head(obj).size  # NotFound: a clear error before anything is written
    try:
        return os.path.getsize(source)
    except OSError:
        return None  # the plan reports the problem


def _shards_at_once(threads: int) -> int:
    """Shards the flow runs at once: on its own thread pool, as many as the cores hold at
    ``threads`` each (more only oversubscribes them: each shard already runs ``threads`` encode
    threads plus BGZF inflation); on a Dask or Ray cluster, all of them (the cluster schedules)."""
    try:
        from prefect.context import FlowRunContext

        runner = FlowRunContext.get().task_runner
        if not isinstance(runner, ThreadPoolTaskRunner):
            return 1 << 30
    except Exception:  # noqa: BLE001 - no context: the thread pool's rule
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores // max(1, threads)))


def _on_thread_pool() -> bool:
    """Whether this flow run's task runner is its own thread pool (not Dask, Ray...)."""
    try:
        from prefect.context import FlowRunContext

        return isinstance(FlowRunContext.get().task_runner, ThreadPoolTaskRunner)
    except Exception:  # noqa: BLE001 - no context: run the tasks as they come
        return False


def _processes(threads: int, spec: dict, source_store: dict | None) -> int:
    """Worker processes for the shards on the flow's own thread pool: ``threads`` (each with
    one thread), as ``bams3 convert`` does. 1 (shards in the task threads) on another task
    runner, when the stores name an ``AwsCredentials`` block (a worker process could not
    load it: it has no Prefect context), or when the workers would re-run the calling script
    (:func:`bams3.shardpool.main_reimport_safe`)."""
    if not _on_thread_pool():
        return 1
    if any((s or {}).get("options", {}).get("aws_credentials_block") for s in (spec, source_store)):
        return 1
    if threads > 1 and not shardpool.main_reimport_safe():
        get_run_logger().info("the shards run on this process's threads: worker processes would import this "
                              "script again (call the flow under `if __name__ == \"__main__\":` to use them)")
        return 1
    return max(1, threads)


def _process_pool(jobs: list, processes: int):
    """A ShardPool of up to ``processes`` workers if ``jobs`` are worth it, else None."""
    n = min(processes, len(jobs))
    return shardpool.ShardPool(n) if shardpool.worth_it(jobs, n) else None


def _runner_workers(processes: int) -> int | None:
    """Workers the shards run on at once: a Dask cluster's workers, else the flow's worker
    processes (the plan makes at least two shards per worker); None: shards by input size."""
    try:
        from prefect.context import FlowRunContext

        runner = FlowRunContext.get().task_runner
        client = getattr(runner, "_client", None)
        if client is not None:
            return max(1, len(client.scheduler_info().get("workers", {})))
    except Exception:  # noqa: BLE001 - a hint only
        pass
    return processes if processes > 1 else None


def _publish(res: ConvertResult, source: str, destination: str, input_bytes: int | None, seconds: float,
             key: str) -> dict:
    m = res.manifest
    size = sum(c.size for c in m.chunks) + sum(i.size for i in m.index) + m.header.size
    summary = {
        "source": source, "destination": destination, "run_id": m.run_id, "records": res.records,
        "chunks": len(m.chunks), "blocks": sum(i.n_blocks for i in m.index), "bytes": size,
        "input_bytes": input_bytes, "ratio": (size / input_bytes) if input_bytes else None,
        "seconds": round(seconds, 3), "records_per_s": round(res.records / max(seconds, 1e-9), 1),
        "spill_runs": res.spill_runs, "sorted_by": m.sorted_by, "shards": res.shards,
        "reused_chunks": res.reused_chunks, "encoded_records": res.encoded_records,
    }
    rows = [["Source", f"`{source}`"], ["Dataset", f"`{destination}`"], ["Records", f"{res.records:,}"],
            ["Chunks", len(m.chunks)], ["Blocks", summary["blocks"]],
            ["Bytes", f"{size:,} ({human_bytes(size)})"],
            ["Input bytes", f"{input_bytes:,} ({human_bytes(input_bytes)})" if input_bytes else "n/a"],
            ["Size / input", f"{summary['ratio']:.3f}" if summary["ratio"] else "n/a"],
            ["Seconds", f"{seconds:.1f}"], ["Records/s", f"{summary['records_per_s']:,.0f}"],
            ["Sorted by", m.sorted_by], ["Spill runs", res.spill_runs], ["Shards", res.shards],
            ["Chunks reused (resume)", res.reused_chunks], ["Run id", f"`{m.run_id}`"]]
    create_markdown_artifact(markdown="# bams3 convert-to-s3\n\n" + md_table(["", ""], rows) + "\n", key=key,
                             description=f"bams3 dataset {destination}")
    get_run_logger().info("wrote %d records to %s in %.1f s (%d chunks, %s)", res.records, destination, seconds,
                          len(m.chunks), human_bytes(size))
    return summary
