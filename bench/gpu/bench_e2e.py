"""vlmq end to end vs. the engine driven directly, on one machine, in one run.

Same images (photo-like JPEGs made here, put in S3 = moto_server), same prompt and
max_tokens, one engine instance (one model load) for the three modes:

- ceiling: AsyncLLM (through the adapter) with every image already decoded and resized in
  memory, all requests submitted at once;
- naive:   what the seed examples lead a user to write: fetch each image in turn from S3,
  open it, and call the engine on batches of 16 (vLLM resizes);
- vlmq:    jobs through Kafka (tansu) -> the vlmq worker (in this process, sharing the
  engine) -> Redis, submitted by `vlmq bulk submit` in another process; timed from the
  first submit to the last result (the records' own timestamps).

    python bench/gpu/bench_e2e.py --engine vllm --model /tmp/models/qwen2-vl-7b --images 1000
    python bench/gpu/bench_e2e.py --engine fake --images 64          # a dry run on the CPU
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import boto3

from bench.common import hardware, write_result
from vlmq.deploy.stack import Stack
from vlmq.producer.client import Client
from vlmq.schemas.job import ChoiceFormat, ImageRef, JsonSchemaFormat, Message, Sampling, TextPart
from vlmq.worker.engines import make_engine
from vlmq.worker.engines.base import EngineRequest
from vlmq.worker.preprocess import load_image
from vlmq.worker.samples import photo
from vlmq.worker.service import Worker
from vlmq.worker.settings import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, WorkerSettings

PROMPT = "Describe this image in one or two sentences."


class GpuSampler:
    """Mean GPU utilization (NVML) over a window; None where there is no GPU."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml: Any = pynvml
        except Exception:
            self._nvml = None

    def __enter__(self) -> GpuSampler:
        if self._nvml:
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return round(statistics.fmean(self.samples), 1) if self.samples else None


def make_images(n: int, w: int, h: int) -> list[bytes]:
    with ProcessPoolExecutor() as pool:
        return list(pool.map(_photo, [(w, h, i) for i in range(n)], chunksize=8))


def _photo(a: tuple[int, int, int]) -> bytes:
    return photo(a[0], a[1], seed=a[2], quality=90)


def request(i: int, images: list[Any], max_tokens: int, **kw: Any) -> EngineRequest:
    parts: list[Any] = [ImageRef(f"s3://memory/{i}")] * len(images) + [TextPart(PROMPT)]
    return EngineRequest(
        request_id=f"r{i}-{time.monotonic_ns()}",
        messages=[Message("user", parts)],
        images=images,
        sampling=Sampling(max_tokens=max_tokens),
        **kw,
    )


async def ceiling(engine: Any, blobs: list[bytes], factor: int, max_tokens: int) -> dict[str, Any]:
    with ThreadPoolExecutor() as pool:
        images = list(
            pool.map(
                lambda b: load_image(
                    b,
                    factor=factor,
                    min_pixels=QWEN_MIN_PIXELS,
                    max_pixels=QWEN_MAX_PIXELS,
                    max_image_pixels=100_000_000,
                ),
                blobs,
            )
        )
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        outs = await asyncio.gather(
            *(engine.generate(request(i, [img], max_tokens)) for i, img in enumerate(images))
        )
        dt = time.perf_counter() - t0
    return _figures(len(blobs), dt, outs, gpu)


async def naive(engine: Any, s3: Any, bucket: str, n: int, max_tokens: int) -> dict[str, Any]:
    from PIL import Image

    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        outs = []
        for start in range(0, n, 16):
            batch = []
            for i in range(start, min(n, start + 16)):  # one at a time, as a loop does
                body = s3.get_object(Bucket=bucket, Key=f"img/{i:05d}.jpg")["Body"].read()
                batch.append(Image.open(io.BytesIO(body)).convert("RGB"))
            outs += await asyncio.gather(
                *(engine.generate(request(start + j, [img], max_tokens)) for j, img in enumerate(batch))
            )
        dt = time.perf_counter() - t0
    return _figures(n, dt, outs, gpu)


def _figures(n: int, dt: float, outs: list[Any], gpu: GpuSampler) -> dict[str, Any]:
    tokens = sum(o.completion_tokens for o in outs)
    return {
        "images": n,
        "seconds": round(dt, 2),
        "images_per_s": round(n / dt, 2),
        "output_tokens_per_s": round(tokens / dt, 1),
        "gpu_util_mean_pct": gpu.mean,
        "mean_output_tokens": round(tokens / n, 1),
    }


def write_manifest(path: Path, bucket: str, n: int, max_tokens: int) -> Path:
    """A `vlmq bulk submit --manifest` file: n one-image jobs over s3://bucket/img/00000.jpg..."""
    image = {"type": "image"}
    lines = []
    for i in range(n):
        content = [image | {"uri": f"s3://{bucket}/img/{i:05d}.jpg"}, {"type": "text", "text": PROMPT}]
        job = {"key": f"{i:05d}", "messages": [{"role": "user", "content": content}]}
        lines.append(json.dumps(job | {"sampling": {"max_tokens": max_tokens}}) + "\n")
    path.write_text("".join(lines))
    return path


async def through_vlmq(
    engine: Any, env: dict[str, str], n: int, bucket: str, max_tokens: int, tmp: Path, in_flight: int
) -> dict[str, Any]:
    batch = f"gpu-{int(time.time())}"
    manifest = write_manifest(tmp / "manifest.jsonl", bucket, n, max_tokens)
    settings = WorkerSettings(
        kafka_bootstrap=env["VLMQ_KAFKA_BOOTSTRAP"],
        redis_url=env["VLMQ_REDIS_URL"],
        s3_endpoint_url=env["VLMQ_S3_ENDPOINT_URL"],
        metrics_port=0,
        max_in_flight=in_flight,
        engine=engine.name,
        model=engine.model,
        image_workers=max(4, (os.cpu_count() or 8) - 4),
        group_id=f"bench-{batch}",
    )
    worker = Worker(settings, engine=engine)
    serving = asyncio.create_task(worker.run())
    with GpuSampler() as gpu:
        submit = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "vlmq.cli",
            "bulk",
            "submit",
            batch,
            "--manifest",
            str(manifest),
            env={**os.environ, **env},
        )
        async with Client(env["VLMQ_KAFKA_BOOTSTRAP"], env["VLMQ_REDIS_URL"]) as client:
            while (await client.batch(batch)).finished < n:
                await asyncio.sleep(0.25)
            results = [r async for r in client.iter_results(batch)]
            extra = await _features(client, bucket)
    await submit.wait()
    worker.stop()
    await serving
    t = [r.timings for r in results if r.timings]
    start = min(x.submitted_at for x in t if x.submitted_at)
    end = max(x.finished_at for x in t if x.finished_at)
    ok = sum(r.state.value == "succeeded" for r in results)
    tokens = sum(r.usage.completion_tokens for r in results if r.usage)

    def mean(attr: str) -> float | None:
        vals = [getattr(x, attr) for x in t if getattr(x, attr) is not None]
        return round(statistics.fmean(vals), 4) if vals else None

    return {
        "images": n,
        "succeeded": ok,
        "seconds": round(end - start, 2),
        "images_per_s": round(n / (end - start), 2),
        "output_tokens_per_s": round(tokens / (end - start), 1),
        "gpu_util_mean_pct": gpu.mean,
        "mean_output_tokens": round(tokens / n, 1),
        "stage_means_s": {k: mean(k) for k in ("fetch_s", "preprocess_s", "engine_s", "ttft_s")},
        **extra,
    }


async def _features(client: Client, bucket: str) -> dict[str, Any]:
    """Multi-image and structured-output jobs through the same worker: do they succeed?"""
    from vlmq.schemas.job import Job

    two = [ImageRef(f"s3://{bucket}/img/00000.jpg"), ImageRef(f"s3://{bucket}/img/00001.jpg")]
    jobs = [
        Job(
            job_id=f"multi-{time.time_ns()}",
            messages=[Message("user", [*two, TextPart("Compare them.")])],
            sampling=Sampling(max_tokens=16),
        ),
        Job(
            job_id=f"choice-{time.time_ns()}",
            messages=[Message("user", [two[0], TextPart("Safe?")])],
            response_format=ChoiceFormat(["safe", "unsafe"]),
            sampling=Sampling(max_tokens=8),
        ),
        Job(
            job_id=f"json-{time.time_ns()}",
            messages=[Message("user", [two[0], TextPart("Label it.")])],
            response_format=JsonSchemaFormat(
                {
                    "type": "object",
                    "properties": {"label": {"enum": ["cat", "dog", "other"]}},
                    "required": ["label"],
                }
            ),
            sampling=Sampling(max_tokens=32),
        ),
    ]
    await client.submit_many(jobs)
    done = await client.wait_many([j.job_id for j in jobs], timeout=300)
    return {
        "feature_jobs": {
            j.job_id.split("-")[0]: {
                "state": r.state.value,
                "text": (r.text or "")[:80],
                "parsed": r.parsed,
                "error": r.error.message[:200] if r.error else None,
            }
            for j, r in zip(jobs, done, strict=True)
        }
    }


def engine_options(args: argparse.Namespace) -> dict[str, str]:
    if args.engine == "fake":
        return {"step_ms": "20", "max_num_seqs": "64", "completion_tokens": str(args.max_tokens)}
    if args.engine == "lmdeploy":
        return {
            "session_len": "8192",
            "cache_max_entry_count": "0.6",
            "max_batch_size": str(args.max_num_seqs),
        }
    return {
        "load_format": "dummy",
        "max_model_len": "8192",
        "max_num_seqs": str(args.max_num_seqs),
        "gpu_memory_utilization": "0.85",
        "limit_mm_per_prompt": '{"image": 4}',
        "enable_prefix_caching": "false",
        "ignore_eos": "true",
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="vllm")
    ap.add_argument("--model", default="fake")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--in-flight", type=int, default=384)
    ap.add_argument("--modes", default="ceiling,naive,vlmq")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    from vlmq.core.logs import configure

    configure("console", "WARNING")
    tmp = Path(tempfile.mkdtemp(prefix="vlmq-gpu-"))
    t0 = time.perf_counter()
    blobs = make_images(args.images, args.width, args.height)
    print(f"{len(blobs)} images made in {time.perf_counter() - t0:.1f}s", flush=True)
    stack = Stack(tmp / "stack", partitions=8)
    env = await asyncio.to_thread(stack.up)
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    try:
        s3 = boto3.client("s3", endpoint_url=env["VLMQ_S3_ENDPOINT_URL"])
        s3.create_bucket(Bucket="bench")
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda ib: s3.put_object(Bucket="bench", Key=f"img/{ib[0]:05d}.jpg", Body=ib[1]),
                    enumerate(blobs),
                )
            )
        options = engine_options(args)
        engine = make_engine(args.engine, args.model, options)
        t0 = time.perf_counter()
        await engine.start()
        started = round(time.perf_counter() - t0, 1)
        print(f"engine up in {started}s", flush=True)
        warm = make_images(16, args.width, args.height)  # other pixels than the measured ones
        await ceiling(engine, [w + b"" for w in warm], engine.image_factor, 8)
        out: dict[str, Any] = {}
        modes = args.modes.split(",")
        if "ceiling" in modes:
            out["ceiling"] = await ceiling(engine, blobs, engine.image_factor, args.max_tokens)
            print("ceiling", out["ceiling"], flush=True)
        if "naive" in modes:
            out["naive"] = await naive(engine, s3, "bench", args.images, args.max_tokens)
            print("naive", out["naive"], flush=True)
        if "vlmq" in modes:
            out["vlmq"] = await through_vlmq(
                engine, env, args.images, "bench", args.max_tokens, tmp, args.in_flight
            )
            print("vlmq", out["vlmq"], flush=True)
        base = out.get("ceiling", {}).get("images_per_s", 0.0)
        value = out.get("vlmq", {}).get("images_per_s", 0.0)
        naive_ips = out.get("naive", {}).get("images_per_s")
        write_result(
            args.name or f"gpu-{args.engine}",
            "images/s",
            base,
            value,
            {
                "engine": args.engine,
                "model": args.model,
                "weights": "random (load_format=dummy), real-size config",
                "images": args.images,
                "image_size": f"{args.width}x{args.height} JPEG q90, photo-like",
                "prompt": PROMPT,
                "max_tokens": args.max_tokens,
                "engine_options": options,
                "worker_max_in_flight": args.in_flight,
                "engine_start_s": started,
                "device": hardware(),
            },
            modes=out,
            ratio_vs_naive=round(value / naive_ips, 3) if naive_ips else None,
        )
    finally:
        await engine.close() if "engine" in locals() else None
        stack.down()


if __name__ == "__main__":
    asyncio.run(main())
