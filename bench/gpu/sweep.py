"""Engine settings swept on one model: the in-memory ceiling (every image decoded and resized
before the clock starts, all requests submitted at once, as bench_e2e.py's `ceiling` mode)
under vLLM's defaults and under each setting alone and combined, so that vlmq's presets
(worker/engines/presets.py) rest on measured figures.

Each setting runs in a process of its own (one engine start each: a setting that fails to
start or crashes the engine costs that row only) and the result file is saved after each
setting. Per setting: images/s per size, GPU busy (NVML), start-up seconds (and what vLLM's
log says of compilation, graph capture and KV cache), and vLLM's own per-request stage
means (queued, prefill: scheduled to first token, ViT included; decode).

    python bench/gpu/sweep.py --model /tmp/models/qwen2-vl-7b --images 300 \
        --settings default,mnbt16k,vit_graphs,combo,combo_fp8
    python bench/gpu/sweep.py --engine fake --images 16 --sizes 640x480  # a CPU dry run

`--add 'name:key=value;key=value'` adds a setting of your own (values as `-e` takes them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import hardware, write_result
from bench.gpu.gpu_sampler import GpuSampler
from bench.gpu.photos import PIXELS, _figures, make_images, request, shapes

# What every setting shares: bench_e2e.py's engine options less the two it sets for sharing
# the GPU with run-batch (max_num_seqs, gpu_memory_utilization): here vLLM's defaults hold
# unless a setting names them. AsyncLLM's defaults (vLLM 0.26, usage context "engine"):
# max_num_batched_tokens 2048, max_num_seqs 128, async scheduling on, no encoder graphs.
BASE = {
    "load_format": "dummy",
    "max_model_len": "8192",
    "limit_mm_per_prompt": '{"image": 4}',
    "enable_prefix_caching": "false",
    "mm_processor_cache_gb": "0",
    "ignore_eos": "true",
}
# Compact JSON: sweep.sh hands the best setting on as shell words (-e key=value).
VIT_GRAPHS = '{"cudagraph_mm_encoder":true}'
FP8 = {"quantization": "fp8", "kv_cache_dtype": "fp8"}
SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "mnbt8k": {"max_num_batched_tokens": "8192"},
    "mnbt16k": {"max_num_batched_tokens": "16384"},
    "mnbt32k": {"max_num_batched_tokens": "32768"},
    "seqs256": {"max_num_seqs": "256"},
    "seqs512": {"max_num_seqs": "512"},
    "vit_graphs": {"compilation_config": VIT_GRAPHS},
    "async_off": {"async_scheduling": "false"},
    "combo": {"max_num_batched_tokens": "16384", "max_num_seqs": "512", "compilation_config": VIT_GRAPHS},
    "combo_fp8": {
        "max_num_batched_tokens": "16384",
        "max_num_seqs": "512",
        "compilation_config": VIT_GRAPHS,
    }
    | FP8,
}
# Lines of vLLM's log worth keeping per start (what the start-up seconds went to).
LOG_FIGURES = {
    "init_engine_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
    "compile_s": r"torch\.compile and initial profiling/warmup run together took ([\d.]+) s",
    "graph_capture_s": r"Graph capturing finished in ([\d.]+) secs",
    "kv_cache_tokens": r"GPU KV cache size: ([\d,]+) tokens",
}
RESULT_MARK = "SWEEP-RESULT "


def parse_add(spec: str) -> tuple[str, dict[str, str]]:
    """`name:key=value;key=value` -> (name, options)."""
    name, _, rest = spec.partition(":")
    if not name or not rest:
        raise SystemExit(f"--add {spec!r}: write name:key=value;key=value")
    pairs = [p.split("=", 1) for p in rest.split(";") if p]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"--add {spec!r}: every option is key=value")
    return name, {k: v for k, v in pairs}


def options_for(engine: str, setting: dict[str, str], max_tokens: int) -> dict[str, str]:
    """The engine options of one setting. The fake engine (the CPU dry run) takes only the
    batch size of a setting: the rest is vLLM's."""
    if engine == "fake":
        fake = {"step_ms": "20", "max_num_seqs": "64", "completion_tokens": str(max_tokens)}
        return fake | {k: v for k, v in setting.items() if k == "max_num_seqs"}
    return BASE | setting


def is_fp8(options: dict[str, str]) -> bool:
    return options.get("quantization") == "fp8" or options.get("kv_cache_dtype", "").startswith("fp8")


# ---- one setting, in its own process ---------------------------------------------------


def stage_logger(engine: Any, sink: list[Any]) -> None:
    """Keep vLLM's per-request stats (FinishedRequestStats) of finished requests in `sink`,
    beside the adapter's own stats logger (which keeps the waiting count)."""
    own = engine._stat_logger

    def combined() -> Any:
        base = own()

        class Stages(base):  # type: ignore[misc,valid-type]  # vLLM is not installed for mypy
            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kw: Any) -> None:
                super().record(scheduler_stats, iteration_stats, *args, **kw)
                if iteration_stats is not None:
                    sink.extend(iteration_stats.finished_requests)

        return Stages

    engine._stat_logger = combined


def stage_means(stats: list[Any]) -> dict[str, float | None]:
    def mean(attr: str) -> float | None:
        vals = [getattr(s, attr) for s in stats if getattr(s, attr, None) is not None]
        return round(statistics.fmean(vals), 4) if vals else None

    return {k: mean(k) for k in ("queued_time", "prefill_time", "decode_time", "e2e_latency")}


async def measure(engine: Any, images: list[Any], max_tokens: int) -> dict[str, Any]:
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        outs = await asyncio.gather(
            *(engine.generate(request(i, 1, max_tokens, images=[img])) for i, img in enumerate(images))
        )
        dt = time.perf_counter() - t0
    return _figures(len(images), dt, outs, gpu)


async def one_setting(args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image

    from vlmq.worker.engines import make_engine

    data = pickle.loads(await asyncio.to_thread(Path(args.data).read_bytes))
    options = json.loads(args.options)
    engine: Any = make_engine(args.engine, args.model, options)
    stages: list[Any] = []
    if args.engine == "vllm":
        stage_logger(engine, stages)
    t0 = time.perf_counter()
    await engine.start()
    start_s = round(time.perf_counter() - t0, 1)
    try:
        warm = [Image.frombytes(*a) for a in data["warm"]]
        await measure(engine, warm, 8)
        sizes: dict[str, Any] = {}
        for size, arrays in data["sizes"].items():
            images = [Image.frombytes(*a) for a in arrays]
            runs = []
            for _ in range(args.repeat):
                stages.clear()
                runs.append(
                    await measure(engine, images, args.max_tokens) | {"stages_s": stage_means(stages)}
                )
            ranked = sorted(runs, key=lambda r: r["images_per_s"])
            sizes[size] = ranked[(len(ranked) - 1) // 2] | {
                "runs_images_per_s": [r["images_per_s"] for r in runs]
            }
            print(size, sizes[size], flush=True)
    finally:
        await engine.close()
    return {"start_s": start_s, "sizes": sizes}


# ---- the sweep: images once, a process per setting ---------------------------------------


def prepare(args: argparse.Namespace, path: Path) -> Path:
    """Photos per size, decoded and resized to the model's pixel budget as the worker does,
    pickled once for every setting's process (seeds as bench_e2e.py's, warm-up apart). A
    file made earlier for the same images and sizes is reused (made while wheels travel)."""
    key = {"images": args.images, "sizes": args.sizes}
    if path.exists() and pickle.loads(path.read_bytes()).get("key") == key:
        return path
    from vlmq.worker.preprocess import load_image

    def resized(blobs: list[bytes]) -> list[tuple[str, tuple[int, int], bytes]]:
        def one(b: bytes) -> tuple[str, tuple[int, int], bytes]:
            img = load_image(b, factor=28, min_pixels=PIXELS[0], max_pixels=PIXELS[1], max_image_pixels=10**9)
            return img.mode, img.size, img.tobytes()

        with ThreadPoolExecutor() as pool:
            return list(pool.map(one, blobs))

    sizes = {
        size: resized(make_images(shapes(size, args.images), seed=100_000 * (k + 1)))
        for k, size in enumerate(args.sizes.split(","))
    }
    data = {"key": key, "sizes": sizes, "warm": resized(make_images(shapes("2048x1536", 16), seed=7))}
    path.write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def log_figures(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, pattern in LOG_FIGURES.items():
        if found := re.findall(pattern, text):
            out[key] = float(found[-1].replace(",", ""))
    out["encoder_graphs_captured"] = "Encoder CUDA graph capture complete" in text
    return out


def run_setting(
    args: argparse.Namespace, name: str, setting: dict[str, str], data: Path, folder: Path
) -> dict[str, Any]:
    log = folder / f"{name}.log"
    options = options_for(args.engine, setting, args.max_tokens)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--engine",
        args.engine,
        "--model",
        args.model,
        "--options",
        json.dumps(options),
        "--data",
        str(data),
        "--max-tokens",
        str(args.max_tokens),
        "--repeat",
        str(args.repeat),
    ]
    t0 = time.perf_counter()
    with log.open("w") as out:
        try:
            proc = subprocess.run(
                cmd, check=False, stdout=out, stderr=subprocess.STDOUT, timeout=args.setting_timeout
            )
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = log.read_text(errors="replace")
    # FP8 by the setting's own options: the fake engine of a dry run drops them.
    row: dict[str, Any] = {"setting": name, "options": options, "fp8": is_fp8(setting)}
    row["process_s"] = round(time.perf_counter() - t0, 1)
    row["engine_log"] = log_figures(text)
    results = [line for line in text.splitlines() if line.startswith(RESULT_MARK)]
    if rc != 0 or not results:
        tail = [line for line in text.splitlines() if "Error" in line or "error" in line][-5:]
        return row | {"error": f"exit {rc}", "error_lines": tail}
    row.update(json.loads(results[-1][len(RESULT_MARK) :]))
    return row


def with_gains(rows: list[dict[str, Any]]) -> None:
    """Each row's images/s over the default setting's, per size."""
    default = next((r for r in rows if r["setting"] == "default" and "sizes" in r), None)
    if default is None:
        return
    for row in rows:
        if "sizes" in row:
            row["gain_over_default"] = {
                size: round(fig["images_per_s"] / default["sizes"][size]["images_per_s"], 3)
                for size, fig in row["sizes"].items()
                if size in default["sizes"]
            }


def best_bf16(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The BF16 setting whose smallest gain over the defaults (over sizes) is largest."""
    ranked = [r for r in rows if r.get("gain_over_default") and not r["fp8"]]
    return max(ranked, key=lambda r: min(r["gain_over_default"].values()), default=None)


def save(args: argparse.Namespace, rows: list[dict[str, Any]], partial: str | None) -> None:
    with_gains(rows)
    default = next((r for r in rows if r["setting"] == "default" and "sizes" in r), None)
    best = best_bf16(rows)
    baseline = value = 0.0
    if default and best:
        size = min(best["gain_over_default"], key=best["gain_over_default"].__getitem__)
        baseline, value = default["sizes"][size]["images_per_s"], best["sizes"][size]["images_per_s"]
    write_result(
        args.name,
        "images/s",
        baseline,
        value,
        {
            "engine": args.engine,
            "model": args.model,
            "weights": "random (load_format=dummy), real-size config",
            "mode": "ceiling: images decoded and resized in memory, all requests submitted at once",
            "images_per_size": args.images,
            "sizes": args.sizes,
            "max_tokens": args.max_tokens,
            "repeat": args.repeat,
            "base_options": BASE if args.engine == "vllm" else {},
            "best_bf16": best["setting"] if best else None,
            "device": hardware(),
            "top_level": "baseline: vLLM's defaults, value: best_bf16, at the size where its gain is least",
        }
        | ({"partial": partial} if partial else {}),
        rows=rows,
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="vllm")
    ap.add_argument("--model", default="fake")
    ap.add_argument("--images", type=int, default=300, help="photos per size")
    ap.add_argument("--sizes", default="1024x768,4032x3024")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="runs per size on one engine start; median kept")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"from: {', '.join(SETTINGS)}")
    ap.add_argument(
        "--add", action="append", default=[], help="name:key=value;key=value, a setting of your own"
    )
    ap.add_argument("--setting-timeout", type=float, default=900)
    ap.add_argument("--name", default="gpu-sweep")
    ap.add_argument("--data-file", default="", help="the prepared images: reused if made for these flags")
    ap.add_argument("--table", default="", help="print a result file as a markdown table")
    ap.add_argument("--best-args", default="", help="print a result file's best setting as bench_e2e flags")
    ap.add_argument("--prepare-only", action="store_true", help="make --data-file and exit")
    # Internal: one setting in this process.
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="", help=argparse.SUPPRESS)
    return ap.parse_args()


def best_args(path: Path) -> str:
    """The best BF16 setting of a sweep's result file as bench_e2e.py's flags."""
    result = json.loads(path.read_text())
    name = result["settings"]["best_bf16"]
    row = next(r for r in result["rows"] if r["setting"] == name)
    own = {k: v for k, v in row["options"].items() if BASE.get(k) != v}
    return " ".join([f"--preset-name=sweep:{name}", *(f"-e {k}={v}" for k, v in own.items())])


def markdown_table(path: Path) -> str:
    """A result file as docs/performance.md's markdown table."""
    result = json.loads(path.read_text())
    sizes = result["settings"]["sizes"].split(",")
    head = ["setting", "options", *(f"{s} img/s (GPU busy, x default)" for s in sizes), "start-up s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        own = ", ".join(f"{k}={v}" for k, v in row["options"].items() if BASE.get(k) != v) or "vLLM's"
        cells = []
        for size in sizes:
            fig = row.get("sizes", {}).get(size)
            gain = row.get("gain_over_default", {}).get(size)
            cells.append(f"{fig['images_per_s']} ({fig['gpu_util_mean_pct']} %, {gain})" if fig else "failed")
        lines.append(f"| {row['setting']} | {own} | " + " | ".join(cells) + f" | {row.get('start_s', '-')} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.table:
        print(markdown_table(Path(args.table)))
        return
    if args.best_args:
        print(best_args(Path(args.best_args)))
        return
    if args.child:
        print(RESULT_MARK + json.dumps(asyncio.run(one_setting(args))), flush=True)
        return
    table = SETTINGS | dict(parse_add(spec) for spec in args.add)
    chosen = [s for s in args.settings.split(",") if s] + [parse_add(spec)[0] for spec in args.add]
    if unknown := [s for s in chosen if s not in table]:
        raise SystemExit(f"unknown settings {unknown}: {', '.join(table)}")
    folder = Path(tempfile.mkdtemp(prefix="vlmq-sweep-"))
    t0 = time.perf_counter()
    data = prepare(args, Path(args.data_file) if args.data_file else folder / "images.pkl")
    print(f"images ready in {time.perf_counter() - t0:.0f}s ({data.stat().st_size >> 20} MiB)", flush=True)
    if args.prepare_only:
        return
    rows: list[dict[str, Any]] = []
    chosen = list(dict.fromkeys(chosen))
    for k, name in enumerate(chosen):
        row = run_setting(args, name, table[name], data, folder)
        rows.append(row)
        brief = {s: (f["images_per_s"], f["gpu_util_mean_pct"]) for s, f in row.get("sizes", {}).items()}
        print(f"== {name}: start {row.get('start_s')}s {brief} {row.get('error', '')}", flush=True)
        save(args, rows, None if k + 1 == len(chosen) else f"{k + 1} of {len(chosen)} settings")
    if not args.data_file:
        os.remove(data)


if __name__ == "__main__":
    main()
