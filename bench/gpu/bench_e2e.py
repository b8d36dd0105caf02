"""vlmq end to end vs. the engine driven directly and vs. vLLM's own batch runner: photos of
several sizes, one machine, one run, every mode on the same photos.

Modes, each per photo size (1024x768, 2048x1536, 4032x3024, a mixed set), interleaved:

- ceiling:   raw prompts to AsyncLLM (through the adapter) with every image already
             decoded and resized in memory, all requests submitted at once: what vLLM's own
             front end makes of ready images;
- render:    the render-pool ceiling: JPEG bytes from memory through a pool of image
             processes (decode, resize, vLLM's renderer; what `--image-pool process` runs)
             to AsyncLLM as finished inputs, at most --in-flight at once;
- run_batch (or run_batch_same): vLLM's `run-batch` code (run_batch_timed.py) over an OpenAI batch file of the
             same photos as local files (file:// URLs, --allowed-local-media-path), with the
             same engine options, in its own process and engine, loaded beside ours (or,
             --run-batch-first, on every size before ours loads: a 72B at TP=2 fits once);
- run_batch_default: the same with the bench's own engine options only (no -e options: what
             a user gets who passes none of a preset's settings to run-batch);
- vlmq:      jobs through Kafka (tansu) -> the vlmq worker (this process, sharing the engine)
             -> Redis, images from S3 (moto_server), submitted by `vlmq bulk submit` in another
             process; timed from the first submit to the last result (the records' own times);
- vlmq_process: the same through a second worker with `--image-pool process` (vLLM's renderer
             in its pool, finished inputs to the same engine), on a jobs topic of its own.

    python bench/gpu/bench_e2e.py --engine vllm --model /tmp/models/qwen2-vl-7b --images 600
    python bench/gpu/bench_e2e.py --engine fake --images 64 --sizes 640x480  # a CPU dry run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import boto3
import botocore.config
import msgspec

from bench.common import hardware, write_result
from bench.gpu.gpu_sampler import GpuSampler
from bench.gpu.photos import MIXED, PIXELS, PROMPT, _figures, make_images, request, shapes
from vlmq.deploy.stack import Stack, ensure_topics
from vlmq.producer.client import Client
from vlmq.schemas.job import ChoiceFormat, ImageRef, JsonSchemaFormat, Message, Sampling, TextPart
from vlmq.worker.engines import make_engine
from vlmq.worker.preprocess import load_image
from vlmq.worker.render import ImagePool
from vlmq.worker.service import Worker
from vlmq.worker.settings import WorkerSettings


async def ceiling(engine: Any, blobs: list[bytes], max_tokens: int) -> dict[str, Any]:
    def resize(b: bytes) -> Any:
        return load_image(
            b, factor=engine.image_factor, min_pixels=PIXELS[0], max_pixels=PIXELS[1], max_image_pixels=10**9
        )

    with ThreadPoolExecutor() as pool:
        images = list(pool.map(resize, blobs))
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        outs = await asyncio.gather(
            *(engine.generate(request(i, 1, max_tokens, images=[img])) for i, img in enumerate(images))
        )
        dt = time.perf_counter() - t0
    return _figures(len(blobs), dt, outs, gpu)


async def render(
    engine: Any, pool: ImagePool, blobs: list[bytes], max_tokens: int, in_flight: int
) -> dict[str, Any]:
    """Finished inputs from a pool of image processes with vLLM's renderer, from JPEG bytes
    in memory (the worker's own pool class and settings)."""
    gate = asyncio.Semaphore(in_flight)

    async def one(i: int, blob: bytes) -> Any:
        async with gate:
            req = request(i, 1, max_tokens)
            prepared = await pool.prepare([blob], [PIXELS], req.messages)
            req.images, req.rendered = prepared.images, prepared.rendered
            return await engine.generate(req)

    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(one(i, b) for i, b in enumerate(blobs)))
        dt = time.perf_counter() - t0
    return _figures(len(blobs), dt, outs, gpu)


async def render_pool(engine: Any, settings: WorkerSettings) -> ImagePool:
    """The worker's process pool with the engine's renderer (what --image-pool process runs)."""
    pool = ImagePool.for_engine(engine, settings, "process")
    await pool.warm()
    return pool


def write_manifest(path: Path, uris: list[str], max_tokens: int) -> Path:
    """A `vlmq bulk submit --manifest` file: one one-image job per uri."""
    lines = []
    for i, uri in enumerate(uris):
        content = [{"type": "image", "uri": uri}, {"type": "text", "text": PROMPT}]
        job = {"key": f"{i:05d}", "messages": [{"role": "user", "content": content}]}
        lines.append(json.dumps(job | {"sampling": {"max_tokens": max_tokens}}) + "\n")
    path.write_text("".join(lines))
    return path


def write_openai_batch(path: Path, files: list[Path], max_tokens: int, model: str) -> Path:
    """The same jobs as an OpenAI batch file for `vllm run-batch` (images as file:// URLs)."""
    lines = []
    for i, f in enumerate(files):
        content = [{"type": "image_url", "image_url": {"url": f.as_uri()}}, {"type": "text", "text": PROMPT}]
        body = {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
        }
        lines.append(
            json.dumps({"custom_id": f"{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        )
    path.write_text("\n".join(lines) + "\n")
    return path


async def through_vlmq(
    env: dict[str, str], uris: list[str], args: argparse.Namespace, tmp: Path, topic: str | None = None
) -> dict[str, Any]:
    """`topic`: the jobs topic of the worker to feed (None: the default one)."""
    if topic:
        env = env | {"VLMQ_JOBS_TOPIC": topic}
    batch = f"gpu-{time.time_ns()}"
    manifest = write_manifest(tmp / f"{batch}.jsonl", uris, args.max_tokens)
    n = len(uris)
    vlmq = f"{shlex.quote(sys.executable)} -m vlmq.cli bulk"
    # Submitted and watched from a process of their own, as a producer would: watching polls
    # the batch's counters (2 reads x 256 shards, 4 times a second), and in this process
    # that would hold the GIL beside the engine's front end and the worker (a CPU profile:
    # 18 % of this process's GIL time went to it).
    script = f"{vlmq} submit {batch} --manifest {shlex.quote(str(manifest))} && {vlmq} watch {batch}"
    with GpuSampler() as gpu:
        run = await asyncio.create_subprocess_exec(
            "sh", "-c", script, env={**os.environ, **env}, stdout=asyncio.subprocess.DEVNULL
        )
        if await run.wait():
            raise RuntimeError(f"vlmq bulk submit/watch failed ({run.returncode})")
    async with Client(env["VLMQ_KAFKA_BOOTSTRAP"], env["VLMQ_REDIS_URL"]) as client:
        results = [r async for r in client.iter_results(batch)]
    t = [r.timings for r in results if r.timings]
    start = min(x.submitted_at for x in t if x.submitted_at)
    end = max(x.finished_at for x in t if x.finished_at)
    tokens = sum(r.usage.completion_tokens for r in results if r.usage)

    def mean(attr: str) -> float | None:
        vals = [getattr(x, attr) for x in t if getattr(x, attr) is not None]
        return round(statistics.fmean(vals), 4) if vals else None

    return {
        "images": n,
        "succeeded": sum(r.state.value == "succeeded" for r in results),
        "seconds": round(end - start, 2),
        "images_per_s": round(n / (end - start), 2),
        "output_tokens_per_s": round(tokens / (end - start), 1),
        "gpu_util_mean_pct": gpu.mean,
        "gpu_util_per_gpu_pct": gpu.per_gpu,
        "mean_prompt_tokens": round(sum(r.usage.prompt_tokens for r in results if r.usage) / n, 1),
        "mean_output_tokens": round(tokens / n, 1),
        "stage_means_s": {k: mean(k) for k in ("fetch_s", "preprocess_s", "engine_s", "ttft_s")},
        "ramp_s": ramp(t, start),
    }


def ramp(t: list[Any], start: float) -> dict[str, float]:
    """Seconds from the first submit until the first job was taken by the worker, and until
    the first reached the engine (taken + fetch + preprocess): what the ceiling does not pay."""
    taken = [x.started_at for x in t if x.started_at]
    engine = [x.started_at + (x.fetch_s or 0) + (x.preprocess_s or 0) for x in t if x.started_at]
    return {"first_taken": round(min(taken) - start, 3), "first_to_engine": round(min(engine) - start, 3)}


def _cli_flag(key: str, value: str) -> str:
    """An engine option as vLLM's command line takes it (booleans as --x / --no-x)."""
    name = key.replace("_", "-")
    if value in ("true", "false"):
        return f"--{name}" if value == "true" else f"--no-{name}"
    return f"--{name}={value}"


class RunBatch:
    """vLLM's batch runner in its own process and engine (run_batch_timed.py --serve)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(
        cls, args: argparse.Namespace, options: dict[str, str], tmp: Path, warm: list[Path]
    ) -> RunBatch:
        flags = [_cli_flag(k, v) for k, v in options.items() if k != "ignore_eos"]
        warmup = write_openai_batch(tmp / "rb-warmup.jsonl", warm, 8, args.model)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).with_name("run_batch_timed.py")),
            "--serve",
            "--warmup",
            str(warmup),
            "--",
            "--model",
            args.model,
            f"--allowed-local-media-path={tmp}",
            *flags,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self = cls(proc)
        assert (await self._line()).get("ready"), "vLLM's batch runner did not start"
        return self

    async def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            if line.startswith(b"{"):
                return dict(json.loads(line))
        raise RuntimeError(f"vLLM's batch runner exited ({await self.proc.wait()})")

    async def run(self, path: Path) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{path}\n".encode())
        await self.proc.stdin.drain()
        return await self._line()

    async def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await self.proc.wait()


async def features(env: dict[str, str], uris: list[str]) -> dict[str, Any]:
    """Multi-image, choice and JSON-schema jobs through the same worker: do they succeed?"""
    from vlmq.schemas.job import Job

    two = [ImageRef(uris[0]), ImageRef(uris[1])]
    t = time.time_ns()
    jobs = [
        Job(
            job_id=f"multi-{t}",
            messages=[Message("user", [*two, TextPart("Compare them.")])],
            sampling=Sampling(max_tokens=16),
        ),
        Job(
            job_id=f"choice-{t}",
            messages=[Message("user", [two[0], TextPart("Safe?")])],
            response_format=ChoiceFormat(["safe", "unsafe"]),
            sampling=Sampling(max_tokens=8),
        ),
        Job(
            job_id=f"json-{t}",
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
    async with Client(env["VLMQ_KAFKA_BOOTSTRAP"], env["VLMQ_REDIS_URL"]) as client:
        await client.submit_many(jobs)
        done = await client.wait_many([j.job_id for j in jobs], timeout=300)
    return {
        j.job_id.split("-")[0]: {
            "state": r.state.value,
            "text": (r.text or "")[:80],
            "parsed": r.parsed,
            "image_tokens": r.usage.image_tokens if r.usage else None,
            "error": r.error.message[:200] if r.error else None,
        }
        for j, r in zip(jobs, done, strict=True)
    }


def engine_options(args: argparse.Namespace) -> dict[str, str]:
    return _default_options(args) | dict(kv.split("=", 1) for kv in args.engine_arg)


def _default_options(args: argparse.Namespace) -> dict[str, str]:
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
        # Two engines share the GPU (vlmq's and run-batch's); neither is short of KV cache.
        "gpu_memory_utilization": str(args.gpu_memory_utilization),
        "limit_mm_per_prompt": '{"image": 4}',
        "enable_prefix_caching": "false",
        "mm_processor_cache_gb": "0",  # each photo comes once; vlmq's default
        "ignore_eos": "true",
    }


class Lent:
    """The bench's engine lent to a second worker, which must neither start nor close it."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


PROCESS_TOPIC = "vlmq.jobs.bench-process"
MODES = ("run_batch", "run_batch_same", "run_batch_default", "ceiling", "render", "vlmq", "vlmq_process")


def variant(mode: str) -> tuple[str, int | None]:
    """ "vlmq_process@256": vlmq's process pool with engine_waiting_target 256, fed by a worker
    of its own (so targets are compared on one engine start)."""
    base, _, target = mode.partition("@")
    if target and not target.isdigit():
        raise SystemExit(f"mode {mode!r}: the waiting target after @ is a whole number")
    return base, int(target) if target else None


def topic_of(mode: str) -> str | None:
    base, target = variant(mode)
    if target is not None:
        return f"vlmq.jobs.bench-{base}-{target}"
    return PROCESS_TOPIC if base == "vlmq_process" else None


async def start_worker(
    engine: Any,
    env: dict[str, str],
    args: argparse.Namespace,
    image_pool: Literal["process", "thread"],
    topic: str | None = None,
    waiting_target: int | None = None,
) -> tuple[Worker, asyncio.Task[int]]:
    settings = WorkerSettings(
        kafka_bootstrap=env["VLMQ_KAFKA_BOOTSTRAP"],
        redis_url=env["VLMQ_REDIS_URL"],
        s3_endpoint_url=env["VLMQ_S3_ENDPOINT_URL"],
        metrics_port=0,
        max_in_flight=args.in_flight,
        engine=engine.name,
        model=engine.model,
        image_pool=image_pool,
        group_id=f"bench-{time.time_ns()}",
        max_image_pixels=100_000_000,
    )
    if topic:
        settings = msgspec.structs.replace(settings, jobs_topic=topic)
    if target := waiting_target or args.waiting_target:
        settings = msgspec.structs.replace(settings, engine_waiting_target=target)
    worker = Worker(settings, engine=engine)
    serving = asyncio.create_task(worker.run())
    while worker.not_ready():  # image processes up, partitions assigned: then the clock may run
        if serving.done():
            raise RuntimeError(f"worker exited: {serving.result()}")
        await asyncio.sleep(0.5)
    return worker, serving


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median images/s, and every run's figure."""
    ranked = sorted(runs, key=lambda r: r["images_per_s"])
    return ranked[(len(ranked) - 1) // 2] | {"runs_images_per_s": [r["images_per_s"] for r in runs]}


async def measure_size(
    size: str, ctx: dict[str, Any], args: argparse.Namespace, modes: list[str]
) -> dict[str, Any]:
    blobs, uris = ctx["blobs"][size], ctx["uris"][size]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for _ in range(args.repeat):
        for mode in modes:
            if mode.startswith("run_batch") and mode in ctx.get("run_batch_done", {}):
                out = ctx["run_batch_done"][mode][size].pop(0)
            elif mode.startswith("run_batch"):
                out = await ctx["run_batch"][mode].run(ctx["batch_files"][size])
            elif mode == "ceiling":
                out = await ceiling(ctx["engine"], blobs, args.max_tokens)
            elif mode == "render":
                out = await render(ctx["engine"], ctx["render_pool"], blobs, args.max_tokens, args.in_flight)
            else:  # vlmq, vlmq_process, and their @target variants
                out = await through_vlmq(ctx["env"], uris, args, ctx["tmp"], topic_of(mode))
            print(size, mode, out, flush=True)
            runs[mode].append(out)
    row: dict[str, Any] = {"size": size, "images": len(blobs)} | {m: median_of(r) for m, r in runs.items()}
    ips = {m: row[m]["images_per_s"] for m in modes}
    vlmq = ips.get("vlmq")
    for key, base in (
        ("ratio", "ceiling"),
        ("ratio_run_batch", "run_batch"),
        ("ratio_run_batch_same", "run_batch_same"),
        ("ratio_run_batch_default", "run_batch_default"),
        ("ratio_render_ceiling", "render"),
    ):
        row[key] = round(vlmq / ips[base], 3) if vlmq and ips.get(base) else None
    if ips.get("vlmq_process") and ips.get("ceiling"):
        row["ratio_process"] = round(ips["vlmq_process"] / ips["ceiling"], 3)
    for mode in modes:
        if "@" in mode and ips.get("ceiling"):
            row[f"ratio_{mode}"] = round(ips[mode] / ips["ceiling"], 3)
    return row


async def prepare_data(args: argparse.Namespace, env: dict[str, str], tmp: Path) -> dict[str, Any]:
    """Photos per size: in memory, in S3 (for vlmq), as files with an OpenAI batch file each
    (for run-batch). Seeds differ per size; the warm-up photos are other pixels again."""
    s3 = boto3.client(
        "s3", endpoint_url=env["VLMQ_S3_ENDPOINT_URL"], config=botocore.config.Config(max_pool_connections=16)
    )
    s3.create_bucket(Bucket="bench")
    ctx: dict[str, Any] = {"blobs": {}, "uris": {}, "files": {}, "batch_files": {}}
    for k, size in enumerate(args.sizes.split(",")):
        t0 = time.perf_counter()
        blobs = make_images(shapes(size, args.images), seed=100_000 * (k + 1))
        keys = [f"img/{size}/{i:05d}.jpg" for i in range(len(blobs))]
        folder = tmp / "img" / size
        folder.mkdir(parents=True)
        files = [folder / f"{i:05d}.jpg" for i in range(len(blobs))]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda k, b: s3.put_object(Bucket="bench", Key=k, Body=b), keys, blobs))
            list(pool.map(Path.write_bytes, files, blobs))
        ctx["blobs"][size], ctx["uris"][size], ctx["files"][size] = (
            blobs,
            [f"s3://bench/{k}" for k in keys],
            files,
        )
        ctx["batch_files"][size] = write_openai_batch(
            tmp / f"rb-{size}.jsonl", files, args.max_tokens, args.model
        )
        mb = sum(map(len, blobs)) / 2**20
        print(
            f"{size}: {len(blobs)} photos, {mb:.0f} MiB, ready in {time.perf_counter() - t0:.0f}s", flush=True
        )
    warm_blobs = make_images(shapes("2048x1536", 16), seed=7)
    (tmp / "img" / "warm").mkdir(parents=True)
    ctx["warm_files"] = [tmp / "img" / "warm" / f"{i}.jpg" for i in range(16)]
    for f, b in zip(ctx["warm_files"], warm_blobs, strict=True):
        f.write_bytes(b)
    ctx["warm_blobs"] = warm_blobs
    return ctx


def save(
    args: argparse.Namespace,
    options: dict[str, Any],
    ctx: dict[str, Any],
    started: float,
    rows: list[dict[str, Any]],
    checks: dict[str, Any],
    partial: str | None,
) -> None:
    # The headline is vlmq's default pool, or its process pool where only that ran.
    mode, key = ("vlmq", "ratio") if "vlmq" in rows[0] else ("vlmq_process", "ratio_process")
    worst = min(rows, key=lambda r: r.get(key) or 0.0)
    write_result(
        args.name or f"gpu-{args.engine}-photos",
        "images/s",
        worst.get("ceiling", {}).get("images_per_s", 0.0),
        worst.get(mode, {}).get("images_per_s", 0.0),
        {
            "engine": args.engine,
            "model": args.model,
            "weights": "random (load_format=dummy), real-size config"
            if args.engine == "vllm"
            else "random bf16 safetensors (make_weights.py), real-size config",
            "images_per_size": args.images,
            "sizes": args.sizes,
            "mixed_set": [f"{w}x{h}" for w, h in MIXED],
            "photos": "JPEG q90, photo-like (vlmq.worker.samples.photo)",
            "prompt": PROMPT,
            "max_tokens": args.max_tokens,
            "engine_options": options,
            "preset": args.preset_name,  # what the -e options beyond the bench's own are
            "run_batch_default_options": _default_options(args),
            "worker_max_in_flight": args.in_flight,
            "modes": args.modes,
            "image_pool": args.image_pool,  # the "vlmq" mode's; "vlmq_process" runs the process pool
            "engine_waiting_target": ctx["worker"].settings.engine_waiting_target,
            "repeat": args.repeat,
            "engine_start_s": started,
            "device": hardware(),
            "top_level": f"baseline/value/ratio are the size with the lowest {mode} / ceiling",
        }
        | ({"partial": partial + ": the run did not end"} if partial else {}),
        rows=rows,
        feature_jobs=checks,
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="vllm")
    ap.add_argument("--model", default="fake")
    ap.add_argument("--images", type=int, default=600, help="photos per size")
    ap.add_argument("--sizes", default="1024x768,2048x1536,4032x3024,mixed")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.42)
    ap.add_argument("--in-flight", type=int, default=384)
    ap.add_argument("--image-pool", default="thread", help="the vlmq worker's image pool: thread | process")
    ap.add_argument(
        "--waiting-target",
        type=int,
        default=None,
        help="the workers' engine_waiting_target (default: the worker's own)",
    )
    ap.add_argument(
        "--modes",
        default=",".join(MODES),
        help="also vlmq@N, vlmq_process@N: that pool with engine_waiting_target N, on a worker of its own",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs of each mode per size; medians are kept")
    ap.add_argument(
        "--run-batch-first",
        action="store_true",
        help="run vLLM's run-batch on every size first and close it (a model too big for two engines)",
    )
    ap.add_argument("-e", "--engine-arg", action="append", default=[], help="more engine options key=value")
    ap.add_argument("--name", default=None)
    ap.add_argument(
        "--preset-name", default=None, help="names the -e options in the result (settings.preset)"
    )
    return ap.parse_args()


async def main() -> None:
    args = parse_args()
    from vlmq.core.logs import configure

    configure("console", "WARNING")
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:  # before the stack starts: a refused mode leaves nothing running
        base, target = variant(mode)
        if base not in MODES or (target is not None and not base.startswith("vlmq")):
            raise SystemExit(f"unknown mode {mode!r}: {', '.join(MODES)}, or vlmq[_process]@TARGET")
    if args.engine != "vllm":  # run-batch is vLLM's; without a renderer, "render" is "ceiling"
        modes = [m for m in modes if not m.startswith("run_batch") and m != "render"]
    tmp = Path(tempfile.mkdtemp(prefix="vlmq-gpu-"))
    stack = Stack(tmp / "stack", partitions=8)
    env = await asyncio.to_thread(stack.up)
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    options = engine_options(args)
    ctx: dict[str, Any] = {"env": env, "tmp": tmp}
    try:
        ctx |= await prepare_data(args, env, tmp)
        t0 = time.perf_counter()
        ctx["run_batch"] = {}
        for mode in (m for m in modes if m.startswith("run_batch")):  # first, alone while it sizes its memory
            rb_options = _default_options(args) if mode == "run_batch_default" else options
            rb = ctx["run_batch"][mode] = await RunBatch.start(args, rb_options, tmp, ctx["warm_files"])
            if args.run_batch_first:  # a model too big for two engines at once: the peer, then ours
                ctx.setdefault("run_batch_done", {})[mode] = {
                    size: [await rb.run(ctx["batch_files"][size]) for _ in range(args.repeat)]
                    for size in args.sizes.split(",")
                }
                await ctx["run_batch"].pop(mode).close()
        rb_started = round(time.perf_counter() - t0, 1)
        engine = ctx["engine"] = make_engine(args.engine, args.model, options)
        t0 = time.perf_counter()
        await engine.start()
        ctx["worker"], serving = await start_worker(engine, env, args, args.image_pool)
        for mode in modes:  # vlmq_process and @target variants: a worker and topic each
            if (topic := topic_of(mode)) is None:
                continue
            await asyncio.to_thread(ensure_topics, env["VLMQ_KAFKA_BOOTSTRAP"], stack.partitions, topic)
            base, target = variant(mode)
            pool: Literal["process", "thread"] = "process" if base == "vlmq_process" else args.image_pool
            ctx.setdefault("workers", []).append(
                await start_worker(Lent(engine), env, args, pool, topic, target)
            )
        started = round(time.perf_counter() - t0, 1)
        print(f"engines up: run-batch {rb_started}s, vlmq's engine and worker {started}s", flush=True)
        await ceiling(engine, ctx["warm_blobs"], 8)
        if "render" in modes:
            ctx["render_pool"] = await render_pool(engine, ctx["worker"].settings)
            await render(engine, ctx["render_pool"], ctx["warm_blobs"], 8, args.in_flight)
        sizes = args.sizes.split(",")
        rows: list[dict[str, Any]] = []
        for size in sizes:  # saved after each size: a machine given back mid-run keeps what ended
            rows.append(await measure_size(size, ctx, args, modes))
            save(args, options, ctx, started, rows, {}, f"{len(rows)} of {len(sizes)} sizes")
        any_size = next(iter(ctx["uris"].values()))
        checks = await features(env, any_size) if "vlmq" in modes else {}
        for worker, running in ctx.get("workers", []):
            worker.stop()
            await running
        ctx["worker"].stop()
        await serving
        save(args, options, ctx, started, rows, checks, None)
    finally:
        if "render_pool" in ctx:
            ctx["render_pool"].close()
        for rb in ctx.get("run_batch", {}).values():
            await rb.close()
        if "engine" in ctx:
            await ctx["engine"].close()
        stack.down()


if __name__ == "__main__":
    asyncio.run(main())
