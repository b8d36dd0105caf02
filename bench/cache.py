"""The result cache on the CPU: effective jobs/s of one worker (fake engine at a fixed cost
per job) on backlogs with 0 %, 30 % and 60 % exact duplicates, cache on vs. cache off.

Each backlog has two tenants and three batches, submitted at once through the SDK (each
tenant its own `Client(tenant=...)`), then one real `vlmq worker` process runs it. A
duplicate repeats an earlier job of the same tenant (the same image bytes under another
URL, the same prompt); both tenants use the same images, so each tenant's first copy
runs (a tenant never gets another's answer). The engine's cost is fixed: `--step-ms` x
`--tokens` per job, `--seqs` at once, so the no-duplicate rate is the engine's and the
cache's target is 1/(1 - share) of it (issue 42: at least 0.95 of that).

    python bench/cache.py   # 1,200 jobs a backlog, 1 s a job, 16 at once

Result: bench/results/cache-<hardware>.json: `rows` with `duplicate_share`, `cache`
(on/off), `jobs_per_s`, `engine_runs`, `cached`, `gpu_time_saved_s`; top level: baseline =
the cache-off rate at 0 %, value = the cache-on rate at the largest share, ratio = value /
baseline (the ideal is 1/(1 - share)).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

import boto3
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.common import start_stack, write_result
from vlmq.core.settings import Connection
from vlmq.producer import Client, caption
from vlmq.schemas.job import Job, Result
from vlmq.worker.samples import photo

BATCHES = 3
TENANTS = ("tenant-a", "tenant-b")


def put_images(s3_url: str, bucket: str, n: int) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_url)
    s3.create_bucket(Bucket=bucket)
    for i in range(n):
        s3.put_object(Bucket=bucket, Key=f"img/{i}.jpg", Body=photo(256, 192, seed=i))
    # Each image under a second name: a duplicate is the same bytes, not the same URL.
    for i in range(n):
        s3.copy_object(
            Bucket=bucket, Key=f"dup/{i}.jpg", CopySource={"Bucket": bucket, "Key": f"img/{i}.jpg"}
        )


def backlog(n: int, share: float, bucket: str, run: str, seed: int) -> dict[str, list[Job]]:
    """Per tenant: its jobs in submit order, spread over three batches; `share` of them
    repeat an earlier job of the same tenant."""
    rng = random.Random(seed)
    prompt = f"Describe this image. ({run})"  # a prompt per run: no run meets another's entries
    out: dict[str, list[Job]] = {}
    per_tenant = n // len(TENANTS)
    for t, tenant in enumerate(TENANTS):
        unique = round(per_tenant * (1 - share))
        picks = list(range(unique)) + [rng.randrange(unique) for _ in range(per_tenant - unique)]
        rng.shuffle(picks)
        seen: set[int] = set()
        jobs = []
        for k, img in enumerate(picks):
            folder = "dup" if img in seen else "img"
            seen.add(img)
            batch = f"{run}-{tenant}-{k * BATCHES // per_tenant}"
            uri = f"s3://{bucket}/{folder}/{img}.jpg"
            jobs.append(caption(uri, prompt, job_id=f"{run}-{t}-{k}", batch_id=batch, max_tokens=64))
        out[tenant] = jobs
    return out


async def make_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def run_once(
    env: dict[str, str], args: argparse.Namespace, share: float, cache: bool, bucket: str
) -> dict[str, Any]:
    run = f"c{uuid.uuid4().hex[:8]}"
    topic = f"bench-{run}"
    await make_topic(env["VLMQ_KAFKA_BOOTSTRAP"], topic, args.partitions)
    jobs = backlog(args.jobs, share, bucket, run, args.seed)
    for tenant, tjobs in jobs.items():
        settings = Connection.load({**_conn(env), "tenant": tenant, "jobs_topic": topic})
        async with Client(settings=settings) as c:
            await c.submit_many(tjobs)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vlmq.worker",
        "--engine",
        "fake",
        "-e",
        f"step_ms={args.step_ms}",
        "-e",
        f"completion_tokens={args.tokens}",
        "-e",
        f"max_num_seqs={args.seqs}",
        env={
            **os.environ,
            **env,
            "VLMQ_JOBS_TOPIC": topic,
            "VLMQ_GROUP_ID": f"g-{run}",
            "VLMQ_METRICS_PORT": "0",
            "VLMQ_LOG_LEVEL": "WARNING",
            "VLMQ_MAX_IN_FLIGHT": str(args.max_in_flight),
            "VLMQ_CACHE": "true" if cache else "false",
        },
    )
    ids = [j.job_id for tjobs in jobs.values() for j in tjobs]
    try:
        async with Client(settings=Connection.load(_conn(env))) as c:
            results = await c.wait_many(ids, timeout=args.timeout)
            batches = {j.batch_id for tjobs in jobs.values() for j in tjobs if j.batch_id}
            counted = sum([(await c.batch(b)).succeeded for b in batches])
    finally:
        proc.terminate()
        await proc.wait()
    return _row(results, share, cache, counted, args)


def _conn(env: dict[str, str]) -> dict[str, Any]:
    return {"redis_url": env["VLMQ_REDIS_URL"], "kafka_bootstrap": env["VLMQ_KAFKA_BOOTSTRAP"]}


def _row(
    results: list[Result], share: float, cache: bool, counted: int, args: argparse.Namespace
) -> dict[str, Any]:
    assert all(r.state.value == "succeeded" for r in results), "every job succeeds"
    assert counted == len(results), f"the batches count {counted} of {len(results)}"
    start = min(r.timings.started_at for r in results if r.timings and r.timings.started_at)
    end = max(r.timings.finished_at for r in results if r.timings and r.timings.finished_at)
    cached = sum(r.cached for r in results)
    per_job_s = args.step_ms * args.tokens / 1000
    return {
        "duplicate_share": share,
        "cache": "on" if cache else "off",
        "jobs": len(results),
        "jobs_per_s": round(len(results) / (end - start), 2),
        "engine_runs": len(results) - cached,
        "cached": cached,
        "gpu_time_saved_s": round(cached * per_job_s, 1),  # engine time the cached jobs did not take
        "counted_in_batches": counted,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1200)
    ap.add_argument("--shares", default="0,0.3,0.6")
    ap.add_argument("--step-ms", type=float, default=100.0)
    ap.add_argument("--tokens", type=int, default=10, help="completion tokens: steps per job")
    ap.add_argument("--seqs", type=int, default=16, help="the engine's max_num_seqs")
    ap.add_argument("--max-in-flight", type=int, default=64)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--name", default="cache")
    args = ap.parse_args()
    shares = [float(s) for s in args.shares.split(",")]
    stack, env = await asyncio.to_thread(start_stack)
    try:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(put_images, env["VLMQ_S3_ENDPOINT_URL"], bucket, args.jobs // len(TENANTS))
        rows = []
        for share in shares:
            for cache in (False, True):
                row = await run_once(env, args, share, cache, bucket)
                print(row, flush=True)
                rows.append(row)
    finally:
        stack.down()
    report(rows, args)


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    base = next(r["jobs_per_s"] for r in rows if r["duplicate_share"] == 0 and r["cache"] == "off")
    for r in rows:
        if r["cache"] == "on":
            ideal = base / (1 - r["duplicate_share"])
            r["target_jobs_per_s"] = round(0.95 * ideal, 2)
            r["of_ideal"] = round(r["jobs_per_s"] / ideal, 3)
            r["meets_target"] = r["jobs_per_s"] >= r["target_jobs_per_s"]
    top = max((r for r in rows if r["cache"] == "on"), key=lambda r: r["duplicate_share"])
    settings = {
        "jobs_per_backlog": args.jobs,
        "tenants": len(TENANTS),
        "batches": BATCHES,
        "engine": f"fake, step_ms={args.step_ms}, completion_tokens={args.tokens}, max_num_seqs={args.seqs}"
        f" ({args.step_ms * args.tokens:.0f} ms a job, {args.seqs} at once)",
        "worker": f"one `vlmq worker` process, max_in_flight={args.max_in_flight}, {args.partitions} partitions",
        "images": "256x192 JPEG in S3 (moto); a duplicate is a copy under another key",
        "stack": "tansu, redis-server, moto_server on this machine",
        "top_level": "baseline = cache off at 0 % duplicates; value = cache on at the largest share;"
        " ideal ratio = 1/(1 - share); target: of_ideal >= 0.95",
    }
    write_result(args.name, "jobs/s", base, top["jobs_per_s"], settings, rows=rows)


if __name__ == "__main__":
    asyncio.run(main())
