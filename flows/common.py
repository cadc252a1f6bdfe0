"""Helpers shared by the flows: stores with credentials, targets, sizes, artifact keys."""

from __future__ import annotations

import os
import re

from bams3.errors import InputError
from bams3.store import Store, open_store, parse_uri

#: Prefect Variable (or environment variable, upper case) naming what the scheduled
#: verify-dataset / storage-report deployments look at when no ``dataset`` parameter is given
TARGET_VARIABLE = "bams3_datasets"


def aws_options(aws_credentials_block: str | None, region: str | None = None) -> dict:
    """S3Store keyword arguments: a boto3 session from a prefect-aws ``AwsCredentials`` block
    (its region and endpoint too, if it sets them), else boto3's standard credential chain.

    Only the block's *name* ever appears in parameters and logs; its contents never do.
    """
    opts: dict = {"region": region}
    if aws_credentials_block:
        from prefect_aws import AwsCredentials

        creds = AwsCredentials.load(aws_credentials_block)
        opts["session"] = creds.get_boto3_session()
        if region is None and creds.region_name:
            opts["region"] = creds.region_name
        params = getattr(creds, "aws_client_parameters", None)
        endpoint = getattr(params, "endpoint_url", None) if params is not None else None
        if endpoint:
            opts["endpoint_url"] = str(endpoint)
    return {k: v for k, v in opts.items() if v is not None}


def open_target(uri: str, aws: dict | None = None, **store_options) -> Store:
    """Open a local directory or ``s3://bucket/prefix`` (S3 options are ignored for local)."""
    opts = {**(aws or {}), **store_options}
    return open_store(uri, **{k: v for k, v in opts.items() if v is not None})


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join_uri(root: str, rel: str) -> str:
    """``root`` + relative dataset prefix ``rel`` ("" = root itself)."""
    if not rel:
        return root
    if is_s3(root):
        return root.rstrip("/") + "/" + rel
    return os.path.join(root, rel)


def resolve_target(dataset: str | None) -> str:
    """The ``dataset`` parameter, else the Prefect Variable / env var ``bams3_datasets``."""
    if dataset:
        return dataset
    try:
        from prefect.variables import Variable

        value = Variable.get(TARGET_VARIABLE, default=None)
    except Exception:  # noqa: BLE001 - no API (plain Python call): fall back to the env
        value = None
    value = value or os.environ.get(TARGET_VARIABLE.upper())
    if not value:
        raise InputError(f"no dataset given: pass dataset=URI, or set the Prefect variable {TARGET_VARIABLE} "
                         f"(prefect variable set {TARGET_VARIABLE} s3://bucket/prefix) or ${TARGET_VARIABLE.upper()}")
    return str(value)


def parse_size(value: int | str | None, what: str) -> int | None:
    """:func:`bams3core.sorting.parse_size` for a flow parameter (None stays None); a bad
    value is an InputError naming the parameter."""
    if value is None:
        return None
    from bams3core.sorting import parse_size as _parse

    try:
        return _parse(value)
    except ValueError as e:
        raise InputError(f"{what}: {e}") from None


def artifact_key(*parts: str) -> str:
    """An artifact key (lowercase letters, digits, dashes) from free text such as a URI."""
    text = "-".join(p for p in parts if p)
    key = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return key[:120].strip("-") or "bams3"


def bucket_of(uri: str) -> str | None:
    scheme, bucket, _prefix = parse_uri(uri)
    return bucket if scheme == "s3" else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def md_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
