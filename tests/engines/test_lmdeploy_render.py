"""LMDeploy's renderer in the worker's image processes, on the CPU (its engines need a GPU;
its front end, where the renderer comes from, does not): tests/cpu_engines/lmdeploy_render_check.py
runs in the CPU engines venv, where LMDeploy is installed without its GPU engines' needs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.engines.test_engines_cpu import ENV, PYTHON, ROOT, pytestmark, tiny_models

__all__ = ["pytestmark", "tiny_models"]  # the lane's skip mark and model fixture, shared


def test_lmdeploy_renderer_in_processes_matches_its_front_end(tiny_models: Callable[[str], Path]) -> None:
    model = tiny_models("tiny-qwen2-vl")
    run = subprocess.run(
        [PYTHON, "tests/cpu_engines/lmdeploy_render_check.py", str(model)],
        check=False,
        cwd=ROOT,
        env=os.environ | ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "same as LMDeploy's front end" in run.stdout
    assert run.stdout.count("image tokens") == 3
