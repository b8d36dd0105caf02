"""The reduced forgery corpus (bench/forgery.py) in CI: 60 forged Kafka messages, every
family in turn (id reuse of ended and queued jobs, strangers' jobs naming the victim's
batch, invalid bodies, garbage, keys, headers, id look-alikes, re-encodings), through one
real worker on a private stack; then 30 requests to a real `vlmq api` (the victim's batch,
files, jobs and thumbnails with another tenant's key or session, the victim's key as a
cookie, none; lists; the victim's own session from a hostile origin). After each: no job
or batch of the victim changed, nothing was accepted or shown that must not be; the
worker never exits; the victim's queued jobs then run as submitted and its batch counts
exactly. The full run is committed as bench/results/forgery-cpu2.json."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_reduced_forgery_corpus_changes_nothing_of_the_victim(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")}
    env["VLMQ_BENCH_RESULTS"] = str(tmp_path)  # CI leaves no result file in the checkout
    args = ["--cases", "60", "--api-cases", "30", "--seed", "7", "--name", "forgery-ci"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "forgery.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    summary = proc.stdout[proc.stdout.find("cases:") :][:800]
    diffs = proc.stdout[proc.stdout.find('"first_diffs"') :][:4000]
    for kept in ("victim_changes: 0 ", "api_wrong_answers: 0 ", "worker_exits: 0 ", "unhandled: 0 "):
        assert kept in summary, summary + "\n" + diffs
    for kept in ("dead_letter_mismatch: 0 ", "queued_victims_wrong: []", "batch_counts_exact: True"):
        assert kept in summary, summary + "\n" + diffs
    assert "genuine_job_ok: True" in summary, summary
    assert proc.returncode == 0, summary + proc.stderr[-2000:]
