"""The generated mistake sweep (issue 40; the cases: tests/integration/sweep.py): every
command and every option of `vlmq`, walked from the command tree, with empty values,
values of the wrong type, unreachable addresses and a stopped stack. None may print a
traceback; each must exit with a documented code (README: 1 failed, 2 usage, 3
unreachable, 4 not found, 5 refused). About 20 s on 2 cores, in one process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DOCUMENTED = {1, 2, 3, 4, 5}
# Commands that need no service: with the stack stopped they still do their work.
NEED_NO_SERVICE = {"schema export", "stack down"}


def test_no_mistake_prints_a_traceback_or_an_undocumented_exit_code(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLMQ_", "AWS_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.sweep", str(tmp_path)],
        env={**env, "PYTHONPATH": os.getcwd()},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    commands = {r["command"] for r in rows}
    assert {"submit", "worker", "bulk cancel", "api serve", "dashboard", "stack up"} <= commands
    assert len(rows) > 100, len(rows)  # every option of every command, not a handful

    def wrong(r: dict[str, object]) -> bool:
        allowed = DOCUMENTED | (
            {0} if r["case"] == "stopped stack" and r["command"] in NEED_NO_SERVICE else set()
        )
        return bool(r["bug"] or r["traceback"] or r["code"] not in allowed)

    bad = [r for r in rows if wrong(r)]
    assert not bad, "\n".join(
        f"{r['command']} | {r['case']} | {r['code']} | {r['bug'] or r['tail']}" for r in bad
    )
    # What a user reads: the boundary's one line for each empty value, not a usage box.
    empties = [r for r in rows if r["case"].startswith("empty value")]
    assert empties and all("is empty: give it a value" in r["tail"] for r in empties)
    stopped = [r for r in rows if r["case"] == "stopped stack" and r["code"] == 3]
    assert len(stopped) >= 10 and all(
        "cannot reach" in r["tail"] or "VLMQ_TANSU_BIN" in r["tail"] for r in stopped
    )
