"""The reduced failover bench (bench/failover.py) in CI: 2,000 jobs on a 3+3 Redis Cluster,
the busiest master killed -9 (a worker killed 8 s into the outage), back after 10 s, then
its successor killed the same way, a broker stall; and 600 jobs through a master restarted
empty (no persistence) before a failover. The full run is bench/results/failover-cpu2.json.

Asserted: nothing lost, duplicated, wrongly failed or miscounted through the failovers and
the stall. The stall of unaffected shards is split by cause (docs/operations.md, "What a
failover costs the other shards"): the Redis failover alone against issue 37's 2 s target,
and the worker kill's consumer-group rebalance (tansu holds each rejoin about 3 s) against
8 s; on this shared 2-core box neither holds reliably yet, so a miss is an expected
failure, not a pass. The restart without
persistence is measured, not asserted (docs/operations.md, "Durability": vlmq does not
survive it)."""

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
    failover, kill = row["max_stall_unaffected_failover_s"], row["max_stall_unaffected_worker_kill_s"]
    if failover > 2 or kill > 8:
        pytest.xfail(
            f"unaffected shards stalled {failover} s by the failover (target 2 s), {kill} s by the kill"
        )
