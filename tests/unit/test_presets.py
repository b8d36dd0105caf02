"""Engine presets: measured options per engine, family and GPU class; explicit options win;
`vlmq worker --print-engine-args` shows the choice and exits before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmq.worker import cli
from vlmq.worker.engines import presets


def _qwen(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    return str(tmp_path)


def test_throughput_on_a_large_gpu_raises_the_batch_and_adds_encoder_graphs(tmp_path: Path) -> None:
    got = presets.resolve("vllm", _qwen(tmp_path), "throughput", {}, 79.2)
    opts = presets.merged(got)
    assert got["model_family"] == "qwen2_vl" and got["memory_class"] == "large"
    assert int(opts["max_num_batched_tokens"]) > 2048  # AsyncLLM's own default
    assert json.loads(opts["compilation_config"]) == {"cudagraph_mm_encoder": True}


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


def test_encoder_graphs_only_for_families_that_have_them() -> None:
    assert "compilation_config" not in presets.preset_options("vllm", "throughput", "llava", 80.0)
    assert "compilation_config" not in presets.preset_options("vllm", "throughput", None, 80.0)


def test_fp8_is_never_in_a_preset() -> None:
    for engine, name, gpu in presets.TABLE:
        for family in (*presets.ENCODER_GRAPH_FAMILIES, None):
            opts = presets.preset_options(engine, name, family, 80.0 if gpu == "large" else 24.0)
            assert "quantization" not in opts and "kv_cache_dtype" not in opts


def test_model_family_reads_a_local_config_only(tmp_path: Path) -> None:
    assert presets.model_family(_qwen(tmp_path)) == "qwen2_vl"
    assert presets.model_family("Qwen/Qwen2-VL-7B-Instruct") is None and presets.model_family(None) is None


def test_print_engine_args_prints_the_choice_and_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(presets, "gpu_memory_gib", lambda: 79.2)
    model = _qwen(tmp_path)
    args = ["--engine", "vllm", "--model", model, "-e", "max_num_seqs=32", "--print-engine-args"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["preset"] == "throughput" and shown["engine_args"]["max_num_seqs"] == "32"
    assert shown["engine_args"]["max_num_batched_tokens"] == shown["preset_options"]["max_num_batched_tokens"]
    none = json.loads(
        CliRunner().invoke(cli.app, [*args[:4], "--preset", "none", "--print-engine-args"]).output
    )
    assert none["engine_args"] == {} and none["preset_options"] == {}


def test_a_wrong_preset_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.app, ["--engine", "vllm", "--preset", "fastest", "--print-engine-args"])
    assert result.exit_code == 2
