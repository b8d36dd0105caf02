"""Engine presets: the engine options vlmq picks when the operator names none, per engine,
model family and GPU memory class, from the sweep in bench/gpu/sweep.py (its table is in
docs/performance.md, "Engine presets"). Options the operator gives (`-e`, `--flag`) always
win, key by key.

- `throughput` (the worker's default: a backlog on the jobs topic): the settings that gave
  the most images/s on the sweep, BF16 only;
- `latency` (online topics): the same engine-side speed-ups that shorten one request
  (vision-encoder CUDA graphs), without the larger batches that raise queueing under load;
- `none`: the engine's own defaults.

FP8 (`quantization=fp8`, `kv_cache_dtype=fp8`) changes answers: never in a preset; the
sweep measures it as an opt-in row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

PresetName = Literal["throughput", "latency", "none"]
PRESETS: tuple[PresetName, ...] = ("throughput", "latency", "none")
# GPU memory classes: vLLM itself switches its defaults at 70 GiB (H100/H200 class).
MemoryClass = Literal["large", "small", "unknown"]
LARGE_GIB = 70.0

# Families whose vision encoder vLLM 0.26 can run as CUDA graphs (`cudagraph_mm_encoder`;
# read from the wheel: the model classes that implement its encoder-graph interface).
ENCODER_GRAPH_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl_chat", "glm4v"})
_ENCODER_GRAPHS = '{"cudagraph_mm_encoder":true}'

# (engine, preset, memory class) -> options for every family; encoder graphs are added per
# family below. Values: docs/performance.md's sweep table (Qwen2-VL-7B size, vLLM 0.26).
TABLE: dict[tuple[str, PresetName, MemoryClass], dict[str, str]] = {
    ("vllm", "throughput", "large"): {"max_num_batched_tokens": "16384", "max_num_seqs": "512"},
    ("vllm", "throughput", "small"): {"max_num_batched_tokens": "8192", "max_num_seqs": "256"},
    ("vllm", "latency", "large"): {"max_num_batched_tokens": "8192"},
    ("vllm", "latency", "small"): {"max_num_batched_tokens": "4096"},
}


def memory_class(gib: float | None) -> MemoryClass:
    if gib is None:
        return "unknown"
    return "large" if gib >= LARGE_GIB else "small"


def preset_options(
    engine: str, preset: PresetName, family: str | None, gpu_gib: float | None
) -> dict[str, str]:
    """What `preset` sets for this engine, model family and GPU (empty: nothing measured,
    and nothing where no GPU was found: vLLM on the CPU keeps its own defaults)."""
    if preset == "none" or memory_class(gpu_gib) == "unknown":
        return {}
    options = dict(TABLE.get((engine, preset, memory_class(gpu_gib)), {}))
    if engine == "vllm" and family in ENCODER_GRAPH_FAMILIES:
        options["compilation_config"] = _ENCODER_GRAPHS
    return options


def merge(preset: dict[str, str], explicit: dict[str, str]) -> dict[str, str]:
    """The preset's options under the operator's: an explicit option wins, key by key."""
    return preset | explicit


def model_family(model: str | None) -> str | None:
    """The model's `model_type` from a local checkpoint's config.json; None where there is
    no local config to read (a hub id is not fetched here: no preset part is family-bound
    then but encoder graphs, which are left off)."""
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
