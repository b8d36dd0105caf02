"""Latency at low load: what a service that submits one job and waits for it feels.

One real `vlmq worker` process (fake engine: zero latency, or a fixed per-job time) on a
private stack (tansu, redis-server, moto_server). A client submits jobs and waits for each
with `Client.wait`: one at a time (serial), and open-loop at fixed rates (a job every
1/rate seconds, whatever the previous ones did). Each job's submit -> result time is split
by stage from the client's clock and the record's own timestamps (one machine, one clock):

- produce:  `submit()` returning (Redis enqueue + Kafka produce, acks=all);
- to_worker: from submit until the worker's pipeline starts (Kafka delivery, decode, claim);
- engine:   the engine's own time (`timings.engine_s`);
- finish:   the rest until the client's `wait` returns (the terminal write, publish,
            Kafka result/DLQ where asked, the completion notice reaching the client).

`added` = end-to-end minus engine time. The result JSON's `ratio` is engine / end-to-end
at the median for the 50 ms engine, serially (1.0 would be no overhead at all).

    python bench/latency.py --jobs 300
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

from bench.common import start_stack, write_result
from vlmq.deploy.stack import free_port, worker_ready
from vlmq.producer import Client
from vlmq.schemas import Job, JobState, Message

STAGES = ("produce", "to_worker", "engine", "finish", "added", "total")


async def start_worker(
    env: dict[str, str], step_ms: int, fetch_max_wait_ms: int | None, topic: str | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    """`vlmq worker --engine fake`: each job one token after `step_ms`; on a new topic (and
    group), or on `topic` (a worker replacing one)."""
    topic, port = topic or f"lat-{uuid.uuid4().hex[:8]}", free_port()
    wenv = {
        **os.environ,
        **env,
        "VLMQ_JOBS_TOPIC": topic,
        "VLMQ_GROUP_ID": f"g-{topic}",
        "VLMQ_METRICS_PORT": str(port),
        "VLMQ_LOG_LEVEL": "WARNING",
    }
    if fetch_max_wait_ms is not None:  # else the stack's (10 on tansu)
        wenv["VLMQ_FETCH_MAX_WAIT_MS"] = str(fetch_max_wait_ms)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vlmq.worker", "--engine", "fake",
        "-e", f"step_ms={step_ms}", "-e", "completion_tokens=1", env=wenv,
    )  # fmt: skip
    while not await asyncio.to_thread(worker_ready, port):
        if proc.returncode is not None:
            raise SystemExit(f"the worker exited with {proc.returncode}")
        await asyncio.sleep(0.2)
    return proc, topic


async def one(client: Client, i: int, tag: str) -> dict[str, float]:
    job = Job(job_id=f"{tag}-{i}", messages=[Message("user", "ping")])
    t0_wall, t0 = time.time(), time.perf_counter()
    await client.submit(job)
    t1 = time.perf_counter()
    result = await client.wait(job.job_id, timeout=30)
    t2 = time.perf_counter()
    assert result.state is JobState.SUCCEEDED and result.timings is not None
    tm = result.timings
    engine = tm.engine_s or 0.0
    to_worker = (tm.started_at or t0_wall) - t0_wall
    total = t2 - t0
    return {
        "produce": t1 - t0,
        "to_worker": to_worker,
        "engine": engine,
        "finish": total - to_worker - engine,
        "added": total - engine,
        "total": total,
    }


async def serial(client: Client, n: int, tag: str) -> list[dict[str, float]]:
    return [await one(client, i, tag) for i in range(n)]


async def open_loop(client: Client, n: int, rate: float, tag: str) -> list[dict[str, float]]:
    t0 = time.perf_counter()
    tasks = []
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(client, i, tag)))
    return list(await asyncio.gather(*tasks))


def summary(samples: list[dict[str, float]]) -> dict[str, Any]:
    def pct(values: list[float], q: float) -> float:
        ranked = sorted(values)
        return round(1000 * ranked[min(len(ranked) - 1, int(q * len(ranked)))], 2)

    out: dict[str, Any] = {"jobs": len(samples)}
    for stage in STAGES:
        vals = [s[stage] for s in samples]
        out[f"{stage}_ms"] = {"p50": pct(vals, 0.5), "p90": pct(vals, 0.9), "p99": pct(vals, 0.99)}
    out["mean_total_ms"] = round(1000 * statistics.fmean(s["total"] for s in samples), 2)
    return out


async def scenario(env: dict[str, str], step_ms: int, args: argparse.Namespace) -> dict[str, Any]:
    proc, topic = await start_worker(env, step_ms, args.fetch_max_wait_ms)
    rows: dict[str, Any] = {}
    try:
        kafka = {"linger_ms": args.linger_ms}
        async with Client(
            env["VLMQ_KAFKA_BOOTSTRAP"], env["VLMQ_REDIS_URL"], topic=topic, kafka_options=kafka
        ) as client:
            await serial(client, 20, f"{topic}-warm")  # connections, metadata, first fetches
            rows["serial"] = summary(await serial(client, args.jobs, f"{topic}-s"))
            for rate in args.rates:
                n = max(args.jobs, int(rate * 5))
                rows[f"open_{rate:g}_per_s"] = summary(await open_loop(client, n, rate, f"{topic}-r{rate:g}"))
    finally:
        proc.terminate()
        await proc.wait()
    for name, row in rows.items():
        t = row["total_ms"]
        print(f"engine {step_ms} ms, {name}: p50 {t['p50']} p90 {t['p90']} p99 {t['p99']} ms; "
              f"added p50 {row['added_ms']['p50']} p99 {row['added_ms']['p99']} ms", flush=True)  # fmt: skip
    return rows


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--jobs", type=int, default=300, help="jobs per scenario (open loop: at least 5 s of them)"
    )
    ap.add_argument("--rates", type=float, nargs="*", default=[10.0, 100.0])
    ap.add_argument(
        "--linger-ms", type=int, default=5, help="the client producer's linger_ms (vlmq's default 5)"
    )
    ap.add_argument("--fetch-max-wait-ms", type=int, default=None, help="the worker's (default: the stack's)")
    ap.add_argument("--name", default="latency")
    args = ap.parse_args()
    stack, env = await asyncio.to_thread(start_stack)
    try:
        zero = await scenario(env, 0, args)
        fixed = await scenario(env, 50, args)
    finally:
        stack.down()
    base = fixed["serial"]["engine_ms"]["p50"]
    value = fixed["serial"]["total_ms"]["p50"]
    write_result(
        args.name,
        "ms",
        base,
        value,
        {
            "worker": "one `vlmq worker --engine fake` process, completion_tokens=1",
            "client": "one Client; submit() then wait() per job",
            "client_linger_ms": args.linger_ms,
            "worker_fetch_max_wait_ms": args.fetch_max_wait_ms or int(env.get("VLMQ_FETCH_MAX_WAIT_MS", 500)),
            "jobs_per_scenario": args.jobs,
            "rates_per_s": args.rates,
            "stack": "tansu, redis-server, moto_server on this machine",
            "top_level": "p50 ms, 50 ms engine, serial: baseline = the engine's own time, value = "
            "submit to result; ratio = engine / end-to-end (1.0: no overhead)",
        },
        engine_0ms=zero,
        engine_50ms=fixed,
        ratio=round(base / value, 3) if value else None,
    )


if __name__ == "__main__":
    asyncio.run(main())
