"""The README's first command, short form: the demo runs and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmq.cli",
            "demo",
            "--images",
            "3",
            "--engine",
            "fake",
            "--state-dir",
            str(tmp_path / "demo"),
        ],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("succeeded") == 3
    assert not (tmp_path / "demo" / "stack.json").exists()  # the demo stopped its stack
