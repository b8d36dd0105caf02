"""Engine presets: options per engine, GPU memory class and model family; explicit options
win; `vlmq worker --print-engine-args` shows the choice and exits before anything starts;
the GPU sweep that the presets' values come from runs end to end on the fake engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmq.worker import cli
from vlmq.worker.engines import presets

ROOT = Path(__file__).resolve().parents[2]


def _qwen(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    return str(tmp_path)


def test_throughput_on_a_large_gpu_raises_the_batch_over_asyncllms_defaults(tmp_path: Path) -> None:
    got = presets.resolve("vllm", _qwen(tmp_path), "throughput", {}, 79.2)
    opts = presets.merged(got)
    assert got["model_family"] == "qwen2_vl" and got["memory_class"] == "large"
    assert int(opts["max_num_batched_tokens"]) > 2048 and int(opts["max_num_seqs"]) > 128
    small = presets.preset_options("vllm", "throughput", "qwen2_vl", 24.0)
    assert int(small["max_num_batched_tokens"]) < int(opts["max_num_batched_tokens"])


def test_explicit_options_win_key_by_key(tmp_path: Path) -> None:
    got = presets.resolve("vllm", _qwen(tmp_path), "throughput", {"max_num_seqs": "16"}, 139.8)
    assert presets.merged(got)["max_num_seqs"] == "16"
    assert "max_num_batched_tokens" in presets.merged(got)  # the rest of the preset stays
    assert got["overridden"] == ["max_num_seqs"]


def test_none_no_gpu_and_unmeasured_engines_add_nothing(tmp_path: Path) -> None:
    model = _qwen(tmp_path)
    assert presets.preset_options("vllm", "none", "qwen2_vl", 80.0) == {}
    assert presets.preset_options("vllm", "throughput", "qwen2_vl", None) == {}  # vLLM on the CPU
    assert presets.preset_options("fake", "throughput", None, 80.0) == {}
    assert presets.merged(presets.resolve("vllm", model, "latency", {"a": "1"}, None)) == {"a": "1"}


def test_family_options_apply_to_their_family_only(monkeypatch: pytest.MonkeyPatch) -> None:
    graphs = {"compilation_config": '{"cudagraph_mm_encoder":true}'}
    monkeypatch.setitem(presets.FAMILY_OPTIONS, ("vllm", "throughput", "qwen2_vl"), graphs)
    assert presets.preset_options("vllm", "throughput", "qwen2_vl", 80.0)["compilation_config"]
    assert "compilation_config" not in presets.preset_options("vllm", "throughput", "llava", 80.0)
    assert "compilation_config" not in presets.preset_options("vllm", "throughput", None, 80.0)
    assert presets.preset_options("vllm", "throughput", "qwen2_vl", None) == {}


def test_fp8_is_never_in_a_preset() -> None:
    tables = [*presets.TABLE.values(), *presets.FAMILY_OPTIONS.values()]
    assert all("quantization" not in t and "kv_cache_dtype" not in t for t in tables)


def test_model_family_reads_a_local_config_only(tmp_path: Path) -> None:
    assert presets.model_family(_qwen(tmp_path)) == "qwen2_vl"
    assert presets.model_family("Qwen/Qwen2-VL-7B-Instruct") is None and presets.model_family(None) is None


def test_print_engine_args_prints_the_choice_and_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(presets, "gpu_memory_gib", lambda: 79.2)
    model = _qwen(tmp_path)
    args = ["--engine", "vllm", "--model", model, "-e", "max_num_seqs=32", "--preset", "throughput"]
    args.append("--print-engine-args")
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["preset"] == "throughput" and shown["engine_args"]["max_num_seqs"] == "32"
    assert shown["engine_args"]["max_num_batched_tokens"] == shown["preset_options"]["max_num_batched_tokens"]
    none = json.loads(
        CliRunner().invoke(cli.app, [*args[:4], "--print-engine-args"]).output  # the default: none
    )
    assert none["engine_args"] == {} and none["preset_options"] == {}


def test_a_wrong_preset_is_refused() -> None:
    result = CliRunner().invoke(cli.app, ["--engine", "vllm", "--preset", "fastest", "--print-engine-args"])
    assert result.exit_code == 2


def test_the_gpu_sweep_dry_run_on_the_fake_engine(tmp_path: Path) -> None:
    """bench/gpu/sweep.py end to end on the CPU: a process per setting, gains over the
    defaults, the best BF16 setting, its flags for the photo bench, the docs' table."""
    sweep = [sys.executable, str(ROOT / "bench/gpu/sweep.py")]
    env = os.environ | {"VLMQ_BENCH_RESULTS": str(tmp_path), "VLMQ_BENCH_TAG": "dry", "TMPDIR": str(tmp_path)}
    run = [*sweep, "--engine", "fake", "--images", "4", "--sizes", "320x240", "--max-tokens", "4"]
    subprocess.run(
        [*run, "--settings", "default,seqs512,combo_fp8"], env=env, check=True, capture_output=True
    )
    result = json.loads((tmp_path / "gpu-sweep-dry.json").read_text())
    rows = {r["setting"]: r for r in result["rows"]}
    assert set(rows) == {"default", "seqs512", "combo_fp8"} and "partial" not in result["settings"]
    assert rows["combo_fp8"]["fp8"] and rows["default"]["gain_over_default"] == {"320x240": 1.0}
    assert result["settings"]["best_bf16"] in ("default", "seqs512")  # never the FP8 row
    flags = subprocess.run(
        [*sweep, "--best-args", str(tmp_path / "gpu-sweep-dry.json")],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert flags.stdout.startswith("--preset-name=sweep:")
    table = subprocess.run(
        [*sweep, "--table", str(tmp_path / "gpu-sweep-dry.json")],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert table.stdout.count("\n| ") == 3
