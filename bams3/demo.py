"""`bams3 demo`: the main job end to end on an embedded default.

Starts a local S3 endpoint (moto's server on 127.0.0.1), generates a sample paired-end BAM,
runs the Prefect flow ``convert-to-s3`` on Prefect's ephemeral API, then queries a region
and prints stats straight from S3, checks the region against samtools, and verifies the
dataset. Nothing leaves the machine; everything it starts is stopped at the end.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_demo(n_pairs: int = 20000, workdir: str | None = None) -> int:
    try:
        from bams3.testing.s3server import start_moto_server
    except ImportError:  # pragma: no cover
        print("bams3: the demo needs moto's server: pip install 'bams3[demo]'", file=sys.stderr)
        return 2
    import boto3
    import pysam

    from bams3.sample import make_sample

    tmp = workdir or tempfile.mkdtemp(prefix="bams3-demo-")
    os.makedirs(tmp, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the ephemeral API server starts in a subprocess; give a busy 2-core machine time
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_HOME", os.path.join(tmp, "prefect-home"))
    _say(f"working in {tmp}")
    t = time.time()
    paths = make_sample(os.path.join(tmp, "sample"), n_pairs=n_pairs, seed=1)
    _say(f"sample BAM with {2 * n_pairs} reads: {paths['bam']} ({os.path.getsize(paths['bam']) / 1e6:.1f} MB, "
         f"{time.time() - t:.1f} s)")

    server = start_moto_server()
    try:
        os.environ.update({"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "demo",
                           "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1",
                           "BAMS3_CACHE_DIR": os.path.join(tmp, "cache")})
        boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket="demo")
        dest = "s3://demo/sample.bams3"
        _say(f"local S3 endpoint {server.endpoint}; converting with the Prefect flow convert-to-s3 -> {dest}")
        from flows import convert_to_s3

        t = time.time()
        result = convert_to_s3(source=paths["bam"], destination=dest)
        _say(f"converted in {time.time() - t:.1f} s: {result}")

        from bams3.dataset import Dataset
        from bams3.output import write_sam
        from bams3.store import open_store
        from bams3.verify import verify_dataset
        from bams3core.stats import flagstat_text, idxstats_rows, idxstats_text

        store = open_store(dest)
        ds = Dataset.open(store)
        m = ds.manifest
        size = sum(c.size for c in m.chunks) + sum(i.size for i in m.index) + m.header.size
        _say(f"dataset: {m.n_records} records, {len(m.chunks)} chunks, {size / 1e6:.2f} MB "
             f"({size / os.path.getsize(paths['bam']):.2f}x the BAM)")
        print("== bams3 stats (from the manifest alone) ==")
        print(flagstat_text(m.stats["flagstat"]), end="")
        print(idxstats_text(idxstats_rows([r["name"] for r in m.references], [r["length"] for r in m.references],
                                          m.stats["mapped"], m.stats["unmapped"], m.stats["unplaced"])), end="")
        region = f"{m.references[0]['name']}:20,000-21,000"
        out = io.BytesIO()
        n = write_sam(ds.header, ds.query([ds.parse_region(region)]), out, with_header=False)
        text = out.getvalue().decode()
        want = pysam.samtools.view(paths["bam"], region.replace(",", ""))
        q = ds.qstats
        print(f"== bams3 query {dest} {region} ==")
        print("\n".join(text.splitlines()[:3]) + ("\n..." if n > 3 else ""))
        print(f"{n} records, {q.requests} ranged GET(s), {q.bytes} bytes; identical to samtools view: {text == want}")
        rep = verify_dataset(ds)
        print(rep.summary())
        store.close()
        return 0 if (text == want and rep.ok) else 1
    finally:
        server.stop()
