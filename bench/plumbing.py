"""Plumbing: jobs/s of one worker (fake engine, zero latency) vs. the raw floor.

The floor is what any Kafka->Redis service must do at least: an aiokafka consumer reading
the same messages and a redis-py pipeline writing one result per message. vlmq does more
per job (decode and validate, an atomic claim, an atomic terminal write with batch
counters and a completion event, offset bookkeeping), and the ratio says what that costs.
Both read the same pre-produced topic; both are timed from first message to last write.

    python bench/plumbing.py --jobs 20000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from redis.asyncio import Redis

from bench.common import peak_rss_mib, start_stack, write_result
from vlmq.core.state import StateStore
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


async def vlmq_worker(env: dict[str, str], topic: str, n: int, in_flight: int) -> tuple[float, int]:
    """The real `vlmq worker` process; returns (jobs/s, peak RSS in MiB)."""
    wenv = {
        **os.environ,
        **env,
        "VLMQ_JOBS_TOPIC": topic,
        "VLMQ_GROUP_ID": f"w-{uuid.uuid4().hex}",
        "VLMQ_METRICS_PORT": "0",
        "VLMQ_LOG_LEVEL": "WARNING",
        "VLMQ_MAX_IN_FLIGHT": str(in_flight),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *PROFILE, "-m", "vlmq.worker", "--engine", "fake", env=wenv
    )
    redis = Redis.from_url(env["VLMQ_REDIS_URL"])
    store = StateStore(redis)
    ids = [f"{topic}-{i}" for i in range(n)]
    try:
        # The batch counter is one cheap read; the records are read once, at the end.
        while (await store.batch_counts(topic)).finished < n:
            if proc.returncode is not None:
                raise SystemExit(f"the worker exited with {proc.returncode}")
            await asyncio.sleep(0.2)
        peak = peak_rss_mib(proc.pid)
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
    return n / (end - start), peak


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--max-in-flight", type=int, default=2048)
    ap.add_argument("--name", default="plumbing")
    args = ap.parse_args()
    stack, env = await asyncio.to_thread(start_stack)  # the stack API is synchronous
    try:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        await produce(env["VLMQ_KAFKA_BOOTSTRAP"], topic, args.jobs, args.partitions)
        base = await floor(env["VLMQ_KAFKA_BOOTSTRAP"], env["VLMQ_REDIS_URL"], topic, args.jobs)
        print(f"floor: {base:,.0f} jobs/s", flush=True)
        value, peak = await vlmq_worker(env, topic, args.jobs, args.max_in_flight)
        print(f"vlmq:  {value:,.0f} jobs/s, worker peak RSS {peak} MiB", flush=True)
        write_result(
            args.name,
            "jobs/s",
            base,
            value,
            {
                "jobs": args.jobs,
                "partitions": args.partitions,
                "engine": "fake step_ms=0",
                "max_in_flight": args.max_in_flight,
                "job": "text-only, msgpack",
            },
            worker_peak_rss_mib=peak,
        )
    finally:
        stack.down()


if __name__ == "__main__":
    asyncio.run(main())
