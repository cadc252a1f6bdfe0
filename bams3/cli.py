"""The `bams3` command line: convert, query, stats, export, verify, log, rollback, cleanup.

Conventions follow samtools: SAM on stdout so commands pipe, regions in samtools syntax,
errors as one line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import shlex
import sys

from . import __version__
from .errors import Bams3Error, InputError

EPILOG_PATHS = ("DATASET/DEST is a local directory or s3://bucket/prefix. S3 credentials come from boto3's "
                "standard chain (env, ~/.aws, profiles, instance roles); AWS_ENDPOINT_URL selects an "
                "S3-compatible endpoint.")


def _size(text: str) -> int:
    from bams3core.sorting import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_store_options(p: argparse.ArgumentParser, *, write: bool) -> None:
    g = p.add_argument_group("S3 options (ignored for local paths)")
    g.add_argument("--s3-region", metavar="REGION", help="bucket region (default: AWS_REGION or the profile's, else us-east-1; "
                        "S3's redirect to another region is followed)")
    g.add_argument("--s3-concurrency", type=int, metavar="N",
                   help="S3 requests in flight: uploads, ranged reads (default: 2 x --threads)")
    if write:
        g.add_argument("--s3-part-size", type=_size, default=None, metavar="SIZE",
                       help="multipart part size, 5M..5G (default 10M); objects up to twice it are one PutObject")
        g.add_argument("--s3-storage-class", "--storage-class", dest="storage_class", metavar="CLASS",
                       help="S3 storage class for chunk objects (e.g. STANDARD, INTELLIGENT_TIERING, STANDARD_IA)")
        g.add_argument("--sse", choices=["AES256", "aws:kms"], help="server-side encryption")
        g.add_argument("--sse-kms-key-id", metavar="KEY", help="KMS key for --sse aws:kms")
    else:
        g.add_argument("--no-cache", action="store_true",
                       help="do not use the local metadata cache (manifest/index/header)")
        g.add_argument("--cache-dir", metavar="DIR", help="metadata cache (default $BAMS3_CACHE_DIR or ~/.cache/bams3)")
        g.add_argument("--refresh", action="store_true",
                       help="revalidate cached metadata with S3 now instead of trusting it for its TTL "
                            "(to see a commit made elsewhere in the last minutes)")


def _open_store(uri: str, args, *, write: bool):
    from .store import open_store

    return open_store(uri, **_store_options(args, write=write))


def _store_options(args, *, write: bool) -> dict:
    threads = getattr(args, "threads", 2) or 2
    opts = dict(region=getattr(args, "s3_region", None),
                concurrency=getattr(args, "s3_concurrency", None) or 2 * threads)
    if write:
        opts.update(part_size=getattr(args, "s3_part_size", None), storage_class=getattr(args, "storage_class", None),
                    sse=getattr(args, "sse", None), sse_kms_key_id=getattr(args, "sse_kms_key_id", None))
    else:
        opts.update(use_cache=not getattr(args, "no_cache", False), cache_dir=getattr(args, "cache_dir", None))
    return opts


def _pg_line(argv: list[str]) -> str:
    return (f"@PG\tID:bams3\tPN:bams3\tVN:{__version__}\tCL:" + " ".join(shlex.quote(a) for a in ["bams3"] + argv))


# -- commands ---------------------------------------------------------------------------
def cmd_convert(args, argv) -> int:
    from .convert import ConvertOptions, convert, stderr_progress

    # The ~10^5 objects of the imports (numpy, numba, zstandard, ...) live until exit: keep them
    # out of the cyclic collector, whose full passes over them cost the conversion time and
    # the interpreter's exit half a second (they are released with the process).
    gc.freeze()

    if args.dest.startswith("s3://") is False and os.path.isfile(args.dest):
        raise InputError(f"{args.dest}: exists and is a file; DEST must be a directory or s3://bucket/prefix")
    if args.dask:
        from .cluster import parse_dask

        parse_dask(args.dask)  # a bad value is refused before anything is written
    # the shards of an indexed BAM run on --threads worker processes (bams3.shardpool); their
    # forkserver starts now, and loads what they need while this process plans
    processes = 1 if args.dask or args.input == "-" else max(1, args.threads)
    from .stages import may_be_sharded

    if processes > 1 and args.shards != 1 and may_be_sharded(args.input):
        from .shardpool import prestart

        prestart()
    opts = ConvertOptions(reference=args.reference, threads=args.threads, max_memory=args.max_memory,
                          block_bytes=args.block_size, chunk_bytes=args.chunk_size, overwrite=args.overwrite,
                          keep_snapshots=args.keep_snapshots, keep_days=args.keep_days,
                          upload_concurrency=args.s3_concurrency, shards=args.shards, resume=args.resume,
                          processes=processes, progress=None if args.quiet else stderr_progress)
    with _open_store(args.dest, args, write=True) as store:
        spec = None
        if processes > 1:  # the workers open DEST with the same options
            from .stages import store_spec

            spec = store_spec(args.dest, **_store_options(args, write=True))
        if args.dask:
            from .cluster import DaskShards
            from .stages import store_spec

            if args.input == "-":
                raise InputError("--dask needs a file: standard input cannot be read by other workers")
            runner = DaskShards(args.dask)
            try:
                spec = store_spec(args.dest, **_store_options(args, write=True))
                res = convert(args.input, store, opts, runner=runner, spec=spec, workers=runner.workers)
            finally:
                runner.close()
        else:
            res = convert(args.input, store, opts, spec=spec)
    if res.resumed and not args.quiet:
        print(f"bams3: resumed a previous run: {res.reused_chunks} chunks reused, "
              f"{res.encoded_records} of {res.records} records encoded", file=sys.stderr)
    m = res.manifest
    size = sum(c.size for c in m.chunks) + sum(i.size for i in m.index) + m.header.size
    if not args.quiet:
        print(f"bams3: wrote {res.records} records to {args.dest} in {res.seconds:.1f} s "
              f"({res.records / max(res.seconds, 1e-9):.0f} records/s; {len(m.chunks)} chunks, "
              f"{size / 1e6:.2f} MB)", file=sys.stderr)
    return 0


def _open_dataset(args):
    from .dataset import Dataset
    from .warmup import install_parallel_compile

    install_parallel_compile()  # a first query on a fresh install compiles on two cores
    if not args.dataset.startswith("s3://") and os.path.isfile(args.dataset):
        raise InputError(f"{args.dataset}: is a file, not a bams3 dataset (a directory or s3://bucket/prefix); "
                         f"make one with: bams3 convert {shlex.quote(args.dataset)} DEST")
    store = _open_store(args.dataset, args, write=False)
    return Dataset.open(store, threads=args.threads, refresh=getattr(args, "refresh", False),
                        snapshot=getattr(args, "snapshot", None))


def cmd_query(args, argv) -> int:
    from .export import refuse_wide, write_sam_any
    from .output import check_writable, write_bam

    if args.output and args.output != "-":
        check_writable(args.output)
        if args.bam:
            check_writable(args.output + ".bai")
    if not (args.count or args.header_only):
        from .warmup import install_parallel_compile

        install_parallel_compile(start=True)  # the decoders' kernels, while the dataset is opened
    ds = _open_dataset(args)
    regions = [ds.parse_region(r) for r in args.regions] if args.regions else None
    if regions is not None and args.multi_region:
        batches = ds.query_union(regions)
    else:
        batches = ds.query(regions)
    pg = None if args.no_PG else _pg_line(argv)
    if args.count:  # from the index where it can; edge blocks decode only positions, flags, CIGARs
        n = ds.count(regions, union=regions is not None and args.multi_region)
        _write_text(args.output, f"{n}\n")
    elif args.header_only:
        _write_text(args.output, ds.header_text() + ("" if not pg else pg + "\n"))
    elif args.bam:
        if not args.output:
            raise InputError("-b needs -o FILE (or -o - for stdout)")
        if ds.wide:
            raise refuse_wide("bam")
        write_bam(ds.bam_header(), batches, args.output, threads=args.threads, index=args.output != "-",
                  pg_line=pg)
    else:
        header = ds.bam_header() if args.with_header else ds.header
        if args.output and args.output != "-":
            with _open_output(args.output, "wb") as f:
                write_sam_any(header, batches, f, wide=ds.wide, with_header=args.with_header, pg_line=pg)
        else:
            write_sam_any(header, batches, sys.stdout.buffer, wide=ds.wide, with_header=args.with_header,
                          pg_line=pg)
            sys.stdout.buffer.flush()
    if args.verbose:
        q = ds.qstats
        print(f"bams3: {q.requests} data requests, {q.bytes} bytes, {q.blocks} blocks, "
              f"{q.records_decoded} records decoded, {q.records_out} returned", file=sys.stderr)
    return 0


def _open_output(path: str, mode: str):
    from .output import cannot_write

    try:
        return open(path, mode)
    except OSError as e:
        raise cannot_write(path, e) from None


def _write_text(path, text: str) -> None:
    if path and path != "-":
        with _open_output(path, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def cmd_stats(args, argv) -> int:
    from bams3core.stats import flagstat_json, flagstat_text, idxstats_rows, idxstats_text

    ds = _open_dataset(args)
    m = ds.manifest
    st = m.stats
    rows = idxstats_rows([r["name"] for r in m.references], [r["length"] for r in m.references],
                         st["mapped"], st["unmapped"], st["unplaced"])
    if args.json:
        obj = {"dataset": args.dataset, "records": m.n_records,
               "bytes": sum(c.size for c in m.chunks) + sum(i.size for i in m.index) + m.header.size,
               "chunks": len(m.chunks), "blocks": sum(i.n_blocks for i in m.index),
               "flagstat": flagstat_json(st["flagstat"]), "idxstats": rows}
        print(json.dumps(obj, indent=1))
    elif args.flagstat:
        sys.stdout.write(flagstat_text(st["flagstat"]))
    elif args.idxstats:
        sys.stdout.write(idxstats_text(rows))
    else:
        sys.stdout.write(flagstat_text(st["flagstat"]))
        sys.stdout.write("\n")
        sys.stdout.write(idxstats_text(rows))
    return 0


def cmd_export(args, argv) -> int:
    from .export import export, export_format
    from .output import check_writable

    fmt = export_format(args.output)  # before any work, like the output checks
    index = args.output != "-" and not args.no_index
    check_writable(args.output)
    if index and fmt != "sam":
        check_writable(args.output + (".crai" if fmt == "cram" else ".bai"))
    ds = _open_dataset(args)
    regions = [ds.parse_region(r) for r in args.region] if args.region else None
    batches = ds.query_union(regions) if regions else ds.query(None)
    export(ds, batches, args.output, reference=args.reference, threads=args.threads, index=index)
    return 0


def cmd_verify(args, argv) -> int:
    from .verify import verify_dataset

    # the store's bytes, not a cached copy: the manifest, header and index are revalidated
    args.refresh = True
    ds = _open_dataset(args)
    rep = verify_dataset(ds)
    for p in rep.problems:  # the report, on stdout; stderr gets one line, as for every error
        print(f"bams3: {p}")
    if rep.ok:
        print(rep.summary())
        return 0
    sys.stdout.flush()
    print(f"bams3: {rep.summary()}; first: {rep.problems[0]}", file=sys.stderr)
    return 1


def _days_or_off(text: str) -> int | None:
    if text.lower() in ("off", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days or 'off', got {text!r}") from None


def _require_s3(uri: str, what: str) -> None:
    if not uri.startswith("s3://"):
        raise InputError(f"{uri}: {what} applies to S3 only (s3://bucket/prefix)")


LIFECYCLE_OPTIONS = {"ia_days": "--transition-ia-days", "glacier_ir_days": "--transition-glacier-ir-days",
                     "tmp_expire_days": "--expire-tmp-days", "abort_multipart_days": "--abort-multipart-days",
                     "noncurrent_days": "--expire-noncurrent-days"}


def cmd_lifecycle(args, argv) -> int:
    from bams3core import cost

    from .store import parse_uri

    _require_s3(args.prefix, "a lifecycle configuration")
    _scheme, _bucket, prefix = parse_uri(args.prefix)
    plan = dict(ia_days=args.transition_ia_days, glacier_ir_days=args.transition_glacier_ir_days,
                tmp_expire_days=args.expire_tmp_days, abort_multipart_days=args.abort_multipart_days,
                noncurrent_days=args.expire_noncurrent_days, names=LIFECYCLE_OPTIONS)
    try:
        cost.lifecycle_plan(prefix, **plan)  # the options are checked before any request
    except ValueError as e:
        raise InputError(str(e)) from None
    from .store import s3admin

    with _open_store(args.prefix, args, write=False) as store:
        versioned = s3admin.is_versioned(store)
        rules = cost.lifecycle_plan(prefix, versioned=versioned, **plan)
        res = s3admin.lifecycle(store, rules, apply=args.apply, replace_under=prefix)
    ch = res["changes"]
    print(json.dumps({"bucket": res["bucket"], "prefix": prefix, "versioned": versioned, "applied": res["applied"],
                      "rules": rules, "changes": ch, "bucket_rules": len(res["merged"])}, indent=1))
    what = (f"{len(ch['added'])} added, {len(ch['replaced'])} replaced, {len(ch['removed'])} removed, "
            f"{len(ch['unchanged'])} unchanged; the bucket {'now has' if res['applied'] else 'would have'} "
            f"{len(res['merged'])} rule(s)")
    if res["applied"]:
        print(f"bams3: lifecycle configuration of s3://{res['bucket']} written: {what}", file=sys.stderr)
    else:
        print(f"bams3: dry run for s3://{res['bucket']}: {what}; pass --apply to write it", file=sys.stderr)
    return 0


def _usd(x) -> str:
    from bams3core.cost import fmt_usd

    return fmt_usd(x)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def _io(c) -> str:
    return "n/a (restore first)" if c is None else f"{c['requests']} request(s), {_mb(c['bytes'])}: {_usd(c['usd'])}"


def cmd_cost(args, argv) -> int:
    from bams3core import cost

    from . import pricing

    opts = dict(region=args.s3_region)
    if pricing.is_dataset(args.path, **opts):
        with _open_store(args.path, args, write=False) as store:
            rep = pricing.dataset_report(store, egress=args.egress)
        rep["uri"] = args.path
        rep.update(kind="dataset", egress=args.egress, prices=cost.PRICES["source"])
        if args.json:
            print(json.dumps(rep, indent=1))
            return 0
        out = [f"{args.path}: bams3 dataset, {rep['records']:,} records, {rep['chunks']} chunk(s), "
               f"{rep['objects']} object(s), {_mb(rep['bytes'])}",
               f"storage: {_usd(rep['monthly_usd'])}/month"]
        for cls, e in rep["by_class"].items():
            out.append(f"  {cls}: {e['objects']} object(s), {_mb(e['bytes'])} ({_mb(e['billable_bytes'])} billed): "
                       f"{_usd(e['usd'])}/month")
        nc = rep.get("noncurrent")
        if nc is not None:
            out.append(f"noncurrent versions (versioned bucket): {nc['versions']} version(s), {_mb(nc['bytes'])}, "
                       f"{nc['delete_markers']} delete marker(s): {_usd(nc['monthly_usd'])}/month")
            for cls, e in nc["by_class"].items():
                out.append(f"  {cls}: {e['objects']} version(s), {_mb(e['bytes'])} ({_mb(e['billable_bytes'])} "
                           f"billed): {_usd(e['usd'])}/month")
            t = rep["total"]
            out.append(f"total stored: {t['objects']} object(s) and version(s), {_mb(t['bytes'])}: "
                       f"{_usd(t['monthly_usd'])}/month")
        for cls, usd in rep["projected_monthly_usd"].items():
            out.append(f"  with chunks in {cls}: {_usd(usd)}/month (transition once: "
                       f"{_usd(rep['transition_usd'][cls])})")
        rq = rep["region_query"]
        out.append(f"1 kb region query (egress {args.egress}), cold cache: {_io(rq['cold'])}")
        out.append(f"1 kb region query, warm cache: {_io(rq['warm'])}")
        out.append(f"whole read: {_io(rep['whole_read'])}")
        out.append(f"prices: {cost.PRICES['source']}")
        print("\n".join(out))
        return 0
    est = pricing.source_estimate(args.path, chunk_bytes=args.chunk_size, **opts)
    costs = cost.estimate_costs(est, egress=args.egress)
    if args.json:
        print(json.dumps(dict(est, kind="source", egress=args.egress, prices=cost.PRICES["source"], **costs), indent=1))
        return 0
    out = [f"{args.path}: {est['format'].upper()}, {_mb(est['source_bytes'])}, {est['records']:,} records "
           f"({est['records_from']})",
           f"estimated dataset: {_mb(est['dataset_bytes'])} in {est['chunks']} chunk(s) "
           f"({est['dataset_bytes_per_record']:.1f} bytes/record; ratio {est['ratio_basis']}, measured by "
           f"{est['ratio_source']})",
           "storage per month: " + ", ".join(f"{c} {_usd(u)}" for c, u in costs["monthly_usd"].items()),
           f"upload (PUT requests): {_usd(costs['upload_usd'])}",
           f"whole read (egress {args.egress}): {_io(costs['whole_read'])}",
           f"prices: {cost.PRICES['source']}"]
    print("\n".join(out))
    return 0


def cmd_restore(args, argv) -> int:
    from .store import s3admin

    _require_s3(args.dataset, "restoring archived objects")
    ds = _open_dataset(args)
    keys = [c.key for c in ds.manifest.chunks]
    with ds.store:
        res = s3admin.restore_objects(ds.store, keys, days=args.days, tier=args.tier)
    if args.json:
        print(json.dumps(dict(res, dataset=args.dataset), indent=1))
        return 0
    archived = res["objects"] - res["readable"]
    classes = ", ".join(f"{n} in {c}" for c, n in sorted(res["by_class"].items()))
    print(f"bams3: {args.dataset}: {res['objects']} chunk(s), {archived} archived{f' ({classes})' if classes else ''}: "
          f"{res['restored']} restored, {res['in_progress']} in progress, {res['requested']} requested now "
          f"({args.tier}, {args.days} day(s)), {res['not_requested']} not requested; {res['readable']} not archived")
    if res["in_progress"] or res["requested"]:
        print("bams3: restores take minutes (Expedited) to hours (Standard, Bulk); run this command again "
              "to see progress", file=sys.stderr)
    return 0


def cmd_cleanup(args, argv) -> int:
    from .runs import find_leftovers, remove

    if not args.dataset.startswith("s3://") and not os.path.isdir(args.dataset):
        raise InputError(f"{args.dataset}: no such directory")
    with _open_store(args.dataset, args, write=True) as store:
        plan = find_leftovers(store)
        base = store.uri.rstrip("/")
        for u in plan.uploads:
            print(f"{base}/{u.key}" + (" (unfinished upload)" if u.upload_id else ""))
        for key in plan.objects:
            print(f"{base}/{key}")
        if not args.dry_run and plan:
            remove(store, plan)
    verb = "would remove" if args.dry_run else "removed"
    print(f"bams3: {verb} {len(plan.objects)} objects and {len(plan.uploads)} unfinished uploads of "
          f"{len(plan.dead_runs)} dead runs; kept {len(plan.live_runs)} live runs", file=sys.stderr)
    return 0


def _migrate_store_options(args, *, write: bool) -> dict:
    """open_store options for migrate's destinations (write) and S3 sources (read)."""
    threads = args.threads or 2
    opts = dict(region=args.s3_region, concurrency=args.s3_concurrency or 2 * threads)
    if write:
        opts.update(part_size=args.s3_part_size, storage_class=args.storage_class, sse=args.sse,
                    sse_kms_key_id=args.sse_kms_key_id)
    else:
        opts.update(use_cache=False)
    return {k: v for k, v in opts.items() if v is not None}


def cmd_migrate(args, argv) -> int:
    from . import migrate
    from .convert import ConvertOptions

    if not args.dest.startswith("s3://") and os.path.isfile(args.dest):
        raise InputError(f"{args.dest}: exists and is a file; DEST_PREFIX must be a directory or s3://bucket/prefix")
    s3_src = {k: v for k, v in dict(region=args.s3_region).items() if v is not None}
    items = migrate.discover(args.sources, args.dest, **s3_src)
    store_opts = _migrate_store_options(args, write=not args.dry_run)
    if args.dry_run:
        plans = [migrate.plan_one(it, store_options=store_opts, s3_options=s3_src, chunk_bytes=args.chunk_size)
                 for it in items]
        tot_in = tot_out = tot_usd = 0.0
        for o in plans:
            line = f"{o.status}\t{o.item.source} -> {o.item.dest}\t{_mb(o.item.size)}"
            if o.estimate:
                usd = o.estimate["monthly_usd"].get("STANDARD", 0.0)
                line += f" -> ~{_mb(o.estimate['dataset_bytes'])}, {_usd(usd)}/month"
                tot_in += o.item.size
                tot_out += o.estimate["dataset_bytes"]
                tot_usd += usd if o.status != "skip" else 0.0
            if o.reason:
                line += f"\t({o.reason})"
            print(line)
        todo = [o for o in plans if o.status in ("convert", "reconvert")]
        print(f"dry run: {len(todo)} to convert, {sum(o.status == 'skip' for o in plans)} to skip, "
              f"{sum(o.status == 'failed' for o in plans)} failing; input {_mb(sum(o.item.size for o in todo))}, "
              f"estimated datasets {_mb(sum(o.estimate['dataset_bytes'] for o in todo))}, "
              f"{_usd(sum(o.estimate['monthly_usd'].get('STANDARD', 0.0) for o in todo))}/month (S3 STANDARD); "
              f"nothing written")
        return 1 if any(o.status == "failed" for o in plans) else 0
    base = ConvertOptions(reference=args.reference, threads=args.threads, max_memory=args.max_memory,
                          block_bytes=args.block_size, chunk_bytes=args.chunk_size,
                          upload_concurrency=args.s3_concurrency)
    outcomes = migrate.run(items, base, store_options=store_opts, s3_options=s3_src,
                           delete_source=args.delete_source,
                           on_done=None if args.quiet else migrate.tty_progress)
    if args.json:
        print(json.dumps([o.to_dict() for o in outcomes], indent=1))
    for line in migrate.summary_lines(outcomes):
        print(f"bams3: {line}", file=sys.stderr)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def cmd_log(args, argv) -> int:
    from . import snapshots

    if not args.dataset.startswith("s3://") and not os.path.isdir(args.dataset):
        raise InputError(f"{args.dataset}: no such directory")
    with _open_store(args.dataset, args, write=False) as store:
        entries = snapshots.log(store)
    if args.json:
        print(json.dumps(entries, indent=1))
        return 0
    for e in entries:
        print(f"{e['run_id']}  {e['time']}  {e['records']:>12,} records  {e['bytes'] / 1e6:>10.2f} MB  "
              f"{e['source'] or '-'}{'  (current)' if e['current'] else ''}")
    return 0


def cmd_rollback(args, argv) -> int:
    from . import snapshots

    if not args.dataset.startswith("s3://") and not os.path.isdir(args.dataset):
        raise InputError(f"{args.dataset}: no such directory")
    snapshots.check_run_id(args.run_id)
    with _open_store(args.dataset, args, write=True) as store:
        m = snapshots.rollback(store, args.run_id)
    print(f"bams3: {args.dataset}: snapshot {m.run_id} ({m.created}, {m.n_records} records) is current",
          file=sys.stderr)
    return 0


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


def _keep(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of snapshots >= 0, got {text!r}")
    return n


def _days(text: str) -> float:
    try:
        d = float(text)
    except ValueError:
        d = -1.0
    if not d >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of days >= 0, got {text!r}")
    return d


def _add_snapshot_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshot", metavar="RUN_ID", help="read this earlier snapshot (a run id that `bams3 log` "
                                                        "lists) instead of the current one")


def cmd_serve(args, argv) -> int:
    from .serve import serve

    opts = dict(region=args.s3_region, concurrency=args.s3_concurrency, use_cache=not args.no_cache,
                cache_dir=args.cache_dir)
    serve(args.root, host=args.host, port=args.port, fasta=args.fasta, max_locus=args.max_locus, store_options=opts,
          refresh=args.refresh)
    return 0


def cmd_demo(args, argv) -> int:
    from .demo import run_demo

    return run_demo(n_pairs=args.pairs, workdir=args.workdir)


def cmd_warmup(args, argv) -> int:
    from .warmup import run_warmup

    rep = run_warmup(threads=args.threads)
    print(json.dumps(rep.to_dict(), indent=1) if args.json else f"bams3: {rep.summary()}")
    return 0


# -- parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from bams3core.planner import DEFAULT_BLOCK_BYTES, DEFAULT_CHUNK_BYTES

    ap = argparse.ArgumentParser(prog="bams3", description="Columnar, region-indexed alignments on S3 or local disk.",
                                 epilog=EPILOG_PATHS)
    ap.add_argument("--version", action="version", version=f"bams3 {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert BAM/SAM/CRAM (or stdin) into a dataset",
                       description="Convert INPUT (BAM, SAM or CRAM; '-' reads SAM or BAM from stdin) into a dataset "
                                   "at DEST. Unsorted input is coordinate-sorted like samtools sort, in bounded memory.",
                       epilog=EPILOG_PATHS)
    p.add_argument("input", help="BAM/SAM/CRAM file, or - for standard input")
    p.add_argument("dest", help="local directory or s3://bucket/prefix")
    p.add_argument("-T", "--reference", help="reference FASTA (CRAM input)")
    p.add_argument("-@", "--threads", type=int, default=2,
                   help="CPUs to use (default 2): the shards of an indexed, coordinate-sorted BAM run on this many "
                        "worker processes, one thread each; other input is one stream on this many threads")
    p.add_argument("-m", "--max-memory", type=_size, default="768M",
                   help="memory for sorting unsorted input before spilling runs, shared by the worker processes "
                        "(default 768M)")
    p.add_argument("--block-size", type=_size, default=DEFAULT_BLOCK_BYTES,
                   help=f"raw bytes of records per block, the unit of decoding (default {DEFAULT_BLOCK_BYTES // 1024}K)")
    p.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_BYTES,
                   help=f"compressed bytes per chunk object, the unit of upload (default {DEFAULT_CHUNK_BYTES >> 20}M)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at DEST")
    p.add_argument("--keep-snapshots", type=_keep, default=1, metavar="N",
                   help="--overwrite keeps the N most recent previous snapshots readable (bams3 log, --snapshot, "
                        "rollback) and removes older ones (default 1; 0 removes the replaced run)")
    p.add_argument("--keep-days", type=_days, default=None, metavar="D",
                   help="also keep every snapshot written less than D days ago")
    p.add_argument("--shards", type=_positive, metavar="N",
                   help="split a coordinate-sorted BAM with a .bai/.csi (a file, or s3://bucket/key.bam with the index "
                        "next to it) into N key ranges converted independently "
                        "(default: one per 64 MB of input, at least two per worker process or --dask worker; "
                        "1: one stream; other "
                        "input is always one stream)")
    p.add_argument("--resume", action="store_true",
                   help="take over a failed or killed conversion of the same file (same size and mtime; on S3 size and ETag) with the "
                        "same options into DEST, reusing the chunks it uploaded; a failure (not bad input) keeps "
                        "this run's chunks for the next --resume")
    p.add_argument("--dask", metavar="WHERE",
                   help="run the shards on Dask instead of worker processes: local:N (a local cluster of N "
                        "one-thread workers) or a scheduler address (tcp://host:8786; workers must read INPUT and "
                        "reach DEST); -@ is then each shard's threads")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    _add_store_options(p, write=True)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("query", help="print records overlapping regions, like samtools view", add_help=False,
                       description="Print the records overlapping each REGION exactly as `samtools view FILE.bam "
                                   "REGION...` does (no REGION: every record).", epilog=EPILOG_PATHS)
    p.add_argument("dataset")
    p.add_argument("regions", nargs="*", metavar="REGION",
                   help="chr, chr:beg, chr:beg-end, {name}:beg-end, or * for unplaced unmapped reads")
    p.add_argument("-h", "--with-header", action="store_true", help="include the header")
    p.add_argument("-H", "--header-only", action="store_true", help="print only the header")
    p.add_argument("-c", "--count", action="store_true", help="print only the count of records")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.add_argument("-b", "--bam", action="store_true", help="write BAM (with -o FILE; FILE.bai is written too)")
    p.add_argument("-M", "--multi-region", action="store_true",
                   help="treat regions as a union: each record once, in file order (samtools view -M)")
    p.add_argument("--no-PG", action="store_true", help="do not add a @PG line to the header output")
    p.add_argument("-@", "--threads", type=int, default=2)
    p.add_argument("-v", "--verbose", action="store_true", help="report requests and bytes on stderr")
    p.add_argument("--help", action="help", help="show this help message and exit")
    _add_store_options(p, write=False)
    _add_snapshot_option(p)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("stats", help="flagstat/idxstats from the manifest alone",
                       description="Print samtools flagstat and idxstats for the dataset, from its manifest "
                                   "(no chunk is read).", epilog=EPILOG_PATHS)
    p.add_argument("dataset")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="one JSON object: flagstat (as samtools flagstat -O json) and idxstats rows")
    g.add_argument("--flagstat", action="store_true", help="only the samtools flagstat text")
    g.add_argument("--idxstats", action="store_true", help="only the samtools idxstats text")
    p.add_argument("-@", "--threads", type=int, default=2, help=argparse.SUPPRESS)
    _add_store_options(p, write=False)
    _add_snapshot_option(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("export", help="write the dataset (or regions) back to BAM + BAI, SAM or CRAM",
                       description="Write a BAM, SAM or CRAM (by OUTPUT's extension) whose `samtools view --no-PG "
                                   "-h` text equals the source's. Datasets with positions beyond 2^31-1 (format "
                                   "v1.1) can only be written as SAM.",
                       epilog=EPILOG_PATHS)
    p.add_argument("dataset")
    p.add_argument("output", help="OUT.bam, OUT.sam or OUT.cram, or - for BAM on stdout")
    p.add_argument("--region", action="append", metavar="R", help="only records overlapping R (repeatable)")
    p.add_argument("-T", "--reference", help="reference FASTA for a .cram output (default: none, sequences "
                                             "stored in the CRAM)")
    p.add_argument("--no-index", action="store_true", help="do not write OUT.bam.bai (or OUT.cram.crai)")
    p.add_argument("-@", "--threads", type=int, default=2)
    _add_store_options(p, write=False)
    _add_snapshot_option(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="decode everything and check every checksum and count",
                       epilog=EPILOG_PATHS)
    p.add_argument("dataset")
    p.add_argument("-@", "--threads", type=int, default=2)
    _add_store_options(p, write=False)
    _add_snapshot_option(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("log", help="list the dataset's snapshots (its commits still kept)",
                       description="List the snapshots of DATASET, newest first: run id, commit time, records, "
                                   "bytes, source, and which one is current. --overwrite keeps --keep-snapshots "
                                   "of them; read one with --snapshot RUN_ID, make one current with rollback.",
                       epilog=EPILOG_PATHS)
    p.add_argument("dataset")
    p.add_argument("--json", action="store_true", help="a JSON list of objects (run_id, time, records, bytes, "
                                                       "source, current)")
    _add_store_options(p, write=False)
    p.set_defaults(func=cmd_log)

    p = sub.add_parser("rollback", help="make an earlier snapshot current again",
                       description="Make snapshot RUN_ID (see bams3 log) the current dataset, with one "
                                   "conditional write of the manifest: it fails, changing nothing, if another "
                                   "commit happened meanwhile.", epilog=EPILOG_PATHS)
    p.add_argument("dataset")
    p.add_argument("run_id", metavar="RUN_ID")
    _add_store_options(p, write=True)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("lifecycle", help="plan (or --apply) the S3 lifecycle rules for every dataset under a prefix",
                       description="Plan the lifecycle rules for every dataset under s3://bucket/prefix: at most 4 "
                                   "rules however many datasets (chunk and spill objects are tagged at upload; "
                                   "manifest, index and header stay STANDARD). Dry run by default: prints the rules "
                                   "and the changes as JSON. --apply merges them into the bucket's configuration "
                                   "(other rules are kept; bams3's earlier rules under the prefix are replaced). "
                                   "A value of 'off' leaves that rule out.", epilog=EPILOG_PATHS)
    p.add_argument("prefix", metavar="s3://bucket/prefix")
    p.add_argument("--apply", action="store_true", help="write the configuration to the bucket")
    p.add_argument("--transition-ia-days", type=_days_or_off, default=30, metavar="N",
                   help="chunks move to STANDARD_IA after N days (>= 30; default 30)")
    p.add_argument("--transition-glacier-ir-days", type=_days_or_off, default=90, metavar="N",
                   help="chunks move to GLACIER_IR after N days (default 90)")
    p.add_argument("--expire-tmp-days", type=_days_or_off, default=7, metavar="N",
                   help="spill leftovers of crashed conversions expire after N days (default 7)")
    p.add_argument("--abort-multipart-days", type=_days_or_off, default=7, metavar="N",
                   help="abort incomplete multipart uploads after N days (default 7)")
    p.add_argument("--expire-noncurrent-days", type=_days_or_off, default=30, metavar="N",
                   help="versioned buckets: noncurrent versions expire N days after replacement (default 30)")
    p.add_argument("--s3-region", metavar="REGION", help="bucket region")
    p.set_defaults(func=cmd_lifecycle, s3_concurrency=None)

    p = sub.add_parser("cost", help="price a dataset, or estimate one from a BAM/CRAM/SAM before migrating",
                       description="For a dataset: storage per class per month, a 1 kb region query (cold and warm "
                                   "cache), a whole read and its egress. For a BAM/CRAM/SAM file (local or s3://): "
                                   "the dataset it would become (from its record count and the benchmark's measured "
                                   "size ratio) and what that costs. Prices: AWS us-east-1 list prices.",
                       epilog=EPILOG_PATHS)
    p.add_argument("path", help="a dataset (directory or s3://bucket/prefix) or a BAM/CRAM/SAM file")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--egress", choices=["internet", "inter-region", "same-region"], default="internet",
                   help="where read bytes go (default internet)")
    p.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_BYTES, help=argparse.SUPPRESS)
    p.add_argument("-@", "--threads", type=int, default=2, help=argparse.SUPPRESS)
    _add_store_options(p, write=False)
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("restore", help="restore a dataset's archived (GLACIER/DEEP_ARCHIVE) chunks; again: progress",
                       description="Request a restore (RestoreObject) of every chunk of DATASET in GLACIER or "
                                   "DEEP_ARCHIVE that has none yet, and report how many are restored, in progress "
                                   "or not requested. Run it again to follow progress.", epilog=EPILOG_PATHS)
    p.add_argument("dataset", metavar="DATASET", help="s3://bucket/prefix")
    p.add_argument("--days", type=int, default=7, help="days the restored copies stay readable (default 7)")
    p.add_argument("--tier", choices=["Standard", "Bulk", "Expedited"], default="Standard",
                   help="retrieval tier (default Standard)")
    p.add_argument("--json", action="store_true", help="the counts as one JSON object")
    p.add_argument("-@", "--threads", type=int, default=2, help=argparse.SUPPRESS)
    _add_store_options(p, write=False)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("cleanup", help="remove what killed conversions left (dead runs only)",
                       description="Remove the objects and unfinished uploads of this dataset's dead runs: "
                                   "conversions that were killed or failed without cleaning up. A run is dead when "
                                   "its lease (runs/RUN.json) was not refreshed for 10 minutes, or, without a "
                                   "lease, when everything it left is over an hour old. Never touches the "
                                   "committed dataset, a run that may still be running, or any key that is not "
                                   "bams3's. Prints each key it removes.", epilog=EPILOG_PATHS)
    p.add_argument("dataset")
    p.add_argument("-n", "--dry-run", action="store_true", help="only print what would be removed")
    _add_store_options(p, write=False)
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("migrate", help="convert every BAM/SAM/CRAM under directories or S3 prefixes; skips done ones",
                       description="Convert every .bam/.sam/.sam.gz/.cram under each SRC (a directory, walked "
                                   "recursively; an s3://bucket/prefix; a file; or @LIST, a file naming one SRC per "
                                   "line) into DEST_PREFIX/<path relative to SRC>.bams3. A dataset whose manifest "
                                   "records the same source (size and mtime, or ETag) is skipped; a changed source is "
                                   "converted again. One failed file does not stop the others; the exit status is 1 "
                                   "if any failed.",
                       epilog=EPILOG_PATHS)
    p.add_argument("sources", nargs="+", metavar="SRC", help="directory, s3://bucket/prefix, file, or @LIST")
    p.add_argument("dest", metavar="DEST_PREFIX", help="local directory or s3://bucket/prefix")
    p.add_argument("-T", "--reference", help="reference FASTA (CRAM input)")
    p.add_argument("-@", "--threads", type=int, default=2, help="worker threads per conversion (default 2)")
    p.add_argument("-m", "--max-memory", type=_size, default="768M", help="sort memory per conversion (default 768M)")
    p.add_argument("--block-size", type=_size, default=DEFAULT_BLOCK_BYTES, help="as for convert")
    p.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_BYTES, help="as for convert")
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="print what would be done, with input bytes, estimated dataset bytes and monthly cost; "
                        "write nothing")
    p.add_argument("--delete-source", action="store_true",
                   help="delete each source file/object after its dataset was read back and compared record for "
                        "record with it (never anything else: not its index, not other files)")
    p.add_argument("--json", action="store_true", help="print the outcome of every file as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line on a terminal")
    _add_store_options(p, write=True)
    p.set_defaults(func=cmd_migrate)

    from .depth import add_depth_parser

    add_depth_parser(sub, _add_store_options, _add_snapshot_option, EPILOG_PATHS)

    p = sub.add_parser("serve", help="serve the datasets under a root over GA4GH htsget, with an igv.js view",
                       description="Serve every dataset under DATASET_ROOT: GA4GH htsget 1.3 reads as BAM at "
                                   "/reads/{id} (id: the dataset's path under the root), a list of the datasets at /, "
                                   "and an igv.js view at /view/{id}?locus=chr1:1000-2000. Stop it with Ctrl-C.",
                       epilog=EPILOG_PATHS)
    p.add_argument("root", metavar="DATASET_ROOT", help="a directory or s3://bucket/prefix holding datasets (or one dataset)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--fasta", metavar="FASTA", help="indexed reference FASTA (with .fai) for igv.js to show bases")
    p.add_argument("--max-locus", type=int, default=100_000, metavar="BP",
                   help="widest locus the view opens, in bp (default 100000)")
    _add_store_options(p, write=False)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="run the whole pipeline on a local S3 endpoint with a generated sample",
                       description="Start a local S3 endpoint (moto, 127.0.0.1), generate a sample BAM, convert it "
                                   "with the Prefect flow convert-to-s3 (ephemeral API), query a region and print "
                                   "stats straight from S3, and verify the dataset.")
    p.add_argument("--pairs", type=int, default=20000, help="read pairs in the sample (default 20000)")
    p.add_argument("--workdir", help="where to put the sample and cache (default: a new temp directory)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("warmup", help="compile and cache every numba kernel now (for container images)",
                       description="Run every command that uses a compiled kernel on a small generated input in "
                                   "a temporary directory, so that numba compiles each kernel once and stores it "
                                   "in its on-disk cache ($NUMBA_CACHE_DIR, else __pycache__ next to the sources "
                                   "if writable, else ~/.cache/numba, else $TMPDIR/bams3-numba-UID); later processes "
                                   "load them instead of "
                                   "compiling. Run it when building an image (docs/STARTUP.md).")
    p.add_argument("--json", action="store_true", help="the report as one JSON object (compiled, loaded, kernels)")
    p.add_argument("-@", "--threads", type=int, default=2)
    p.set_defaults(func=cmd_warmup)
    return ap


MMAP_THRESHOLD = 1 << 20  # glibc serves allocations from this size up with their own mmap
TRIM_THRESHOLD = 64 << 20  # free heap top kept before glibc trims it (its 128 KiB default costs ~10% CPU)


def _limit_malloc_arenas() -> None:
    """glibc gives each thread its own malloc arena; with encode/upload/inflate threads the
    freed buffers of a long conversion stay resident. Two arenas keep RSS near the live data.
    A fixed mmap threshold (glibc's own rises up to 32 MiB as big buffers are freed) keeps
    the sort's and the chunks' multi-MiB buffers out of the heap: freed, they go back to the
    system instead of staying resident as fragments."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX = -8
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD = -3
        libc.mallopt(-1, TRIM_THRESHOLD)  # M_TRIM_THRESHOLD = -1 (the heap is not trimmed at every free)
    except (OSError, AttributeError):
        pass


def _die_of_sigpipe() -> None:
    """Standard output was closed (`bams3 query DS | head`): end as samtools does, killed by
    SIGPIPE (status 141 in a shell), silently; nothing is flushed and no thread is waited for.
    Python ignores SIGPIPE (a write gets EPIPE instead); the default action is restored only
    here, so a reset S3 connection never kills the process."""
    import signal

    sys.stderr.flush()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    os._exit(128 + signal.SIGPIPE)  # not reached


#: seconds the interpreter gets to end after a failed or interrupted command before the process
#: ends without waiting any longer for threads (a worker pool's or an upload's) that would hang it
EXIT_GRACE = 10.0


def _bounded_exit(code: int) -> None:
    """After a failed or interrupted command, all that is left is the interpreter's exit, which
    joins threads (a process pool's manager thread, say) that a signal at the wrong moment can
    leave stuck. The command is over, so the exit is bounded: a daemon thread ends the process
    with ``code`` after :data:`EXIT_GRACE` seconds if it is still there."""
    import threading
    import time

    def end() -> None:
        time.sleep(EXIT_GRACE)
        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os._exit(code)

    threading.Thread(target=end, name="bams3-exit", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """The ``bams3`` program (``argv``: as called from Python, which keeps its process: no
    bounded exit)."""
    code = _main(list(sys.argv[1:] if argv is None else argv))
    if code and argv is None:
        _bounded_exit(code)
    return code


def _main(argv: list[str]) -> int:
    _limit_malloc_arenas()
    parser = build_parser()
    # `query -h` means "with header" (samtools); keep --help for help. Options may come between
    # regions, as with samtools (`bams3 query DS -c chr1 chr2`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) == "query" and not any(x.startswith("-") and x != "-" for x in extra):
            args.regions = list(args.regions) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, argv)
    except Bams3Error as e:
        print(f"bams3: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        _die_of_sigpipe()
    except KeyboardInterrupt:
        print("bams3: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the contract: one line, no traceback
        if os.environ.get("BAMS3_DEBUG"):
            raise
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # stdout on a full disk
            print(f"bams3: write failed: {e.strerror}", file=sys.stderr)
            return 1
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"bams3: internal error: {type(e).__name__}: {msg} (set BAMS3_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
