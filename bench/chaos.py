"""Chaos run: submit N jobs, run several workers, break things, then check every job.

Faults, at random moments while the backlog drains: `kill -9` of a random worker (then
restarted), a broker stall (SIGSTOP of tansu, then SIGCONT: tansu keeps data in memory
only, so it is stalled rather than restarted), a Redis restart (a private redis-server with
appendonly yes and appendfsync always, killed -9 and started again on the same port and
files), an S3 outage (moto_server stopped, then continued). Afterwards each job must be
terminal, ended exactly once (the `terminal_writes` counter the Lua script keeps), with the
fake engine's deterministic answer; every batch's counters must equal its jobs' states;
and no partition's committed offset may pass its end.

With `--redis-cluster`, Redis is a 3-master + 3-replica cluster, and the Redis fault is a
kill -9 of the master that owns most of the jobs' slots (its replica takes over; the old
master is started again `--redis-down-s` later and rejoins as a replica):

    python bench/chaos.py --jobs 10000 --workers 3 --kills 5 --stall-s 20 --s3-outage-s 10
    python bench/chaos.py --redis-cluster --jobs 20000 --batches 3 --workers 2 --kills 1 \
        --stall-s 0 --s3-outage-s 0 --name chaos-redis-cluster
Exit status 1 when anything was lost, duplicated or wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from redis.asyncio import RedisCluster
from redis.exceptions import RedisError

from bench.common import hardware, write_result
from vlmq.core.settings import Connection
from vlmq.core.state import StateStore
from vlmq.core.topology import connect_redis
from vlmq.deploy.stack import Stack
from vlmq.producer import Client, caption
from vlmq.schemas import keys
from vlmq.schemas.job import Job, JobState, Result
from vlmq.worker.engines.base import EngineRequest
from vlmq.worker.engines.fake import answer
from vlmq.worker.preprocess import load_image
from vlmq.worker.samples import photo
from vlmq.worker.settings import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS

N_IMAGES = 16


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.tmp = Path(tempfile.mkdtemp(prefix="vlmq-chaos-"))
        self.stack = Stack(self.tmp / "stack", partitions=args.partitions)
        self.tag = f"chaos-{int(time.time())}"
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.faults: list[str] = []
        self.rnd = random.Random(args.seed)
        self.batches: list[str] = []
        self.job_ids: list[str] = []
        # The fake engine's pace (a subclass may slow it down to stretch a run over its faults).
        self.engine_args = "step_ms=5,max_num_seqs=32,completion_tokens=8"
        self.cluster_args: list[str] = []  # redis-server settings of every cluster node

    def up(self) -> None:
        if self.a.redis_cluster:  # durability comes from the replicas (and WAIT)
            self.env = self.stack.up(redis_cluster=True, redis_args=self.cluster_args)
        else:
            self.env = self.stack.up(redis_args=["--appendonly", "yes", "--appendfsync", "always"])
        self.conn = Connection.load(
            {
                "kafka_bootstrap": self.env["VLMQ_KAFKA_BOOTSTRAP"],
                "redis_url": self.env["VLMQ_REDIS_URL"],
                "redis_topology": self.env.get("VLMQ_REDIS_TOPOLOGY", "single"),
            }
        )
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("AWS_")})

    def worker(self, name: str) -> None:
        env = {
            **os.environ,
            **self.env,
            "VLMQ_JOBS_TOPIC": self.tag,
            "VLMQ_DLQ_TOPIC": f"{self.tag}.dlq",
            "VLMQ_GROUP_ID": self.tag,
            "VLMQ_WORKER_ID": name,
            "VLMQ_METRICS_PORT": "0",
            "VLMQ_LOG_FORMAT": "json",
            "VLMQ_LOG_LEVEL": "WARNING",
            "VLMQ_COMMIT_INTERVAL_S": "0.5",
            "VLMQ_SESSION_TIMEOUT_MS": "6000",
            "VLMQ_S3_TIMEOUT_S": "2",
            "VLMQ_FETCH_RETRY_S": "120",
            "VLMQ_MAX_IN_FLIGHT": "64",
            "VLMQ_LEASE_S": "10",  # a killed worker's jobs wait this long for their next owner
            "VLMQ_ENGINE_ARGS": self.engine_args,
        }
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the worker
        self.workers[name] = subprocess.Popen(
            [sys.executable, "-m", "vlmq.worker", "--engine", "fake"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def inject(self, stop: asyncio.Event) -> None:
        plan = (
            ["kill"] * self.a.kills
            + (["stall"] if self.a.stall_s else [])
            + (["redis"] if self.a.redis_restart else [])
            + (["s3"] if self.a.s3_outage_s else [])
        )
        self.rnd.shuffle(plan)
        for fault in plan:
            await asyncio.sleep(self.rnd.uniform(0.5, self.a.gap_s))
            if stop.is_set():
                return
            await getattr(self, f"_{fault}")()

    async def _kill(self) -> None:
        name = self.rnd.choice(sorted(self.workers))
        self.workers[name].send_signal(signal.SIGKILL)
        self.workers[name].wait()
        self.faults.append(f"kill -9 {name}")
        await asyncio.sleep(1)
        self.worker(name)

    async def _pause(self, service: str, seconds: float, what: str) -> None:
        self.stack.signal(service, signal.SIGSTOP)
        await asyncio.sleep(seconds)
        self.stack.signal(service, signal.SIGCONT)
        self.faults.append(what)

    async def _stall(self) -> None:
        await self._pause("kafka", self.a.stall_s, f"broker stalled {self.a.stall_s}s")

    async def _s3(self) -> None:
        await self._pause("s3", self.a.s3_outage_s, f"S3 down {self.a.s3_outage_s}s")

    async def _redis(self) -> None:
        if self.a.redis_cluster:
            await self._kill_busiest_master()
            return
        await asyncio.to_thread(self.stack.restart, "redis")
        self.faults.append("redis-server killed -9 and restarted (AOF)")

    async def shard_masters(self) -> dict[int, str]:
        """shard -> the address (host:port) of the master that owns its slot now."""
        redis = connect_redis(self.conn)
        assert isinstance(redis, RedisCluster)
        await redis.initialize()
        owners = {s: n.name for s in range(keys.SHARDS) if (n := redis.get_node_from_key(keys.tag(s)))}
        await redis.aclose()
        return owners

    def node_at(self, address: str) -> str:
        """The stack's name (redis-1..6) of the cluster node at host:port."""
        return next(n for n, svc in self.stack.services.items() if svc.url == f"redis://{address}/0")

    async def busiest_master(self, job_ids: list[str]) -> tuple[str, int]:
        """The master owning the most of these jobs' shards: (its address, how many)."""
        owners = await self.shard_masters()
        return Counter(owners[s] for s in set(map(keys.shard, job_ids))).most_common(1)[0]

    async def _kill_busiest_master(self) -> None:
        """kill -9 the master that owns the most of the jobs' slots; its replica takes over."""
        busiest, slots = await self.busiest_master(self.job_ids)
        name = self.node_at(busiest)
        self.stack.kill(name)
        self.faults.append(f"Redis master {name} ({busiest}, {slots} of the jobs' 256 shards) killed -9")
        # As an orchestrator would, start it again: it rejoins as its successor's replica,
        # so WAIT can be answered again for those slots (until then their jobs wait).
        await asyncio.sleep(self.a.redis_down_s)
        await asyncio.to_thread(self.stack.restart, name)
        self.faults.append(f"{name} restarted after {self.a.redis_down_s:.0f}s, now a replica")

    def stop(self) -> None:
        for p in self.workers.values():
            p.kill()
            p.wait()
        self.stack.down()


async def make_topics(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, partitions, 1), NewTopic(f"{topic}.dlq", 1, 1)])
    await admin.close()


def expected_answers(blobs: list[bytes], jobs: list[Job]) -> dict[int, str]:
    out = {}
    for i in range(N_IMAGES):
        img = load_image(
            blobs[i],
            factor=28,
            min_pixels=QWEN_MIN_PIXELS,
            max_pixels=QWEN_MAX_PIXELS,
            max_image_pixels=64_000_000,
        )
        out[i] = answer(
            EngineRequest(request_id="x", messages=jobs[i].messages, images=[img], sampling=jobs[i].sampling)
        )
    return out


async def finished(c: Chaos, batches: list[str]) -> int | None:
    """Jobs of these batches that have ended, from their counters; None while Redis (or a
    master that is failing over) does not answer."""
    redis = connect_redis(c.conn)
    try:
        store = StateStore(redis)
        return sum([(await store.batch_counts(b)).finished for b in batches])
    except (RedisError, OSError):
        return None
    finally:
        await redis.aclose()


async def wait_all(c: Chaos, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await finished(c, c.batches) or 0) >= n:
            return
        await asyncio.sleep(0.5)


async def counter_mismatches(store: StateStore, jobs: list[Job], states: list[JobState | None]) -> int:
    """Batches whose counters differ from the states of their jobs, read one by one."""
    bad = 0
    for batch in sorted({j.batch_id for j in jobs if j.batch_id}):
        mine = Counter(s.value for j, s in zip(jobs, states, strict=True) if j.batch_id == batch and s)
        c = await store.batch_counts(batch)
        got = {"queued": c.queued, "running": c.running, "succeeded": c.succeeded, "failed": c.failed}
        got |= {"cancelled": c.cancelled, "expired": c.expired}
        bad += c.total != len([j for j in jobs if j.batch_id == batch]) or any(
            got[k] != mine.get(k, 0) for k in got
        )
    return bad


async def read_jobs(c: Chaos, jobs: list[Job]) -> tuple[list[Result | None], list[int]]:
    """Each job's record (None where Redis has none) and its `terminal_writes` counter."""
    redis = connect_redis(c.conn)
    store = StateStore(redis)
    results: list[Result | None] = []
    writes: list[int] = []
    for start in range(0, len(jobs), 2000):
        chunk = jobs[start : start + 2000]
        results += await store.get_many([j.job_id for j in chunk])
        pipe = redis.pipeline(transaction=False)
        for j in chunk:
            pipe.hget(keys.job_key(j.job_id), "terminal_writes")
        writes += [int(w or 0) for w in await pipe.execute()]
    await redis.aclose()
    return results, writes


async def verify(c: Chaos, jobs: list[Job], expected: dict[int, str]) -> dict[str, Any]:
    """lost (never terminal), duplicated (ended more than once), wrong (not the engine's
    answer, or not succeeded), counter mismatches, offsets; `failed`: the wrong ones that
    ended failed (by error code in `failed_codes`)."""
    results, writes = await read_jobs(c, jobs)
    lost = dup = wrong = 0
    failed: Counter[str] = Counter()
    for k, (r, w) in enumerate(zip(results, writes, strict=True)):
        if r is None or not r.state.terminal:
            lost += 1
        elif w != 1:
            dup += 1
        elif r.state is not JobState.SUCCEEDED or r.text != expected[k % N_IMAGES]:
            wrong += 1
            if r.state is JobState.FAILED:
                failed[r.error.code.value if r.error else ""] += 1
    redis = connect_redis(c.conn)
    mismatches = await counter_mismatches(StateStore(redis), jobs, [r.state if r else None for r in results])
    await redis.aclose()
    return {
        "lost": lost,
        "duplicated": dup,
        "wrong": wrong,
        "counter_mismatches": mismatches,
        **await offsets(c),
        "failed": sum(failed.values()),
        "failed_codes": dict(failed),
    }


async def offsets(c: Chaos) -> dict[str, Any]:
    """Committed offsets never pass the end of their partition (and cover all of it)."""
    consumer = AIOKafkaConsumer(
        c.tag,
        bootstrap_servers=c.env["VLMQ_KAFKA_BOOTSTRAP"],
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    sizes: dict[int, int] = {}
    while True:
        batch = await consumer.getmany(timeout_ms=1500)
        if not batch:
            break
        for tp, msgs in batch.items():
            sizes[tp.partition] = max(sizes.get(tp.partition, 0), msgs[-1].offset + 1)
    await consumer.stop()
    group = AIOKafkaConsumer(
        bootstrap_servers=c.env["VLMQ_KAFKA_BOOTSTRAP"], group_id=c.tag, enable_auto_commit=False
    )
    await group.start()
    past_end = 0
    committed_total = 0
    for p in range(c.a.partitions):
        committed = await group.committed(TopicPartition(c.tag, p)) or 0
        committed_total += committed
        past_end += committed > sizes.get(p, 0)
    await group.stop()
    return {
        "partitions_committed_past_end": past_end,
        "messages": sum(sizes.values()),
        "committed": committed_total,
    }


async def prepare(c: Chaos, n: int, batches: int) -> tuple[list[Job], dict[int, str]]:
    """Topics, the images in S3, and n caption jobs spread over `batches` batches (job i in
    batch i % batches): (the jobs, the fake engine's answer for job i at i % N_IMAGES)."""
    await make_topics(c.env["VLMQ_KAFKA_BOOTSTRAP"], c.tag, c.a.partitions)
    s3 = boto3.client("s3", endpoint_url=c.env["VLMQ_S3_ENDPOINT_URL"])
    s3.create_bucket(Bucket="chaos")
    blobs = [photo(96, 72, seed=i) for i in range(N_IMAGES)]
    for i, b in enumerate(blobs):
        s3.put_object(Bucket="chaos", Key=f"{i}.jpg", Body=b)
    c.batches = [f"{c.tag}-b{b}" for b in range(batches)]
    jobs = [
        caption(f"s3://chaos/{i % N_IMAGES}.jpg", job_id=f"{c.tag}-{i}", batch_id=c.batches[i % batches])
        for i in range(n)
    ]
    c.job_ids = [j.job_id for j in jobs]
    return jobs, expected_answers(blobs, jobs)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--stall-s", type=float, default=20)
    ap.add_argument("--redis-restart", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--redis-cluster", action="store_true", help="a 3+3 Redis Cluster; kill a master")
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--redis-down-s", type=float, default=5, help="a killed cluster master restarts after")
    ap.add_argument("--s3-outage-s", type=float, default=10)
    ap.add_argument("--gap-s", type=float, default=4, help="most seconds between two faults")
    ap.add_argument("--timeout-s", type=float, default=900)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--name", default="chaos")
    args = ap.parse_args()
    c = Chaos(args)
    t0 = time.perf_counter()
    try:
        await asyncio.to_thread(c.up)
        jobs, expected = await prepare(c, args.jobs, args.batches)
        for w in range(args.workers):
            c.worker(f"w{w}")
        async with Client(topic=c.tag, settings=c.conn) as client:
            await client.submit_many(jobs)
        stop = asyncio.Event()
        faults = asyncio.create_task(c.inject(stop))
        await wait_all(c, args.jobs, args.timeout_s)
        stop.set()
        await faults
        report = await verify(c, jobs, expected)
    finally:
        c.stop()
    wall = time.perf_counter() - t0
    row = {"jobs": args.jobs, **report, "faults_injected": len(c.faults), "wall_s": round(wall, 1)}
    print("\n" + " | ".join(f"{k}: {v}" for k, v in row.items()))
    print("faults:", "; ".join(c.faults))
    ok = (
        report["lost"]
        == report["duplicated"]
        == report["wrong"]
        == report["counter_mismatches"]
        == report["partitions_committed_past_end"]
        == 0
    )
    bad = report["lost"] + report["duplicated"] + report["wrong"]
    write_result(
        args.name,
        "jobs correct",
        args.jobs,
        args.jobs - bad,
        {k: v for k, v in vars(args).items() if k != "name"} | {"device": hardware()},
        **row,
        faults=c.faults,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
