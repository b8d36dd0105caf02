"""vLLM's own batch runner, the peer a backlog user would pick, timed per input file.

`vllm run-batch` reads one OpenAI batch file, starts an engine, submits every line at once
and writes the output file. This runs that same code (`vllm.entrypoints.openai.run_batch`:
its argument parser, its `run_batch()` coroutine, its endpoint handlers) over several
files on one engine: a warm-up file first, then each measured file, timed from reading
the file to writing its output (the engine start is not counted, as for vlmq). Prints one
JSON object per line: {"file", "lines", "ok", "seconds", "images_per_s", "gpu_util_mean_pct"}.

Files come as arguments, or (`--serve`) one path per line on stdin once it has printed
{"ready": true}: the benchmark then interleaves vLLM's runner with its other modes while
both engines stay loaded (each with part of the GPU's memory).

    python bench/gpu/run_batch_timed.py --warmup warm.jsonl a.jsonl b.jsonl -- \
        --model /tmp/models/qwen2-vl-7b --load-format dummy --allowed-local-media-path /tmp/img
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.gpu.gpu_sampler import GpuSampler


def _vllm_runner() -> tuple[Any, Any]:
    """vLLM's batch runner module and engine-client builder (they moved after 0.26)."""
    import importlib

    for runner, client in (
        ("vllm.entrypoints.openai.run_batch", "vllm.entrypoints.openai.api_server"),
        ("vllm.entrypoints.launchers.run_batch", "vllm.entrypoints.launchers.api_server.entry"),
    ):
        with contextlib.suppress(ImportError):
            rb = importlib.import_module(runner)
            if hasattr(rb, "make_arg_parser"):
                return rb, importlib.import_module(client).build_async_engine_client
    raise ImportError("no vLLM batch runner found in this vLLM")


async def run(warmup: str, files: list[str], vllm_argv: list[str], serve: bool) -> None:
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    rb, build_async_engine_client = _vllm_runner()
    parser = rb.make_arg_parser(FlexibleArgumentParser(description="vLLM batch runner"))
    args = parser.parse_args(["-i", warmup, "-o", warmup + ".out", *vllm_argv])
    rb.validate_run_batch_args(args)
    async with build_async_engine_client(args, usage_context=UsageContext.OPENAI_BATCH_RUNNER) as client:
        await rb.run_batch(client, args)
        if serve:
            print(json.dumps({"ready": True}), flush=True)
            files = _stdin_lines()
        for path in files:
            args.input_file, args.output_file = path, path + ".out"
            with GpuSampler() as gpu:
                t0 = time.perf_counter()
                await rb.run_batch(client, args)
                dt = time.perf_counter() - t0
            print(json.dumps(_figures(path, dt, gpu)), flush=True)


def _stdin_lines() -> Any:
    for line in sys.stdin:
        if line.strip():
            yield line.strip()


def _figures(path: str, dt: float, gpu: GpuSampler) -> dict[str, Any]:
    lines = [json.loads(x) for x in Path(path + ".out").read_text().splitlines() if x.strip()]
    ok = sum((x.get("response") or {}).get("status_code") == 200 for x in lines)
    tokens = sum(
        (x["response"]["body"].get("usage") or {}).get("completion_tokens", 0)
        for x in lines
        if (x.get("response") or {}).get("status_code") == 200
    )
    return {
        "file": Path(path).name,
        "lines": len(lines),
        "ok": ok,
        "seconds": round(dt, 2),
        "images_per_s": round(len(lines) / dt, 2),
        "output_tokens_per_s": round(tokens / dt, 1),
        "gpu_util_mean_pct": gpu.mean,
        "gpu_util_per_gpu_pct": gpu.per_gpu,
    }


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", required=True)
    ap.add_argument("--serve", action="store_true", help="read the files to run from stdin")
    ap.add_argument("files", nargs="*")
    ours = ap.parse_args(argv[:split])
    asyncio.run(run(ours.warmup, ours.files, argv[split + 1 :], ours.serve))


if __name__ == "__main__":
    main()
