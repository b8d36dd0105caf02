"""The reduced poison run (bench/poison.py) in CI: 1,500 fuzzed messages and 1,000 fuzzed
images (every format Pillow writes here, mutated) through one real worker: it never exits,
every job a message names ends exactly once, the rest write nothing, good jobs succeed.
The full run (100,000 + 100,000) is committed under bench/results/poison-*.json."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_reduced_poison_run_keeps_every_invariant() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")}
    env["VLMQ_BENCH_TAG"] = "ci"  # its result file goes to bench/results/poison-ci-ci.json
    args = [
        "--messages",
        "1500",
        "--images",
        "1000",
        "--timeout-s",
        "240",
        "--name",
        "poison-ci",
        "--seed",
        "7",
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "poison.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    summary = proc.stdout[proc.stdout.find("named_jobs") :][:600]
    assert proc.returncode == 0, summary + proc.stderr[-2000:]
    for kept in (
        "non_terminal: 0",
        "duplicate_terminal_writes: 0",
        "worker_exits: 0",
        "good_jobs_not_succeeded: 0",
    ):
        assert kept in summary, summary
    (ROOT / "bench" / "results" / "poison-ci-ci.json").unlink(missing_ok=True)  # CI leaves no files
