"""Flow ``migrate``: every BAM/SAM/CRAM under directories or S3 prefixes -> datasets.

The same implementation as ``bams3 migrate`` (:mod:`bams3.migrate`): :func:`discover` lists
the inputs, and each file goes through :func:`bams3.migrate.migrate_one`, which skips a source
its destination already records, converts the others with :func:`bams3.convert.run_conversion`
and (``delete_source``) compares the dataset with the source before deleting it. Here the
conversion's stages run as the Prefect tasks ``plan``, ``shard`` (tags ``bams3-encode``,
``bams3-s3-upload``), ``verify_shard`` (``verify_mode`` ``head`` or ``read``) and ``commit``,
exactly as in ``convert-to-s3``; tag concurrency limits therefore cap migrations and conversions
together.

One failed file never stops the others: the flow publishes a summary (markdown artifact
``migrate-…``) and a progress artifact (files, bytes, rate, ETA), and ends Failed if any file
failed. Run ad hoc::

    from flows import migrate
    migrate(sources=["/data/bams"], destination="s3://bucket/datasets")
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from bams3 import migrate as mig
from bams3.convert import ConvertOptions
from bams3.errors import Bams3Error
from bams3core.planner import DEFAULT_BLOCK_BYTES, DEFAULT_CHUNK_BYTES

from flows.common import artifact_key, aws_options, human_bytes, md_table, parse_size
from bams3.stages import store_spec
from flows.convert import MAX_WORKERS, prefect_stages


class MigrateFailed(Bams3Error):
    """Some files failed (the others were migrated): the flow run ends Failed."""


@flow(name="migrate", task_runner=ThreadPoolTaskRunner(max_workers=MAX_WORKERS))
def migrate(
    sources: list[str],
    destination: str,
    dry_run: bool = False,
    delete_source: bool = False,
    chunk_size: int | str = DEFAULT_CHUNK_BYTES,
    block_size: int | str = DEFAULT_BLOCK_BYTES,
    max_memory: int | str = "768M",
    threads: int = 2,
    concurrency: int | None = None,
    storage_class: str | None = None,
    reference: str | None = None,
    region: str | None = None,
    aws_credentials_block: str | None = None,
    verify_mode: Literal["upload", "head", "read"] = "upload",
) -> dict:
    """Migrate every input under ``sources`` (directories, ``s3://bucket/prefix``, files, or
    ``@LIST`` files) to ``destination/<relative name>.bams3``; see ``bams3 migrate --help``.
    Returns ``{"converted": n, "skipped": n, "failed": n, "outcomes": [...]}`` (a dry run:
    the plan, nothing written)."""
    log = get_run_logger()
    aws = aws_options(aws_credentials_block, region)
    items = mig.discover(list(sources), destination, **aws)
    store_opts = {**aws, "concurrency": concurrency or 2 * max(1, threads)}
    if storage_class and not dry_run:
        store_opts["storage_class"] = storage_class
    key = artifact_key("migrate", destination)
    if dry_run:
        plans = [mig.plan_one(it, store_options=store_opts, s3_options=aws,
                              chunk_bytes=parse_size(chunk_size, "chunk_size")) for it in items]
        rows = [[o.status, f"`{o.item.source}`", f"`{o.item.dest}`", human_bytes(o.item.size),
                 human_bytes(o.estimate["dataset_bytes"]) if o.estimate else "",
                 f"{o.estimate['monthly_usd']['STANDARD']:.4f}" if o.estimate else "", o.reason] for o in plans]
        create_markdown_artifact(markdown="# bams3 migrate (dry run)\n\n" + md_table(
            ["action", "source", "dataset", "input", "est. dataset", "USD/month", "note"], rows) + "\n",
            key=key, description=f"migrate plan for {destination}")
        return {"dry_run": True, "outcomes": [o.to_dict() for o in plans]}

    base = ConvertOptions(reference=reference, threads=threads, max_memory=parse_size(max_memory, "max_memory"),
                          block_bytes=parse_size(block_size, "block_size"),
                          chunk_bytes=parse_size(chunk_size, "chunk_size"), upload_concurrency=concurrency)
    prog = mig.Progress(items)
    art = create_progress_artifact(progress=0.0, key=key + "-progress",
                                   description=f"Migrating {len(items)} file(s) to {destination}")
    outcomes = []
    for it in items:
        # the shard tasks open stores from plain values: the credentials block by name
        spec = store_spec(it.dest, region=region, aws_credentials_block=aws_credentials_block,
                          concurrency=store_opts["concurrency"], storage_class=store_opts.get("storage_class"))
        stages = prefect_stages(verify_mode, None, spec)
        stages["spec"] = spec
        if it.source.startswith("s3://"):
            stages["source_store"] = store_spec("s3://" + it.source[5:].split("/", 1)[0], region=region,
                                                aws_credentials_block=aws_credentials_block)
        out = mig.migrate_one(it, base, store_options=store_opts, s3_options=aws, delete_source=delete_source,
                              reference=reference, stages=stages)
        if out.status == "failed":
            log.error("%s: %s", it.source, out.reason)
        else:
            log.info("%s: %s -> %s%s", it.source, out.status, it.dest, f" ({out.reason})" if out.reason else "")
        outcomes.append(out)
        prog.done(out)
        update_progress_artifact(art, prog.percent, description=prog.line())
        log.info("progress: %s", prog.line())
    update_progress_artifact(art, 100.0, description=prog.line())
    rows = [[o.status, f"`{o.item.source}`", f"`{o.item.dest}`", human_bytes(o.item.size),
             f"{o.records:,}" if o.status == "converted" else "", "yes" if o.deleted else "", o.reason]
            for o in outcomes]
    lines = mig.summary_lines(outcomes)
    create_markdown_artifact(markdown="# bams3 migrate\n\n" + lines[0] + "\n\n" + md_table(
        ["status", "source", "dataset", "input", "records", "source deleted", "note"], rows) + "\n",
        key=key, description=f"migrate to {destination}")
    for line in lines:
        (log.error if line.startswith("failed") else log.info)(line)
    result = {s: sum(o.status == s for o in outcomes) for s in ("converted", "skipped", "failed")}
    result["outcomes"] = [o.to_dict() for o in outcomes]
    if result["failed"]:
        raise MigrateFailed(f"{lines[0]}; " + "; ".join(lines[1:4]))
    return result
