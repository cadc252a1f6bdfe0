"""Bytes per stream of a converted dataset, against BAM and CRAM, and the codec's speed.

    python -m bench.streams SORTED.BAM REF.FA [--work DIR] [--json OUT]

Converts SORTED.BAM with ``bams3 convert`` (this checkout), sums each stream's bytes over
the index, writes CRAM 3.1/3.0 with and without the reference with samtools, and times
the block codec alone (encode and decode of every block, single thread, best of 2, in
CPU seconds of this process: the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _samtools() -> str:
    return shutil.which("samtools") or "samtools"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.streams")
    ap.add_argument("bam")
    ap.add_argument("ref")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-cram", action="store_true")
    a = ap.parse_args(argv)
    work = Path(a.work or os.environ.get("TMPDIR", "/tmp")) / "streams"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ds_dir = work / "ds"
    t = time.time()
    subprocess.run([sys.executable, "-m", "bams3.cli", "convert", a.bam, str(ds_dir), "--threads", "2"],
                   check=True, stderr=subprocess.DEVNULL)
    convert_s = time.time() - t

    from bams3.dataset import Dataset
    from bams3.store import open_store
    from bams3core.codec import STREAM_NAMES, BlockEncoder, decode_block

    ds = Dataset.open(open_store(str(ds_dir)))
    rows = ds.all_rows()
    per = np.zeros(len(STREAM_NAMES), dtype=np.int64)
    for r in rows:
        per += np.asarray(r["stream_sizes"], dtype=np.int64)[:len(STREAM_NAMES)]
    total = _du(ds_dir)
    out = {"bam": a.bam, "bam_bytes": os.path.getsize(a.bam), "dataset_bytes": total,
           "convert_seconds": round(convert_s, 2), "n_blocks": int(len(rows)),
           "streams": {n: int(v) for n, v in zip(STREAM_NAMES, per)}}

    # the codec alone: decode every block, then encode it again (single thread)
    chunk_files = sorted((ds_dir / "data").rglob("*.b3c"))
    by_chunk = {}
    for r in rows:
        by_chunk.setdefault(int(r["chunk"]), []).append(r)
    dec_t = []
    enc_t = []
    for rep in range(2):
        t = time.process_time()
        batches = []
        for c, rs in sorted(by_chunk.items()):
            data = chunk_files[c].read_bytes()
            for r in rs:
                o = int(r["offset"])
                batches.append(decode_block(data[o:o + int(r["length"])], r["stream_sizes"].tolist(),
                                            int(r["n_records"]), int(r["ref_id"]), int(r["first_start"])))
        dec_t.append(time.process_time() - t)
        enc = BlockEncoder()
        t = time.process_time()
        encoded = [enc.encode(b) for b in batches]
        enc_t.append(time.process_time() - t)
    for b, e in zip(batches, encoded):  # the codec round-trips every block
        back = decode_block(e.data, e.stream_sizes, e.n_records, e.ref_id, e.first_start, e.wide)
        assert back.data == b.data, "round trip differs"
    raw_bytes = sum(len(b.data) for b in batches)
    out["codec"] = {"raw_bytes": raw_bytes, "encode_MBps": round(raw_bytes / min(enc_t) / 1e6, 1),
                    "decode_MBps": round(raw_bytes / min(dec_t) / 1e6, 1)}

    if not a.no_cram:
        st = _samtools()
        crams = {}
        for label, opts in (("cram31_noref", ["--output-fmt-option", "version=3.1", "--output-fmt-option", "no_ref=1"]),
                            ("cram31_ref", ["--output-fmt-option", "version=3.1", "-T", a.ref]),
                            ("cram30_noref", ["--output-fmt-option", "version=3.0", "--output-fmt-option", "no_ref=1"])):
            p = work / f"{label}.cram"
            subprocess.run([st, "view", "-@2", "-C", *opts, "-o", str(p), a.bam], check=True)
            crams[label] = p.stat().st_size
        out["cram"] = crams

    print(f"{'stream':8} {'bytes':>12} {'share':>7}")
    for n, v in out["streams"].items():
        print(f"{n:8} {v:12,} {v / max(1, per.sum()):7.1%}")
    print(f"{'sum':8} {int(per.sum()):12,}   dataset {total:,} B, BAM {out['bam_bytes']:,} B "
          f"({total / out['bam_bytes']:.3f}x BAM)")
    for k, v in out.get("cram", {}).items():
        print(f"vs {k:14} {v:12,} B  ratio {total / v:.3f}x")
    print(f"codec: encode {out['codec']['encode_MBps']} MB/s, decode {out['codec']['decode_MBps']} MB/s "
          f"(raw BAM records, 1 thread); convert {convert_s:.1f}s")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
