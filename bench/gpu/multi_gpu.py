"""One worker per GPU in one consumer group: throughput of 2 workers vs 1, and nothing lost
or double-finished when one of them is stopped mid-run.

Real `vlmq worker --engine vllm` processes pinned with CUDA_VISIBLE_DEVICES, on one topic
and group, Kafka/Redis/S3 local. Each phase starts on warm engines (an unmeasured warm-up
batch first). Phase A: worker 0 alone, batch A. Phase B: worker 1 joins (the group
rebalances), batch B. Phase C: batch C, worker 1 gets SIGTERM when a third of it
is done. Every job of C must end once, succeeded.

    python bench/gpu/multi_gpu.py --model /tmp/models/qwen2-vl-7b --images 1000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import boto3
from redis.asyncio import Redis

from bench.common import hardware, write_result
from bench.gpu.bench_e2e import write_manifest
from bench.gpu.gpu_sampler import GpuSampler
from bench.gpu.photos import make_images, shapes
from vlmq.core.state import StateStore
from vlmq.deploy.stack import Stack, free_port, wait_until, worker_ready
from vlmq.schemas import keys

TOPIC, GROUP = "vlmq.jobs", "gpu-workers"


def start_worker(
    env: dict[str, str], gpu: int, model: str, tmp: Path, max_num_seqs: int, engine: str = "vllm"
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    wenv = {
        **os.environ,
        **env,
        "CUDA_VISIBLE_DEVICES": str(gpu),
        "VLMQ_GROUP_ID": GROUP,
        "VLMQ_JOBS_TOPIC": TOPIC,
        "VLMQ_METRICS_PORT": str(port),
        "VLMQ_LOG_LEVEL": "WARNING",
        "VLMQ_MAX_IN_FLIGHT": "384",
        "VLMQ_WORKER_ID": f"gpu{gpu}",
        "NCCL_NVLS_ENABLE": "0",
    }
    args = [sys.executable, "-m", "vlmq.worker", "--engine", engine, "--model", model]
    options: tuple[str, ...] = (
        "load_format=dummy",
        "max_model_len=8192",
        f"max_num_seqs={max_num_seqs}",
        "gpu_memory_utilization=0.85",
        "enable_prefix_caching=false",
        "ignore_eos=true",
    )
    if engine == "fake":  # a CPU dry run of the script
        options = ("step_ms=20", f"max_num_seqs={max_num_seqs}", "completion_tokens=64")
    for kv in options:
        args += ["-e", kv]
    log = open(tmp / f"gpu{gpu}.log", "ab")  # noqa: SIM115 - lives as long as the worker
    return subprocess.Popen(
        args, env=wenv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    ), port


def submit(env: dict[str, str], batch: str, n: int, tmp: Path) -> None:
    manifest = write_manifest(tmp / f"{batch}.jsonl", [f"s3://bench/img/{i:05d}.jpg" for i in range(n)], 64)
    subprocess.run(
        [sys.executable, "-m", "vlmq.cli", "bulk", "submit", batch, "--manifest", str(manifest)],
        env={**os.environ, **env, "VLMQ_JOBS_TOPIC": TOPIC},
        check=True,
        capture_output=True,
    )


async def measure(env: dict[str, str], batch: str, n: int, on_third: Any = None) -> dict[str, Any]:
    redis = Redis.from_url(env["VLMQ_REDIS_URL"])
    store = StateStore(redis)
    fired = False
    with GpuSampler() as gpu:
        while (c := await store.batch_counts(batch)).finished < n:
            if on_third and not fired and c.finished >= n // 3:
                on_third()
                fired = True
            await asyncio.sleep(0.25)
    results = [r async for r in store.iter_batch(batch)]
    pipe = redis.pipeline(transaction=False)
    for r in results:
        pipe.hget(keys.job_key(r.job_id), "terminal_writes")
    writes = [int(w or 0) for w in await pipe.execute()]
    await redis.aclose()
    t = [r.timings for r in results if r.timings]
    wall = max(x.finished_at for x in t if x.finished_at) - min(x.submitted_at for x in t if x.submitted_at)
    return {
        "images": n,
        "seconds": round(wall, 2),
        "images_per_s": round(n / wall, 2),
        "succeeded": sum(r.state.value == "succeeded" for r in results),
        "ended_once": sum(w == 1 for w in writes),
        "workers": sorted({r.worker or "" for r in results}),
        "gpu_util_per_gpu_pct": gpu.per_gpu,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--engine", default="vllm", help="vllm, or fake for a dry run on the CPU")
    ap.add_argument("--warmup", type=int, default=256, help="unmeasured images before each phase's workers")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vlmq-multi-"))
    blobs = make_images(shapes("1024x768", args.images))
    stack = Stack(tmp / "stack", partitions=16)
    env = await asyncio.to_thread(stack.up)
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    procs: list[subprocess.Popen[bytes]] = []
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
        w0, p0 = start_worker(env, 0, args.model, tmp, args.max_num_seqs, args.engine)
        procs.append(w0)
        wait_until(lambda: worker_ready(p0), "worker gpu0", timeout=600)
        # Warm-up batches (not measured): a fresh vLLM engine JIT-compiles kernels on its
        # first requests; the phases compare warm engines.
        submit(env, "warm0", args.warmup, tmp)
        await measure(env, "warm0", args.warmup)
        submit(env, "A", args.images, tmp)
        a = await measure(env, "A", args.images)
        print("1 worker", a, flush=True)
        w1, p1 = start_worker(env, 1, args.model, tmp, args.max_num_seqs, args.engine)
        procs.append(w1)
        wait_until(lambda: worker_ready(p1), "worker gpu1", timeout=600)
        await asyncio.sleep(8)  # let the group settle on both members
        submit(env, "warm1", args.warmup * 2, tmp)  # half of it reaches the new worker
        warm = await measure(env, "warm1", args.warmup * 2)
        print("warm-up on both", warm, flush=True)
        submit(env, "B", args.images, tmp)
        b = await measure(env, "B", args.images)
        print("2 workers", b, flush=True)
        submit(env, "C", args.images, tmp)
        c = await measure(env, "C", args.images, on_third=lambda: w1.send_signal(signal.SIGTERM))
        print("2 workers, gpu1 stopped at 1/3", c, "gpu1 exit", w1.wait(120), flush=True)
        write_result(
            f"gpu-multi-{args.engine}",
            "images/s",
            a["images_per_s"],
            b["images_per_s"],
            {
                "model": args.model,
                "weights": "random (load_format=dummy), real-size config",
                "images": args.images,
                "max_num_seqs": args.max_num_seqs,
                "device": hardware(),
                "layout": "one vlmq worker per GPU (CUDA_VISIBLE_DEVICES), one consumer group, 16 partitions",
                "warmup_images": args.warmup,
            },
            one_worker=a,
            two_workers=b,
            stop_one_mid_run=c,
        )
    finally:
        for p in procs:
            p.kill()
        stack.down()


if __name__ == "__main__":
    asyncio.run(main())
