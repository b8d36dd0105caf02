"""Plumbing: jobs/s of one worker (fake engine, zero latency) vs. the raw floor.

The floor is what any Kafka->Redis service must do at least: an aiokafka consumer reading
the same messages and a redis-py pipeline writing one result per message. vlmq does more
per job (decode and validate, an atomic claim, an atomic terminal write with batch
counters and a completion event, offset bookkeeping), and the ratio says what that costs.
Both read the same pre-produced topic; both are timed from first message to last write.

    python bench/plumbing.py --jobs 20000

With `--redis-cluster` the ratio is instead the same worker on a local 3-master Redis
Cluster vs. on one Redis, in the same run (interleaved rounds, the median of each); then a
3-master + 3-replica cluster runs with terminal writes WAITing for 1 replica and without,
to show what durability costs. Each run reports the Redis commands per job and the CPU
of the worker and of the Redis servers per 1,000 jobs.

    python bench/plumbing.py --jobs 20000 --redis-cluster --name plumbing-redis-cluster
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from redis.asyncio import Redis

from bench.common import (
    cpu_s,
    flush_masters,
    peak_rss_mib,
    per_job,
    redis_commands,
    redis_pids,
    start_cluster,
    start_stack,
    write_result,
)
from vlmq.core.settings import Connection
from vlmq.core.state import StateStore
from vlmq.core.topology import connect_redis
from vlmq.deploy.stack import Stack
from vlmq.schemas.codec import encode_job
from vlmq.schemas.job import Job, Message


async def produce(bootstrap: str, topic: str, n: int, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, partitions, 1)])
    await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=5, max_batch_size=1 << 20
    )
    await producer.start()
    futs = []
    for i in range(n):
        job = Job(job_id=f"{topic}-{i}", messages=[Message("user", f"caption number {i}")], batch_id=topic)
        value, headers = encode_job(job)
        futs.append(await producer.send(topic, value, key=job.job_id.encode(), headers=headers))
    await asyncio.gather(*futs)
    await producer.stop()


async def floor(bootstrap: str, redis_url: str, topic: str, n: int) -> float:
    """Raw: consume the messages, write one JSON result per message with a pipeline."""
    redis = Redis.from_url(redis_url)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"floor-{uuid.uuid4().hex}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    done, t0 = 0, None
    while done < n:
        batch = await consumer.getmany(timeout_ms=1000, max_records=2000)
        if t0 is None and batch:
            t0 = time.perf_counter()
        pipe = redis.pipeline(transaction=False)
        for records in batch.values():
            for m in records:
                pipe.set(f"floor:{m.key.decode()}", b'{"state":"succeeded","text":"x"}', ex=600)
                done += 1
        await pipe.execute()
        await consumer.commit()
    elapsed = time.perf_counter() - (t0 or 0)
    await consumer.stop()
    await redis.aclose()
    return n / elapsed


# VLMQ_BENCH_PROFILE=out.prof runs the worker under cProfile (the drain writes the file).
_PROF = os.environ.get("VLMQ_BENCH_PROFILE")
PROFILE = ["-m", "cProfile", "-o", _PROF] if _PROF else []


async def vlmq_worker(
    env: dict[str, str], topic: str, n: int, in_flight: int, cwd: str | None = None, steady: bool = False
) -> tuple[float, int, float]:
    """The real `vlmq worker` process; returns (jobs/s, peak RSS in MiB, CPU seconds). Its
    group is new, so it reads the topic from the start whatever ran before. `cwd`: another
    checkout's code runs (`vlmq` imports from the working directory's folder of links).
    `steady`: the CPU seconds of n jobs served, without the worker's start-up."""
    wenv = {
        **os.environ,
        **env,
        "VLMQ_JOBS_TOPIC": topic,
        "VLMQ_GROUP_ID": f"w-{uuid.uuid4().hex}",
        "VLMQ_METRICS_PORT": "0",
        "VLMQ_LOG_LEVEL": "WARNING",
        "VLMQ_MAX_IN_FLIGHT": str(in_flight),
        # The jobs were produced straight to Kafka, as a trusted producer may (no submit
        # records to make in each Redis this bench compares); the digest check still runs.
        "VLMQ_REQUIRE_SUBMIT_RECORD": "false",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *PROFILE, "-m", "vlmq.worker", "--engine", "fake", env=wenv, cwd=cwd
    )
    redis = connect_redis(
        Connection.load(
            {"redis_url": env["VLMQ_REDIS_URL"], "redis_topology": env.get("VLMQ_REDIS_TOPOLOGY", "single")}
        )
    )
    store = StateStore(redis)
    ids = [f"{topic}-{i}" for i in range(n)]
    try:
        # The batch counter is one cheap read; the records are read once, at the end.
        first: tuple[float, int] | None = None  # the CPU used when the first jobs had ended
        while (finished := (await store.batch_counts(topic)).finished) < n:
            if proc.returncode is not None:
                raise SystemExit(f"the worker exited with {proc.returncode}")
            if first is None and finished:
                first = cpu_s(proc.pid), finished
            await asyncio.sleep(0.5)  # a count reads 512 keys: poll gently
        peak, cpu = peak_rss_mib(proc.pid), cpu_s(proc.pid)
        if steady and first is not None and first[1] < n:  # start-up (imports, connects) left out
            cpu = (cpu - first[0]) * n / (n - first[1])
        results = []
        for i in range(0, n, 5000):
            results += await store.get_many(ids[i : i + 5000])
        assert all(r is not None and r.state.terminal for r in results)
    finally:
        proc.terminate()
        await proc.wait()
        await redis.aclose()
    start = min(r.timings.started_at for r in results if r and r.timings and r.timings.started_at)
    end = max(r.timings.finished_at for r in results if r and r.timings and r.timings.finished_at)
    return n / (end - start), peak, cpu


async def on_topology(
    env: dict[str, str], urls: list[str], pids: list[int], topic: str, n: int, in_flight: int
) -> dict[str, Any]:
    """One worker run: jobs/s, Redis commands per job, CPU per 1,000 jobs of the worker and
    of the Redis servers (`pids`: on one box they share the cores)."""
    before, redis_cpu = await asyncio.to_thread(redis_commands, urls), sum(map(cpu_s, pids))
    value, peak, cpu = await vlmq_worker(env, topic, n, in_flight)
    used = per_job(before, await asyncio.to_thread(redis_commands, urls), n)
    redis_cpu = sum(map(cpu_s, pids)) - redis_cpu
    return {
        "jobs_per_s": round(value, 1),
        **used,
        "worker_cpu_s_per_1k_jobs": round(cpu * 1000 / n, 3),
        "redis_cpu_s_per_1k_jobs": round(redis_cpu * 1000 / n, 3),
        "peak_rss_mib": peak,
    }


async def cluster_runs(args: argparse.Namespace, stack: Stack, env: dict[str, str], topic: str) -> None:
    """One Redis vs a 3-master cluster, `--rounds` times each, interleaved, on the same
    topic and jobs (each run on emptied servers); the median run of each is compared (a
    2-core box running Kafka, the Redis servers and the worker is noisy). Then, as the
    price of durability, a 3-master + 3-replica cluster with WAIT 1 and without."""
    single = (env, [env["VLMQ_REDIS_URL"]], redis_pids(stack))
    runs: dict[str, list[dict[str, Any]]] = {}

    async def measure(name: str, setup: tuple[dict[str, str], list[str], list[int]]) -> None:
        await asyncio.to_thread(flush_masters, setup[1])  # the same job ids again: a clean slate
        run = await on_topology(*setup, topic, args.jobs, args.max_in_flight)
        runs.setdefault(name, []).append(run)
        print(f"{name:22} {run}", flush=True)

    for replicas in (False, True):
        cluster, nodes = await asyncio.to_thread(start_cluster, replicas)
        cenv = env | {"VLMQ_REDIS_URL": cluster.services["redis"].url, "VLMQ_REDIS_TOPOLOGY": "cluster"}
        try:
            if not replicas:
                for _ in range(args.rounds):
                    await measure("one_redis", single)
                    await measure("cluster", (cenv, nodes, redis_pids(cluster)))
            else:
                await measure("cluster_replicas_wait_1", (cenv, nodes, redis_pids(cluster)))
                no_wait = cenv | {"VLMQ_REDIS_WAIT_REPLICAS": "0"}
                await measure("cluster_replicas_no_wait", (no_wait, nodes, redis_pids(cluster)))
        finally:
            cluster.down()
    median = {k: sorted(v, key=lambda r: r["jobs_per_s"])[(len(v) - 1) // 2] for k, v in runs.items()}
    base, value = median["one_redis"]["jobs_per_s"], median["cluster"]["jobs_per_s"]
    print(f"ratio 3-master cluster / one Redis (median of {args.rounds}): {value / base:.2f}")
    wait_cost = (
        1 - median["cluster_replicas_wait_1"]["jobs_per_s"] / median["cluster_replicas_no_wait"]["jobs_per_s"]
    )
    write_result(
        args.name,
        "jobs/s",
        base,
        value,
        {
            **settings(args),
            "baseline": "the same worker on one Redis",
            "value": "the worker on a 3-master Redis Cluster",
            "rounds": args.rounds,
            "compared": "the median run of each",
        },
        **median,
        runs=runs,
        wait_cost=round(wait_cost, 3),
    )


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "jobs": args.jobs,
        "partitions": args.partitions,
        "engine": "fake step_ms=0",
        "max_in_flight": args.max_in_flight,
        "job": "text-only, msgpack",
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--max-in-flight", type=int, default=2048)
    ap.add_argument("--redis-cluster", action="store_true", help="compare with a local Redis Cluster")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each setting with --redis-cluster")
    ap.add_argument("--name", default="plumbing")
    args = ap.parse_args()
    stack, env = await asyncio.to_thread(start_stack)  # the stack API is synchronous
    try:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        await produce(env["VLMQ_KAFKA_BOOTSTRAP"], topic, args.jobs, args.partitions)
        if args.redis_cluster:
            await cluster_runs(args, stack, env, topic)
            return
        base = await floor(env["VLMQ_KAFKA_BOOTSTRAP"], env["VLMQ_REDIS_URL"], topic, args.jobs)
        print(f"floor: {base:,.0f} jobs/s", flush=True)
        value, peak, _ = await vlmq_worker(env, topic, args.jobs, args.max_in_flight)
        print(f"vlmq:  {value:,.0f} jobs/s, worker peak RSS {peak} MiB", flush=True)
        write_result(args.name, "jobs/s", base, value, settings(args), worker_peak_rss_mib=peak)
    finally:
        stack.down()


if __name__ == "__main__":
    asyncio.run(main())
