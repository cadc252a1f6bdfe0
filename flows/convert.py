"""Flow ``convert-to-s3``: BAM/SAM/CRAM -> a bams3 dataset on S3 (or a local directory).

The pipeline is :func:`bams3.convert.convert`, the same code ``bams3 convert`` runs; only
its pluggable steps change: encoding and uploads run as the Prefect tasks ``chunk`` and
``upload`` (:class:`PrefectExecutor`), and the commit first ``verify``-s every uploaded chunk
and then runs ``index``, which writes the manifest. Nothing is committed unless every chunk
read back intact; a failed run removes what it wrote.

Run ad hoc (no server needed: Prefect starts a temporary one)::

    from flows import convert_to_s3
    convert_to_s3(source="sample.bam", destination="s3://bucket/sample")
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from bams3.convert import ConvertOptions, ConvertResult, convert, convert_stream
from bams3.dataset import DatasetWriter
from bams3.errors import InputError
from bams3.inputs import open_input
from bams3.store import parse_uri
from bams3core.index import Manifest
from bams3core.planner import DEFAULT_BLOCK_BYTES, DEFAULT_CHUNK_BYTES, PlannedChunk
from tasks import pipeline as steps

from flows.common import (aws_options, artifact_key, human_bytes, is_s3, md_table, open_target, parse_size)

#: threads of the flow's task runner: encode + upload + verify tasks running at once
MAX_WORKERS = int(os.environ.get("BAMS3_PREFECT_MAX_WORKERS", "16"))
#: seconds between progress artifact updates
PROGRESS_EVERY = float(os.environ.get("BAMS3_PROGRESS_SECONDS", "5"))


class _StepFuture:
    """A Prefect future as the pipeline wants it: ``result()`` and ``cancel()``."""

    def __init__(self, future):
        self.future = future

    def result(self):
        return self.future.result()

    def cancel(self) -> bool:
        wrapped = getattr(self.future, "wrapped_future", None)
        return wrapped.cancel() if wrapped is not None else False

    def done(self) -> bool:
        wrapped = getattr(self.future, "wrapped_future", None)
        return wrapped.done() if wrapped is not None else True


class PrefectExecutor:
    """The pipeline's steps as Prefect tasks (see ``ThreadExecutor`` in bams3.convert).

    Big arguments are passed ``quote``-d so Prefect neither hashes nor walks them.
    """

    def __init__(self):
        self._inflight: list[_StepFuture] = []
        self.writer: DatasetWriter | None = None

    def _track(self, fut: _StepFuture) -> _StepFuture:
        if len(self._inflight) > 32:
            self._inflight = [f for f in self._inflight if not f.done()]
        self._inflight.append(fut)
        return fut

    def submit_encode(self, blocks):
        # not tracked: encoding has no side effects, and its (large) results must not be kept
        return _StepFuture(steps.chunk.submit(quote(blocks)))

    def submit_upload(self, writer: DatasetWriter, planned: PlannedChunk):
        self.writer = writer
        return self._track(_StepFuture(steps.upload.submit(quote(writer), quote(planned))))

    def shutdown(self, cancel: bool = False) -> None:
        """Wait for uploads still running (the flow's task runner owns the threads)."""
        for f in self._inflight:
            if cancel:
                f.cancel()
        for f in self._inflight:
            try:
                f.result()
            except BaseException:  # noqa: BLE001 - draining after a failure
                pass
        self._inflight = []


def make_commit(verify_mode: str, window: int):
    """``commit(writer)``: verify every uploaded chunk (``window`` at a time), then ``index``."""

    def commit(writer: DatasetWriter) -> Manifest:
        refs = [writer.chunks[n] for n in sorted(writer.chunks)]
        pending: deque = deque()
        for ref in refs:
            pending.append(steps.verify.submit(quote(writer.store), ref, mode=verify_mode))
            while len(pending) >= window:
                pending.popleft().result()  # raises DatasetError on a corrupt upload: no commit
        while pending:
            pending.popleft().result()
        get_run_logger().info("verified %d uploaded chunk(s) (%s)", len(refs), verify_mode)
        return steps.index.submit(quote(writer)).result()  # every chunk verified: commit

    return commit


class Progress:
    """Keeps a progress artifact current (estimated from records if the BAM is indexed,
    else from bytes written vs. the input size)."""

    def __init__(self, key: str, source: str, input_bytes: int | None, total_records: int | None):
        self.input_bytes = input_bytes
        self.total_records = total_records
        self.last = 0.0
        self.pct = 0.0
        self.info: dict = {}
        self.id = create_progress_artifact(progress=0.0, key=key, description=f"Converting {source}")

    def __call__(self, info: dict) -> None:
        self.info = info
        if self.total_records:
            pct = 100.0 * info["records_total"] / self.total_records
        elif self.input_bytes:
            pct = 100.0 * info["bytes_total"] / self.input_bytes
        else:
            pct = self.pct
        self.pct = max(self.pct, min(99.0, pct))
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            update_progress_artifact(self.id, self.pct)
            get_run_logger().info("chunk %d: %d records so far, %s written, %.0f records/s (~%.0f%%)",
                                  info["chunk"], info["records_total"], human_bytes(info["bytes_total"]),
                                  info["records_per_s"], self.pct)

    def finish(self) -> None:
        update_progress_artifact(self.id, 100.0)


def _indexed_records(path: str) -> int | None:
    """Total records from the BAM's .bai/.csi (cheap), or None."""
    base = path[:-4] if path.endswith(".bam") else path
    if not any(os.path.exists(p) for p in (path + ".bai", path + ".csi", base + ".bai")):
        return None
    try:
        import pysam

        with pysam.AlignmentFile(path, "rb") as f:
            return sum(s.total for s in f.get_index_statistics()) + f.nocoordinate
    except Exception:  # noqa: BLE001 - only an estimate
        return None


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
    verify_mode: Literal["read", "head"] = "read",
) -> dict:
    """Convert ``source`` (a local BAM/SAM/CRAM path, or ``s3://bucket/key.bam`` streamed from
    S3) into a bams3 dataset at ``destination`` (``s3://bucket/prefix`` or a local directory).

    Sizes accept bytes or strings like ``"16M"``. ``concurrency``: parallel S3 requests and
    chunk uploads (default 2 x ``threads``). ``aws_credentials_block``: name of a prefect-aws
    ``AwsCredentials`` block (default: boto3's standard credential chain).
    ``verify_mode``: how each uploaded chunk is checked before the commit: ``read`` (read
    back, SHA-256) or ``head`` (size and ETag).
    """
    log = get_run_logger()
    if source == "-":
        raise InputError("source '-' (standard input) cannot be used by a flow: pass a file path or an s3:// URI")
    if not is_s3(destination) and os.path.isfile(destination):
        raise InputError(f"{destination}: exists and is a file; destination must be a directory or s3://bucket/prefix")
    opts = ConvertOptions(reference=reference, threads=threads, max_memory=parse_size(max_memory, "max_memory"),
                          block_bytes=parse_size(block_size, "block_size"),
                          chunk_bytes=parse_size(chunk_size, "chunk_size"), overwrite=overwrite,
                          upload_concurrency=concurrency)
    aws = aws_options(aws_credentials_block, region)
    if aws_credentials_block:
        log.info("S3 credentials from the AwsCredentials block %r", aws_credentials_block)
    executor = PrefectExecutor()
    commit = make_commit(verify_mode, window=max(2, MAX_WORKERS))
    key = artifact_key("convert", destination)
    t0 = time.time()
    with open_target(destination, aws, part_size=parse_size(part_size, "part_size"),
                     concurrency=concurrency or 2 * max(1, threads), storage_class=storage_class, sse=sse,
                     sse_kms_key_id=sse_kms_key_id) as store:
        log.info("converting %s -> %s", source, store.uri)
        try:
            if is_s3(source):
                res, input_bytes = _convert_from_s3(source, store, opts, aws, executor, commit, key)
            else:
                try:
                    input_bytes = os.path.getsize(source)
                except OSError:
                    input_bytes = None  # open_input reports the problem
                progress = opts.progress = Progress(key + "-progress", source, input_bytes, _indexed_records(source))
                res = convert(source, store, opts, executor=executor, commit=commit)
                progress.finish()
        except BaseException:
            _cleanup_after_failure(executor)
            raise
    return _publish(res, source, destination, input_bytes, time.time() - t0, key)


def _convert_from_s3(source, store, opts, aws, executor, commit, key) -> tuple[ConvertResult, int]:
    """Stream ``s3://bucket/key`` into the pipeline (BAM or plain SAM; not bgzipped SAM)."""
    _scheme, bucket, obj = parse_uri(source)
    if not obj:
        raise InputError(f"{source}: expected s3://bucket/path/to/file.bam")
    with open_target(f"s3://{bucket}", aws) as src:
        input_bytes = src.head(obj).size
        reader = src.open_read(obj)
        try:
            inp = open_input("-", reference=opts.reference, threads=opts.threads, stdin=reader)
            inp.name = source
            progress = opts.progress = Progress(key + "-progress", source, input_bytes, None)
            res = convert_stream(inp, store, opts, source=source, executor=executor, commit=commit)
            progress.finish()
        finally:
            reader.close()
    return res, input_bytes


def _cleanup_after_failure(executor: PrefectExecutor) -> None:
    """The pipeline aborted the run; uploads still in flight may land afterwards: wait for
    them and remove this run's objects once more."""
    executor.shutdown(cancel=True)
    if executor.writer is not None and executor.writer.prepared:
        executor.writer.abort()


def _publish(res: ConvertResult, source: str, destination: str, input_bytes: int | None, seconds: float,
             key: str) -> dict:
    m = res.manifest
    size = sum(c.size for c in m.chunks) + sum(i.size for i in m.index) + m.header.size
    summary = {
        "source": source, "destination": destination, "run_id": m.run_id, "records": res.records,
        "chunks": len(m.chunks), "blocks": sum(i.n_blocks for i in m.index), "bytes": size,
        "input_bytes": input_bytes, "ratio": (size / input_bytes) if input_bytes else None,
        "seconds": round(seconds, 3), "records_per_s": round(res.records / max(seconds, 1e-9), 1),
        "spill_runs": res.spill_runs, "sorted_by": m.sorted_by,
    }
    rows = [["Source", f"`{source}`"], ["Dataset", f"`{destination}`"], ["Records", f"{res.records:,}"],
            ["Chunks", len(m.chunks)], ["Blocks", summary["blocks"]],
            ["Bytes", f"{size:,} ({human_bytes(size)})"],
            ["Input bytes", f"{input_bytes:,} ({human_bytes(input_bytes)})" if input_bytes else "n/a"],
            ["Size / input", f"{summary['ratio']:.3f}" if summary["ratio"] else "n/a"],
            ["Seconds", f"{seconds:.1f}"], ["Records/s", f"{summary['records_per_s']:,.0f}"],
            ["Sorted by", m.sorted_by], ["Spill runs", res.spill_runs], ["Run id", f"`{m.run_id}`"]]
    create_markdown_artifact(markdown="# bams3 convert-to-s3\n\n" + md_table(["", ""], rows) + "\n", key=key,
                             description=f"bams3 dataset {destination}")
    get_run_logger().info("wrote %d records to %s in %.1f s (%d chunks, %s)", res.records, destination, seconds,
                          len(m.chunks), human_bytes(size))
    return summary
