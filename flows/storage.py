"""Flow ``storage-report``: what datasets cost on S3, and a lifecycle policy for them.

Per dataset: bytes and objects by storage class, the monthly storage cost, the request and
transfer cost of typical reads (a ~1 kb region query, cold and warm; a whole-dataset read),
what the storage would cost once chunks moved to STANDARD_IA / GLACIER_IR. Prices and the
arithmetic live in :mod:`bams3core.cost` (pure functions, tested on their own).

Lifecycle (dry run unless ``apply_lifecycle=True``): per dataset, its chunk objects move to
STANDARD_IA after ``transition_ia_days`` and GLACIER_IR after ``transition_glacier_ir_days``,
its ``_tmp/`` spill leftovers expire after ``expire_tmp_days``; incomplete multipart uploads
under the target prefix are aborted after ``abort_multipart_days``. The rules are merged by ID
into the bucket's existing configuration (other rules are kept).
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from bams3.errors import DatasetError, InputError
from bams3.store import parse_uri
from bams3core import cost
from bams3core.index import MANIFEST_KEY
from tasks import storage

from flows.common import (artifact_key, aws_options, human_bytes, is_s3, join_uri, md_table, open_target,
                          resolve_target)

Egress = Literal["internet", "inter-region", "same-region"]


def dataset_costs(prefix: str, objects: list[tuple[str, int, str]], prof: dict, *, egress: str = "internet",
                  prices: dict = cost.PRICES) -> dict:
    """The numbers for one dataset from its object listing and its :func:`tasks.profile`."""
    storage_cost = cost.monthly_storage_cost(((size, sc) for _k, size, sc in objects), prices)
    chunk_keys = set(prof["chunk_keys"])
    chunks = [(k, size, cost.normalize_class(sc)) for k, size, sc in objects if k in chunk_keys]
    others = [(k, size, cost.normalize_class(sc)) for k, size, sc in objects if k not in chunk_keys]
    by_class: dict[str, int] = {}
    for _k, size, sc in chunks:
        by_class[sc] = by_class.get(sc, 0) + size
    chunk_class = max(by_class, key=by_class.get) if by_class else "STANDARD"
    meta_class = "STANDARD"

    rq = cost.region_query_io(prof["block_lengths"], manifest_bytes=prof["manifest_bytes"],
                              index_bytes=prof["index_page_bytes"])
    warm = cost.read_cost(rq["warm"]["requests"], rq["warm"]["bytes"], chunk_class, egress=egress, prices=prices)
    meta_req = rq["cold"]["requests"] - rq["warm"]["requests"]
    meta_bytes = rq["cold"]["bytes"] - rq["warm"]["bytes"]
    cold = _add(warm, cost.read_cost(meta_req, meta_bytes, meta_class, egress=egress, prices=prices))

    metadata = [prof["manifest_bytes"], prof["header_bytes"], *prof["index_bytes"]]
    whole = _add(cost.read_cost(len(prof["whole_read_sizes"]), sum(prof["whole_read_sizes"]), chunk_class,
                                egress=egress, prices=prices),
                 cost.read_cost(len(metadata), sum(metadata), meta_class, egress=egress, prices=prices))

    chunk_sizes = [s for _k, s, _c in chunks]
    other_sizes = [s for _k, s, _c in others]
    return {
        "prefix": prefix,
        "run_id": prof["run_id"],
        "records": prof["records"],
        "chunks": prof["chunks"],
        "blocks": prof["blocks"],
        "objects": storage_cost["objects"],
        "bytes": storage_cost["bytes"],
        "by_class": storage_cost["by_class"],
        "monthly_usd": storage_cost["usd"],
        "chunk_class": chunk_class,
        "region_query": {"median_block_bytes": rq["median_block_bytes"], "warm": warm, "cold": cold},
        "whole_read": whole,
        "projected_monthly_usd": {c: cost.projected_storage_cost(chunk_sizes, other_sizes, c, prices)
                                  for c in ("STANDARD_IA", "GLACIER_IR")},
        "transition_usd": {c: cost.transition_cost(len(chunks), c, prices) for c in ("STANDARD_IA", "GLACIER_IR")},
    }


def _add(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return None
    return {k: a[k] + b[k] for k in a}


@flow(name="storage-report", task_runner=ThreadPoolTaskRunner(max_workers=4))
def storage_report(
    dataset: str | None = None,
    apply_lifecycle: bool = False,
    transition_ia_days: int | None = 30,
    transition_glacier_ir_days: int | None = 90,
    expire_tmp_days: int | None = 7,
    abort_multipart_days: int | None = 7,
    egress: Egress = "internet",
    region: str | None = None,
    aws_credentials_block: str | None = None,
) -> dict:
    """Storage and query costs of the dataset at ``dataset`` or of every dataset under that
    prefix (default: the Prefect variable ``bams3_datasets``), and the lifecycle policy for
    them: written to the bucket only with ``apply_lifecycle=True`` (default: dry run).
    Any ``*_days`` set to None leaves that rule out. ``egress``: where query bytes go."""
    log = get_run_logger()
    target = resolve_target(dataset)
    try:
        dataset_rules = {}  # validate the lifecycle parameters before any work
        cost.dataset_lifecycle_rules("x", "r", ia_days=transition_ia_days, glacier_ir_days=transition_glacier_ir_days,
                                     tmp_expire_days=expire_tmp_days)
        if abort_multipart_days is not None:
            cost.abort_multipart_rule("", abort_multipart_days)
    except ValueError as e:
        raise InputError(str(e)) from None
    aws = aws_options(aws_credentials_block, region)
    with open_target(target, aws) as root:
        inv = storage.inventory(root)
        if not inv["datasets"]:
            raise DatasetError(f"{target}: no bams3 dataset here or under this prefix (no {MANIFEST_KEY})")
        stores = {p: open_target(join_uri(target, p), aws) for p in inv["datasets"]}
        try:
            futures = {p: storage.profile.submit(quote(s)) for p, s in stores.items()}
            profiles = {p: f.result() for p, f in futures.items()}
        finally:
            for s in stores.values():
                s.close()

        reports = []
        for p in inv["datasets"]:
            r = dataset_costs(p, inv["objects"][p], profiles[p], egress=egress)
            r["uri"] = join_uri(target, p)
            reports.append(r)
            log.info("%s: %d objects, %s, %s/month", r["uri"], r["objects"], human_bytes(r["bytes"]),
                     cost.fmt_usd(r["monthly_usd"]))

        lifecycle = None
        if is_s3(target):
            _s, _bucket, root_prefix = parse_uri(target)
            rules = []
            for r in reports:
                full = "/".join(x for x in (root_prefix, r["prefix"]) if x)
                dataset_rules[full] = cost.dataset_lifecycle_rules(
                    full, r["run_id"], ia_days=transition_ia_days, glacier_ir_days=transition_glacier_ir_days,
                    tmp_expire_days=expire_tmp_days)
                rules += dataset_rules[full]
            if abort_multipart_days is not None:
                rules.append(cost.abort_multipart_rule(root_prefix, abort_multipart_days))
            if rules:
                lifecycle = storage.lifecycle(root, rules, apply=apply_lifecycle)
                lifecycle["rules"] = rules
        else:
            log.info("%s is a local directory: no lifecycle policy", target)

    total = {"objects": sum(r["objects"] for r in reports), "bytes": sum(r["bytes"] for r in reports),
             "monthly_usd": sum(r["monthly_usd"] for r in reports)}
    result = {"target": target, "egress": egress, "prices": cost.PRICES["source"], "datasets": reports,
              "total": total, "other": inv["other"], "lifecycle": lifecycle}
    _publish(result)
    return result


def _publish(res: dict) -> None:
    f = cost.fmt_usd
    lines = [f"# bams3 storage report\n\n`{res['target']}`: {len(res['datasets'])} dataset(s), "
             f"{res['total']['objects']:,} objects, {human_bytes(res['total']['bytes'])}, "
             f"**{f(res['total']['monthly_usd'])}/month** in storage. Prices: {res['prices']}; "
             f"query bytes priced as egress `{res['egress']}`.\n"]
    rows = []
    for r in res["datasets"]:
        rq, wr = r["region_query"], r["whole_read"]
        rows.append([f"`{r['uri']}`", f"{r['records']:,}", r["chunks"], f"{r['objects']:,}", human_bytes(r["bytes"]),
                     f(r["monthly_usd"]),
                     _q(rq["cold"]), _q(rq["warm"]), _q(wr),
                     f(r["projected_monthly_usd"]["STANDARD_IA"]), f(r["projected_monthly_usd"]["GLACIER_IR"])])
    lines.append(md_table(["Dataset", "Records", "Chunks", "Objects", "Size", "Storage/month",
                           "1 kb query, cold", "1 kb query, warm", "Whole read",
                           "Storage/month, chunks in IA", "… in Glacier IR"], rows))
    lines.append("\n## By storage class\n")
    rows = [[f"`{r['uri']}`", cls, e["objects"], human_bytes(e["bytes"]), human_bytes(e["billable_bytes"]), f(e["usd"])]
            for r in res["datasets"] for cls, e in r["by_class"].items()]
    lines.append(md_table(["Dataset", "Class", "Objects", "Bytes", "Billable", "Per month"], rows))
    lc = res["lifecycle"]
    if lc:
        state = "applied to" if lc["applied"] else "dry run (apply_lifecycle=true writes them) for"
        lines.append(f"\n## Lifecycle rules: {state} bucket `{lc['bucket']}`\n")
        rows = [[f"`{r['ID']}`", f"`{r['Filter']['Prefix']}`" if r["Filter"].get("Prefix") else "(whole bucket)",
                 _actions(r)] for r in lc["rules"]]
        lines.append(md_table(["Rule", "Prefix", "Actions"], rows))
        lines.append(f"\nThe bucket {'now has' if lc['applied'] else 'would have'} {len(lc['merged'])} rule(s) "
                     f"({len(lc['merged']) - len(lc['rules'])} existing rule(s) kept).\n")
    create_markdown_artifact(markdown="\n".join(lines) + "\n", key=artifact_key("storage", res["target"]),
                             description=f"bams3 storage report for {res['target']}")


def _q(c: dict | None) -> str:
    if c is None:
        return "n/a (restore first)"
    return f"{c['requests']} req, {human_bytes(c['bytes'])}, {cost.fmt_usd(c['usd'])}"


def _actions(rule: dict) -> str:
    out = [f"{t['StorageClass']} after {t['Days']} d" for t in rule.get("Transitions", [])]
    if "Expiration" in rule:
        out.append(f"expire after {rule['Expiration']['Days']} d")
    if "AbortIncompleteMultipartUpload" in rule:
        out.append(f"abort incomplete multipart uploads after {rule['AbortIncompleteMultipartUpload']['DaysAfterInitiation']} d")
    return "; ".join(out)
