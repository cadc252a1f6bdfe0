"""Flow ``verify-dataset``: check one dataset, or every dataset under a prefix.

Full verification decodes every block and checks every checksum and count
(:func:`bams3.verify.verify_dataset`); ``sample_fraction`` < 1 checks a random sample of
chunks (plus all metadata). The flow publishes a markdown report and FAILS if any dataset is
corrupt, so a scheduled run shows up red.
"""

from __future__ import annotations

import math
import random

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from bams3.dataset import Dataset
from bams3.errors import DatasetError, InputError
from tasks import pipeline as steps
from tasks import storage

from flows.common import (artifact_key, aws_options, human_bytes, join_uri, md_table, open_target,
                          resolve_target)


def sample_chunks(n_chunks: int, fraction: float, seed: int | None) -> list[int] | None:
    """Chunk numbers to check: None (all) for ``fraction >= 1``, else a random sample of
    ``ceil(fraction * n)`` (at least one)."""
    if fraction >= 1 or n_chunks == 0:
        return None
    k = max(1, math.ceil(fraction * n_chunks))
    return sorted(random.Random(seed).sample(range(n_chunks), k))


@flow(name="verify-dataset", task_runner=ThreadPoolTaskRunner(max_workers=4))
def verify_dataset_flow(
    dataset: str | None = None,
    sample_fraction: float = 1.0,
    seed: int | None = None,
    decode: bool = True,
    region: str | None = None,
    aws_credentials_block: str | None = None,
) -> list[dict]:
    """Verify the dataset at ``dataset`` or every dataset under that prefix (default: the
    Prefect variable ``bams3_datasets``). ``sample_fraction`` in (0, 1]: share of chunks
    checked per dataset (``seed`` makes the sample reproducible). Raises if any is corrupt."""
    log = get_run_logger()
    if not 0 < sample_fraction <= 1:
        raise InputError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
    target = resolve_target(dataset)
    aws = aws_options(aws_credentials_block, region)
    with open_target(target, aws) as root:
        prefixes = _find(root)
    if not prefixes:
        raise DatasetError(f"{target}: no bams3 dataset here or under this prefix (no manifest.json)")
    futures = []
    stores = []
    for rel in prefixes:
        uri = join_uri(target, rel)
        store = open_target(uri, aws, use_cache=False)
        stores.append(store)
        chunks = None
        if sample_fraction < 1:
            try:
                n = len(Dataset.open(store, refresh=True).manifest.chunks)
            except DatasetError:
                n = 0  # the verify task reports the broken manifest
            chunks = sample_chunks(n, sample_fraction, seed)
        futures.append(steps.verify.submit(quote(store), chunks=chunks, decode=decode))
    try:
        reports = [f.result() for f in futures]
    finally:
        for s in stores:
            s.close()
    bad = [r for r in reports if not r["ok"]]
    _publish(target, reports, sample_fraction)
    for r in reports:
        (log.info if r["ok"] else log.error)("%s: %s (%d/%d chunks, %d records checked)", r["uri"],
                                             "OK" if r["ok"] else "CORRUPT", r["chunks_checked"],
                                             r["chunks_total"], r["records_checked"])
    if bad:
        first = bad[0]["problems"][0] if bad[0]["problems"] else "corrupt"
        raise DatasetError(f"{len(bad)} of {len(reports)} dataset(s) failed verification; "
                           f"{bad[0]['uri']}: {first}")
    return reports


def _find(root) -> list[str]:
    """Dataset prefixes under ``root`` (the root itself if it holds a manifest)."""
    if root.exists("manifest.json"):
        return [""]
    return storage.find_datasets(root)


def _publish(target: str, reports: list[dict], fraction: float) -> None:
    rows = []
    for r in reports:
        rows.append(["OK" if r["ok"] else "**CORRUPT**", f"`{r['uri']}`", f"{r['chunks_checked']}/{r['chunks_total']}",
                     r["blocks_checked"], f"{r['records_checked']:,}", human_bytes(r["bytes_read"]),
                     "; ".join(r["problems"][:3]) + (f" (+{len(r['problems']) - 3} more)" if len(r["problems"]) > 3
                                                     else "")])
    n_bad = sum(not r["ok"] for r in reports)
    head = (f"# bams3 verify-dataset\n\n`{target}`: {len(reports)} dataset(s), "
            f"{'all OK' if not n_bad else f'{n_bad} CORRUPT'}; "
            f"{'full check' if fraction >= 1 else f'sampled {fraction:.0%} of chunks'}.\n\n")
    create_markdown_artifact(
        markdown=head + md_table(["Status", "Dataset", "Chunks checked", "Blocks", "Records", "Read", "Problems"],
                                 rows) + "\n",
        key=artifact_key("verify", target), description=f"bams3 verification of {target}")
