"""Submit throughput: `Client.submit_many` vs. a raw aiokafka producer sending the same
encoded bytes, same broker, same run.

The SDK does more per job: it validates the job (encode, then decode against the
contract), records it in Redis as queued (idempotency: one pipelined Lua call per job),
produces with acks=all, and marks what Kafka acknowledged (so a resumed submit never sends
twice). The raw producer only sends bytes. Also timed: `vlmq bulk submit --manifest` end
to end (a process of its own, reading a JSONL file of the same jobs), as a user runs it.

    python bench/submit.py --jobs 50000

With `--redis-cluster`, `submit_many` runs on one Redis and on a local 3-master +
3-replica Redis Cluster in the same run (the ratio is cluster / one Redis), with the
Redis commands per job on each (on a cluster, one script call per slot and chunk).

    python bench/submit.py --jobs 50000 --redis-cluster
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.common import per_job, redis_commands, start_cluster, start_stack, write_result
from vlmq.core.settings import Connection
from vlmq.producer import Client, caption
from vlmq.schemas import Job
from vlmq.schemas.codec import encode_job


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=50000)
    ap.add_argument("--chunk", type=int, default=2000)
    ap.add_argument("--redis-cluster", action="store_true", help="compare with a local Redis Cluster")
    ap.add_argument(
        "--linger-ms", type=int, default=5, help="both producers' linger_ms (the client's default 5)"
    )
    ap.add_argument("--name", default="submit")
    args = ap.parse_args()
    stack, env = await asyncio.to_thread(start_stack)
    try:
        if args.redis_cluster:
            await cluster_runs(args, env)
            return
        kafka, redis = env["VLMQ_KAFKA_BOOTSTRAP"], env["VLMQ_REDIS_URL"]
        raw_topic, sdk_topic = f"raw-{uuid.uuid4().hex[:6]}", f"sdk-{uuid.uuid4().hex[:6]}"
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
        await admin.start()
        await admin.create_topics([NewTopic(raw_topic, 8, 1), NewTopic(sdk_topic, 8, 1)])
        await admin.close()
        batch = uuid.uuid4().hex[:8]
        jobs = [
            caption(f"s3://photos/{i:07d}.jpg", job_id=f"{batch}-{i}", batch_id=batch)
            for i in range(args.jobs)
        ]

        producer = AIOKafkaProducer(
            bootstrap_servers=kafka,
            acks="all",
            enable_idempotence=False,
            linger_ms=args.linger_ms,
            max_batch_size=1 << 20,
        )
        await producer.start()
        encoded = [encode_job(j) for j in jobs]
        t0 = time.perf_counter()
        for i in range(0, len(jobs), args.chunk):
            futs = [
                await producer.send(raw_topic, v, key=j.job_id.encode(), headers=h)
                for j, (v, h) in zip(jobs[i : i + args.chunk], encoded[i : i + args.chunk], strict=True)
            ]
            await asyncio.gather(*futs)
        base = args.jobs / (time.perf_counter() - t0)
        await producer.stop()

        async with Client(
            kafka, redis, topic=sdk_topic, kafka_options={"linger_ms": args.linger_ms}
        ) as client:
            await client.submit_many(jobs[:10])  # connect outside the timing, as raw did
            t0 = time.perf_counter()
            report = await client.submit_many(jobs[10:], chunk=args.chunk)
            value = (args.jobs - 10) / (time.perf_counter() - t0)
        assert report.sent == args.jobs - 10, report
        cli = await asyncio.to_thread(bulk_cli, env, args.jobs, args.chunk)
        print(
            f"raw aiokafka: {base:,.0f} jobs/s; submit_many: {value:,.0f} jobs/s; vlmq bulk submit: {cli:,.0f}"
        )
        write_result(
            args.name,
            "jobs/s",
            base,
            value,
            {
                "jobs": args.jobs,
                "chunk": args.chunk,
                "acks": "all",
                "linger_ms": args.linger_ms,
                "partitions": 8,
                "job": "caption, one s3:// image, msgpack",
            },
            bulk_cli_jobs_per_s=round(cli, 1),
            bulk_cli_ratio=round(cli / base, 3),
        )
    finally:
        stack.down()


async def sdk_rate(conn: Connection, jobs: list[Job], chunk: int, urls: list[str]) -> dict[str, float]:
    """submit_many's jobs/s (a fresh topic), and the Redis commands it sent per job."""
    topic = f"sdk-{uuid.uuid4().hex[:6]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=conn.kafka_bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 8, 1)])
    await admin.close()
    async with Client(topic=topic, settings=conn) as client:
        await client.submit_many(jobs[:10])  # connect outside the timing
        before = await asyncio.to_thread(redis_commands, urls)
        t0 = time.perf_counter()
        report = await client.submit_many(jobs[10:], chunk=chunk)
        rate = (len(jobs) - 10) / (time.perf_counter() - t0)
        used = per_job(before, await asyncio.to_thread(redis_commands, urls), len(jobs) - 10)
    assert report.sent == len(jobs) - 10, report
    return {"jobs_per_s": round(rate, 1), **used}


async def cluster_runs(args: argparse.Namespace, env: dict[str, str]) -> None:
    cluster, nodes = await asyncio.to_thread(start_cluster)
    try:
        single_conn = Connection.load(
            {"kafka_bootstrap": env["VLMQ_KAFKA_BOOTSTRAP"], "redis_url": env["VLMQ_REDIS_URL"]}
        )
        cluster_conn = msgspec.structs.replace(
            single_conn, redis_url=cluster.services["redis"].url, redis_topology="cluster"
        )
        results = {}
        for name, conn, urls in (
            ("one_redis", single_conn, [env["VLMQ_REDIS_URL"]]),
            ("cluster", cluster_conn, nodes),
        ):
            batch = f"{name}-{uuid.uuid4().hex[:6]}"
            jobs = [
                caption(f"s3://photos/{i:07d}.jpg", job_id=f"{batch}-{i}", batch_id=batch)
                for i in range(args.jobs)
            ]
            results[name] = await sdk_rate(conn, jobs, args.chunk, urls)
            print(f"{name}: {results[name]}", flush=True)
    finally:
        cluster.down()
    write_result(
        "submit-redis-cluster",
        "jobs/s",
        results["one_redis"]["jobs_per_s"],
        results["cluster"]["jobs_per_s"],
        {
            "jobs": args.jobs,
            "chunk": args.chunk,
            "baseline": "submit_many on one Redis",
            "cluster": "3 masters + 3 replicas",
        },
        **results,
    )


def bulk_cli(env: dict[str, str], n: int, chunk: int) -> float:
    """Jobs/s of `vlmq bulk submit --manifest` for n one-image jobs, process start included."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.jsonl"
        manifest.write_text(
            "".join(f'{{"key": "k{i}", "image": "s3://photos/{i:07d}.jpg"}}\n' for i in range(n))
        )
        topic = f"cli-{uuid.uuid4().hex[:6]}"
        cmd = [sys.executable, "-m", "vlmq.cli", "bulk", "submit", topic, "--manifest", str(manifest)]
        t0 = time.perf_counter()
        subprocess.run(
            [*cmd, "--chunk", str(chunk)],
            env={**os.environ, **env, "VLMQ_JOBS_TOPIC": topic},
            check=True,
            capture_output=True,
        )
        return n / (time.perf_counter() - t0)


if __name__ == "__main__":
    asyncio.run(main())
