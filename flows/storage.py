"""Flow ``storage-report``: what datasets cost on S3, and a lifecycle policy for them.

Per dataset: bytes and objects by storage class, the monthly storage cost (in a versioned
bucket, noncurrent versions and delete markers too: shown apart and included in the total), the request and
transfer cost of typical reads (a ~1 kb region query, cold and warm; a whole-dataset read),
what the storage would cost once chunks moved to STANDARD_IA / GLACIER_IR. Prices and the
arithmetic live in :mod:`bams3core.cost` (pure functions, tested on their own).

Lifecycle (dry run unless ``apply_lifecycle=True``): the plan of :func:`bams3core.cost.lifecycle_plan`
for the target prefix, the same as ``bams3 lifecycle``: at most 4 rules however many datasets
live under it (they filter on the ``bams3-object`` tag of chunk and spill objects): chunks move to
STANDARD_IA after ``transition_ia_days`` and GLACIER_IR after ``transition_glacier_ir_days``, spill
leftovers expire after ``expire_tmp_days``, incomplete multipart uploads are aborted after
``abort_multipart_days`` and, in a versioned bucket, noncurrent versions expire after
``expire_noncurrent_days``. The rules are merged by ID into the bucket's existing configuration
(other rules are kept; bams3's own earlier rules under the prefix are replaced).
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


dataset_costs = cost.dataset_costs  # the numbers for one dataset (shared with `bams3 cost`)


@flow(name="storage-report", task_runner=ThreadPoolTaskRunner(max_workers=4))
def storage_report(
    dataset: str | None = None,
    apply_lifecycle: bool = False,
    transition_ia_days: int | None = 30,
    transition_glacier_ir_days: int | None = 90,
    expire_tmp_days: int | None = 7,
    abort_multipart_days: int | None = 7,
    expire_noncurrent_days: int | None = 30,
    egress: Egress = "internet",
    region: str | None = None,
    aws_credentials_block: str | None = None,
) -> dict:
    """Storage and query costs of the dataset at ``dataset`` or of every dataset under that
    prefix (default: the Prefect variable ``bams3_datasets``), and the lifecycle policy for
    them: written to the bucket only with ``apply_lifecycle=True`` (default: dry run).
    Any ``*_days`` set to None leaves that rule out; ``expire_noncurrent_days`` applies to
    versioned buckets only. ``egress``: where query bytes go."""
    log = get_run_logger()
    target = resolve_target(dataset)
    try:  # validate the lifecycle parameters before any work
        cost.lifecycle_plan("", ia_days=transition_ia_days, glacier_ir_days=transition_glacier_ir_days,
                            tmp_expire_days=expire_tmp_days, abort_multipart_days=abort_multipart_days,
                            noncurrent_days=expire_noncurrent_days,
                            names={"ia_days": "transition_ia_days", "glacier_ir_days": "transition_glacier_ir_days",
                                   "tmp_expire_days": "expire_tmp_days", "noncurrent_days": "expire_noncurrent_days"})
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

        is_versioned = storage.versioned(root) if is_s3(target) else False
        versions = storage.noncurrent_versions(root, inv["datasets"]) if is_versioned else None

        reports = []
        for p in inv["datasets"]:
            r = dataset_costs(p, inv["objects"][p], profiles[p], egress=egress,
                              noncurrent=versions["by_dataset"][p] if versions else None)
            r["uri"] = join_uri(target, p)
            reports.append(r)
            log.info("%s: %d objects, %s, %s/month", r["uri"], r["objects"], human_bytes(r["bytes"]),
                     cost.fmt_usd(r["monthly_usd"]))
            if versions:
                nc = r["noncurrent"]
                log.info("%s: %d noncurrent version(s), %s, %d delete marker(s), %s/month", r["uri"],
                         nc["versions"], human_bytes(nc["bytes"]), nc["delete_markers"], cost.fmt_usd(nc["monthly_usd"]))

        lifecycle = None
        if is_s3(target):
            _s, _bucket, root_prefix = parse_uri(target)
            rules = cost.lifecycle_plan(root_prefix, ia_days=transition_ia_days,
                                        glacier_ir_days=transition_glacier_ir_days, tmp_expire_days=expire_tmp_days,
                                        abort_multipart_days=abort_multipart_days, versioned=is_versioned,
                                        noncurrent_days=expire_noncurrent_days)
            if rules:
                lifecycle = storage.lifecycle(root, rules, apply=apply_lifecycle, replace_under=root_prefix)
                lifecycle["rules"] = rules
                lifecycle["versioned"] = is_versioned
        else:
            log.info("%s is a local directory: no lifecycle policy", target)

    total = {"objects": sum(r["objects"] for r in reports), "bytes": sum(r["bytes"] for r in reports),
             "monthly_usd": sum(r["monthly_usd"] for r in reports)}
    other = inv["other"]
    if versions:  # noncurrent versions count in the totals, and are shown apart
        other = dict(other, noncurrent=cost.noncurrent_costs(versions["other"]))
        nc = {k: sum(r["noncurrent"][k] for r in reports) + other["noncurrent"][k]
              for k in ("versions", "delete_markers", "bytes", "monthly_usd")}
        total["current"] = dict(total)
        total["noncurrent"] = nc
        total["objects"] += nc["versions"]
        total["bytes"] += nc["bytes"]
        total["monthly_usd"] += nc["monthly_usd"]
    result = {"target": target, "egress": egress, "prices": cost.PRICES["source"], "datasets": reports,
              "total": total, "other": other, "lifecycle": lifecycle}
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
    if "noncurrent" in res["total"]:
        nc = res["total"]["noncurrent"]
        lines.append(f"\n## Noncurrent versions (versioned bucket)\n\n{nc['versions']:,} noncurrent version(s), "
                     f"{human_bytes(nc['bytes'])}, {nc['delete_markers']:,} delete marker(s): "
                     f"**{f(nc['monthly_usd'])}/month**, included in the total above (current objects: "
                     f"{human_bytes(res['total']['current']['bytes'])}, {f(res['total']['current']['monthly_usd'])}"
                     f"/month).\n")
        parts = [(f"`{r['uri']}`", r["noncurrent"]) for r in res["datasets"]]
        if res["other"]["noncurrent"]["versions"] or res["other"]["noncurrent"]["delete_markers"]:
            parts.append(("(no dataset)", res["other"]["noncurrent"]))
        rows = [[name, cls, e["objects"], human_bytes(e["bytes"]), human_bytes(e["billable_bytes"]), f(e["usd"])]
                for name, n in parts for cls, e in n["by_class"].items()]
        rows += [[name, "delete markers", n["delete_markers"], "0 B", "", ""] for name, n in parts
                 if n["delete_markers"]]
        lines.append(md_table(["Dataset", "Class", "Versions", "Bytes", "Billable", "Per month"], rows))
    lc = res["lifecycle"]
    if lc:
        state = "applied to" if lc["applied"] else "dry run (apply_lifecycle=true writes them) for"
        lines.append(f"\n## Lifecycle rules: {state} bucket `{lc['bucket']}`\n")
        rows = [[f"`{r['ID']}`", f"`{cost.rule_prefix(r)}`" if cost.rule_prefix(r) else "(whole bucket)",
                 ", ".join(f"`{k}={v}`" for k, v in cost.rule_tags(r).items()) or "(any)", _actions(r)]
                for r in lc["rules"]]
        lines.append(md_table(["Rule", "Prefix", "Tags", "Actions"], rows))
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
    if "Days" in rule.get("Expiration", {}):
        out.append(f"expire after {rule['Expiration']['Days']} d")
    if "NoncurrentVersionExpiration" in rule:
        out.append(f"expire noncurrent versions after {rule['NoncurrentVersionExpiration']['NoncurrentDays']} d")
    if rule.get("Expiration", {}).get("ExpiredObjectDeleteMarker"):
        out.append("remove expired delete markers")
    if "AbortIncompleteMultipartUpload" in rule:
        out.append(f"abort incomplete multipart uploads after {rule['AbortIncompleteMultipartUpload']['DaysAfterInitiation']} d")
    return "; ".join(out)
