"""The benchmark harness must keep running: `python -m bench --quick` on a small dataset.

PASS/FAIL of the performance bars does not fail this test (performance lives in bench/,
measured as ratios in one run); a crash of the harness or of a bams3 command does.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick(tmp_path):
    env = dict(os.environ, BAMS3_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path / "results")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = (tmp_path / "results" / "quick.md").read_text()
    assert "| figure | bams3 | anchor | ratio | goal | pass |" in report
    assert "size" in report and "query 1 kb" in report and "stats from S3" in report
    assert "output identical to samtools view | yes" in report
