"""Engine presets: the engine options vlmq picks when the operator names none, per engine,
model family and GPU memory class. Options the operator gives (`-e`, `--flag`) always win,
key by key.

- `throughput` (the worker's default: a backlog on the jobs topic): the batch sizes vLLM
  itself picks for offline batch work (its `LLM` class) on such a GPU;
- `latency` (online topics): the token budget vLLM itself picks for `vllm serve`, and vLLM's
  engine default of 128 sequences (shorter decode steps than a backlog's batches);
- `none`: the engine's own defaults.

Why: vlmq starts vLLM as `AsyncLLM.from_engine_args`, vLLM's "engine" usage context, which
has no batch defaults of its own and falls back to 2048 tokens and 128 sequences a step
(vllm/engine/arg_utils.py, get_batch_defaults, 0.26); a Qwen2-VL photo is 1,000-1,330 prompt
tokens, so a step took in one or two photos. The values below are vLLM's own for its other
contexts, not yet measured on this workload: bench/gpu/sweep.py measures them and the other
settings (encoder CUDA graphs, FP8, ...), and its table replaces these where it shows better
(docs/performance.md, "Engine presets"). Per-family options (FAMILY_OPTIONS) stay empty
until a sweep of that family shows a gain.

FP8 (`quantization=fp8`, `kv_cache_dtype=fp8`) changes answers: never in a preset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

PresetName = Literal["throughput", "latency", "none"]
PRESETS: tuple[PresetName, ...] = ("throughput", "latency", "none")
# GPU memory classes: vLLM switches its own defaults at 70 GiB (H100/H200 class, A100 apart).
MemoryClass = Literal["large", "small", "unknown"]
LARGE_GIB = 70.0

# (engine, preset, memory class) -> options for every model family.
TABLE: dict[tuple[str, PresetName, MemoryClass], dict[str, str]] = {
    # vLLM's LLM-class (offline batch) defaults for these GPUs.
    ("vllm", "throughput", "large"): {"max_num_batched_tokens": "16384", "max_num_seqs": "1024"},
    ("vllm", "throughput", "small"): {"max_num_batched_tokens": "8192", "max_num_seqs": "256"},
    # vLLM's `vllm serve` token budget for these GPUs (2048 below 70 GiB: the engine default).
    ("vllm", "latency", "large"): {"max_num_batched_tokens": "8192"},
}
# (engine, preset, model_type) -> options added for that family only (measured gains only).
FAMILY_OPTIONS: dict[tuple[str, PresetName, str], dict[str, str]] = {}


def memory_class(gib: float | None) -> MemoryClass:
    if gib is None:
        return "unknown"
    return "large" if gib >= LARGE_GIB else "small"


def preset_options(
    engine: str, preset: PresetName, family: str | None, gpu_gib: float | None
) -> dict[str, str]:
    """What `preset` sets for this engine, model family and GPU (empty: no entry,
    and nothing where no GPU was found: vLLM on the CPU keeps its own defaults)."""
    if preset == "none" or memory_class(gpu_gib) == "unknown":
        return {}
    options = dict(TABLE.get((engine, preset, memory_class(gpu_gib)), {}))
    return options | FAMILY_OPTIONS.get((engine, preset, family or ""), {})


def merge(preset: dict[str, str], explicit: dict[str, str]) -> dict[str, str]:
    """The preset's options under the operator's: an explicit option wins, key by key."""
    return preset | explicit


def model_family(model: str | None) -> str | None:
    """The model's `model_type` from a local checkpoint's config.json; None where there is
    no local config to read (a hub id is not fetched here: family options are left off)."""
    if not model:
        return None
    config = Path(model) / "config.json"
    try:
        value = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        return None
    return str(value) if value else None


def gpu_memory_gib() -> float | None:
    """GPU 0's memory in GiB from NVML (vLLM brings nvidia-ml-py); None without one."""
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]

        pynvml.nvmlInit()
        try:
            total = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total
        finally:
            pynvml.nvmlShutdown()
        return round(float(total) / 2**30, 1)
    except Exception:  # no NVML, no driver, no GPU: the class is "unknown"
        return None


def merged(resolved: dict[str, object]) -> dict[str, str]:
    """The engine options of a `resolve` answer."""
    options = resolved["engine_args"]
    assert isinstance(options, dict)
    return {str(k): str(v) for k, v in options.items()}


def resolve(
    engine: str, model: str | None, preset: PresetName, explicit: dict[str, str], gpu_gib: float | None
) -> dict[str, object]:
    """The engine options a worker starts with, and where each came from (what
    `vlmq worker --print-engine-args` shows)."""
    family = model_family(model)
    chosen = preset_options(engine, preset, family, gpu_gib)
    return {
        "engine": engine,
        "model": model,
        "preset": preset,
        "model_family": family,
        "gpu_memory_gib": gpu_gib,
        "memory_class": memory_class(gpu_gib),
        "preset_options": chosen,
        "explicit_options": explicit,
        "overridden": sorted(set(chosen) & set(explicit)),
        "engine_args": merge(chosen, explicit),
    }
