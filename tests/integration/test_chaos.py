"""The reduced chaos runs (bench/chaos.py) in CI: 1,500 jobs, 2 workers, 2 kill -9s, a broker
stall, a Redis restart and an S3 outage; and on a Redis Cluster 1,500 jobs in 3 batches, a
worker and the busiest master killed -9. Nothing lost, duplicated or wrong, and the batch
counters equal the jobs' states. The full runs are committed under bench/results/chaos-*.json."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _chaos(name: str, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")}
    env["VLMQ_BENCH_TAG"] = "ci"  # its result file goes to bench/results/<name>-ci.json
    cmd = [sys.executable, str(ROOT / "bench" / "chaos.py"), "--workers", "2", "--timeout-s", "240"]
    proc = subprocess.run(
        [*cmd, "--name", name, *args], env=env, capture_output=True, text=True, timeout=400, check=False
    )
    summary = proc.stdout[proc.stdout.find("jobs: ") :]
    assert proc.returncode == 0, summary + proc.stderr[-2000:]
    assert (
        "lost: 0 | duplicated: 0 | wrong: 0 | counter_mismatches: 0 | partitions_committed_past_end: 0"
        in summary
    )
    (ROOT / "bench" / "results" / f"{name}-ci.json").unlink(missing_ok=True)  # CI leaves no files


def test_reduced_chaos_run_loses_and_duplicates_nothing() -> None:
    _chaos(
        "chaos-ci", "--jobs", "1500", "--kills", "2", "--stall-s", "5", "--s3-outage-s", "3", "--gap-s", "2"
    )


def test_reduced_chaos_run_on_a_redis_cluster_survives_a_master_failover() -> None:
    _chaos(
        "chaos-cluster-ci",
        *("--redis-cluster", "--jobs", "1500", "--batches", "3", "--kills", "1"),
        *("--stall-s", "0", "--s3-outage-s", "0", "--gap-s", "3"),
    )
