"""The reduced failover bench (bench/failover.py) in CI: 2,000 jobs on a 3+3 Redis Cluster,
the busiest master killed -9 (a worker killed 8 s into the outage), back after 10 s, then
its successor killed the same way, a broker stall; and 600 jobs through a master restarted
empty (no persistence) before a failover. The full run is bench/results/failover-cpu2.json.

Asserted: nothing lost, duplicated, wrongly failed or miscounted through the failovers and
the stall. The restart without persistence is measured, not asserted (docs/operations.md,
"Durability": vlmq does not survive it). Jobs of unaffected shards stalling longer than 2 s
is issue 37's target that redis-py's cluster client does not meet yet: an expected failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULT = ROOT / "bench" / "results" / "failover-ci-ci.json"


def test_reduced_failover_bench_loses_duplicates_and_fails_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")}
    env["VLMQ_BENCH_TAG"] = "ci"  # its result file: bench/results/failover-ci-ci.json
    cmd = [sys.executable, str(ROOT / "bench" / "failover.py"), "--name", "failover-ci"]
    cmd += ["--jobs", "2000", "--down-s", "10", "--persistence-off-jobs", "600", "--settle-s", "20"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert RESULT.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads(RESULT.read_text())
    RESULT.unlink()  # CI leaves no files
    summary = {
        k: row[k] for k in ("lost", "duplicated", "wrongly_failed", "wrong_answers", "counter_mismatches")
    }
    assert summary == dict.fromkeys(summary, 0), row
    assert row["partitions_committed_past_end"] == 0
    assert row["completions_heard"] == row["jobs"]
    assert row["persistence_off"]["duplicated"] == 0  # what it loses is measured, not asserted
    if row["max_stall_unaffected_s"] > 2:
        pytest.xfail(f"unaffected shards stalled {row['max_stall_unaffected_s']} s (target 2 s): issue 37")
