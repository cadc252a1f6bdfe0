"""The `bams3` command line: convert, query, stats, export, verify, cleanup.

Conventions follow samtools: SAM on stdout so commands pipe, regions in samtools syntax,
errors as one line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
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
    g.add_argument("--s3-region", metavar="REGION", help="bucket region (default: discovered from the bucket)")
    g.add_argument("--s3-concurrency", type=int, metavar="N",
                   help="parallel S3 requests (default: 2 x --threads)")
    if write:
        g.add_argument("--s3-part-size", type=_size, default=None, metavar="SIZE",
                       help="multipart part size, 5M..5G (default 10M)")
        g.add_argument("--s3-storage-class", "--storage-class", dest="storage_class", metavar="CLASS",
                       help="S3 storage class for chunk objects (e.g. STANDARD, INTELLIGENT_TIERING, STANDARD_IA)")
        g.add_argument("--sse", choices=["AES256", "aws:kms"], help="server-side encryption")
        g.add_argument("--sse-kms-key-id", metavar="KEY", help="KMS key for --sse aws:kms")
    else:
        g.add_argument("--no-cache", action="store_true",
                       help="do not use the local metadata cache (manifest/index/header)")
        g.add_argument("--cache-dir", metavar="DIR", help="metadata cache (default $BAMS3_CACHE_DIR or ~/.cache/bams3)")


def _open_store(uri: str, args, *, write: bool):
    from .store import open_store

    threads = getattr(args, "threads", 2) or 2
    opts = dict(region=getattr(args, "s3_region", None),
                concurrency=getattr(args, "s3_concurrency", None) or 2 * threads)
    if write:
        opts.update(part_size=getattr(args, "s3_part_size", None), storage_class=getattr(args, "storage_class", None),
                    sse=getattr(args, "sse", None), sse_kms_key_id=getattr(args, "sse_kms_key_id", None))
    else:
        opts.update(use_cache=not getattr(args, "no_cache", False), cache_dir=getattr(args, "cache_dir", None))
    return open_store(uri, **opts)


def _pg_line(argv: list[str]) -> str:
    return (f"@PG\tID:bams3\tPN:bams3\tVN:{__version__}\tCL:" + " ".join(shlex.quote(a) for a in ["bams3"] + argv))


# -- commands ---------------------------------------------------------------------------
def cmd_convert(args, argv) -> int:
    from .convert import ConvertOptions, convert, stderr_progress

    if args.dest.startswith("s3://") is False and os.path.isfile(args.dest):
        raise InputError(f"{args.dest}: exists and is a file; DEST must be a directory or s3://bucket/prefix")
    opts = ConvertOptions(reference=args.reference, threads=args.threads, max_memory=args.max_memory,
                          block_bytes=args.block_size, chunk_bytes=args.chunk_size, overwrite=args.overwrite,
                          upload_concurrency=args.s3_concurrency,
                          progress=None if args.quiet else stderr_progress)
    with _open_store(args.dest, args, write=True) as store:
        res = convert(args.input, store, opts)
    m = res.manifest
    size = sum(c.size for c in m.chunks) + sum(i.size for i in m.index) + m.header.size
    if not args.quiet:
        print(f"bams3: wrote {res.records} records to {args.dest} in {res.seconds:.1f} s "
              f"({res.records / max(res.seconds, 1e-9):.0f} records/s; {len(m.chunks)} chunks, "
              f"{size / 1e6:.2f} MB)", file=sys.stderr)
    return 0


def _open_dataset(args):
    from .dataset import Dataset

    store = _open_store(args.dataset, args, write=False)
    return Dataset.open(store, threads=args.threads)


def cmd_query(args, argv) -> int:
    from .output import write_bam, write_sam

    ds = _open_dataset(args)
    regions = [ds.parse_region(r) for r in args.regions] if args.regions else None
    if regions is not None and args.multi_region:
        batches = ds.query_union(regions)
    else:
        batches = ds.query(regions)
    pg = None if args.no_PG else _pg_line(argv)
    if args.count:
        n = sum(len(b) for b in batches)
        _write_text(args.output, f"{n}\n")
    elif args.header_only:
        _write_text(args.output, ds.header_text() + ("" if not pg else pg + "\n"))
    elif args.bam:
        if not args.output:
            raise InputError("-b needs -o FILE (or -o - for stdout)")
        write_bam(ds.bam_header(), batches, args.output, threads=args.threads, index=args.output != "-",
                  pg_line=pg)
    else:
        header = ds.bam_header() if args.with_header else ds.header
        if args.output and args.output != "-":
            with open(args.output, "wb") as f:
                write_sam(header, batches, f, with_header=args.with_header, pg_line=pg)
        else:
            write_sam(header, batches, sys.stdout.buffer, with_header=args.with_header, pg_line=pg)
            sys.stdout.buffer.flush()
    if args.verbose:
        q = ds.qstats
        print(f"bams3: {q.requests} data requests, {q.bytes} bytes, {q.blocks} blocks, "
              f"{q.records_decoded} records decoded, {q.records_out} returned", file=sys.stderr)
    return 0


def _write_text(path, text: str) -> None:
    if path and path != "-":
        with open(path, "w") as f:
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
    from .output import write_bam

    ds = _open_dataset(args)
    regions = [ds.parse_region(r) for r in args.region] if args.region else None
    batches = ds.query_union(regions) if regions else ds.query(None)
    write_bam(ds.bam_header(), batches, args.output, threads=args.threads,
              index=args.output != "-" and not args.no_index)
    return 0


def cmd_verify(args, argv) -> int:
    from .verify import verify_dataset

    ds = _open_dataset(args)
    rep = verify_dataset(ds)
    for p in rep.problems:
        print(f"bams3: {p}", file=sys.stderr)
    print(rep.summary(), file=sys.stdout if rep.ok else sys.stderr)
    return 0 if rep.ok else 1


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


def cmd_demo(args, argv) -> int:
    from .demo import run_demo

    return run_demo(n_pairs=args.pairs, workdir=args.workdir)


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
    p.add_argument("-@", "--threads", type=int, default=2, help="worker threads (default 2)")
    p.add_argument("-m", "--max-memory", type=_size, default="768M",
                   help="memory for sorting unsorted input before spilling runs (default 768M)")
    p.add_argument("--block-size", type=_size, default=DEFAULT_BLOCK_BYTES,
                   help=f"raw bytes of records per block, the unit of decoding (default {DEFAULT_BLOCK_BYTES // 1024}K)")
    p.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_BYTES,
                   help=f"compressed bytes per chunk object, the unit of upload (default {DEFAULT_CHUNK_BYTES >> 20}M)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at DEST")
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
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("export", help="write the dataset (or regions) back to BAM + BAI",
                       description="Write a BAM whose `samtools view --no-PG -h` text equals the source's.",
                       epilog=EPILOG_PATHS)
    p.add_argument("dataset")
    p.add_argument("output", help="OUT.bam, or - for stdout")
    p.add_argument("--region", action="append", metavar="R", help="only records overlapping R (repeatable)")
    p.add_argument("--no-index", action="store_true", help="do not write OUT.bam.bai")
    p.add_argument("-@", "--threads", type=int, default=2)
    _add_store_options(p, write=False)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="decode everything and check every checksum and count",
                       epilog=EPILOG_PATHS)
    p.add_argument("dataset")
    p.add_argument("-@", "--threads", type=int, default=2)
    _add_store_options(p, write=False)
    p.set_defaults(func=cmd_verify)

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

    p = sub.add_parser("demo", help="run the whole pipeline on a local S3 endpoint with a generated sample",
                       description="Start a local S3 endpoint (moto, 127.0.0.1), generate a sample BAM, convert it "
                                   "with the Prefect flow convert-to-s3 (ephemeral API), query a region and print "
                                   "stats straight from S3, and verify the dataset.")
    p.add_argument("--pairs", type=int, default=20000, help="read pairs in the sample (default 20000)")
    p.add_argument("--workdir", help="where to put the sample and cache (default: a new temp directory)")
    p.set_defaults(func=cmd_demo)
    return ap


def _limit_malloc_arenas() -> None:
    """glibc gives each thread its own malloc arena; with encode/upload/inflate threads the
    freed buffers of a long conversion stay resident. Two arenas keep RSS near the live data."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX = -8
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
        try:
            sys.stdout = None  # type: ignore[assignment]
        except Exception:  # noqa: BLE001
            pass
        os._exit(141)
    except KeyboardInterrupt:
        print("bams3: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the contract: one line, no traceback
        if os.environ.get("BAMS3_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"bams3: internal error: {type(e).__name__}: {msg} (set BAMS3_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
