"""The reduced chaos run (bench/chaos.py) in CI: 1,500 jobs, 2 workers, 2 kill -9s, a broker
stall, a Redis restart and an S3 outage; nothing lost, duplicated or wrong. The full run
(10,000 jobs, 3 workers, 5 kills, 20 s stall, 10 s S3 outage) is committed under
bench/results/chaos-*.json."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_reduced_chaos_run_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")}
    env["VLMQ_BENCH_TAG"] = "ci"  # its result file goes to bench/results/chaos-ci-ci.json
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "chaos.py"),
            "--jobs",
            "1500",
            "--workers",
            "2",
            "--kills",
            "2",
            "--stall-s",
            "5",
            "--s3-outage-s",
            "3",
            "--gap-s",
            "2",
            "--timeout-s",
            "240",
            "--name",
            "chaos-ci",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    summary = proc.stdout[proc.stdout.find("jobs: ") :]
    assert proc.returncode == 0, summary + proc.stderr[-2000:]
    assert "lost: 0 | duplicated: 0 | wrong: 0 | partitions_committed_past_end: 0" in summary
    (ROOT / "bench" / "results" / "chaos-ci-ci.json").unlink(missing_ok=True)  # CI leaves no files
