"""Shared test helpers: names per test, photo-like images, worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from vlmq.deploy.stack import http_status, wait_until
from vlmq.producer import Client
from vlmq.schemas import JobState
from vlmq.schemas.codec import content_type_of, message_digest
from vlmq.worker.samples import photo


@dataclass
class Env:
    kafka: str
    redis: str
    s3: str
    jobs_topic: str
    dlq_topic: str
    results_topic: str
    group: str
    bucket: str
    tag: str
    tmp: Path
    topology: str = "single"
    partitions: int = 4
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def worker_env(self, **settings: Any) -> dict[str, str]:
        env = {
            **os.environ,
            "VLMQ_KAFKA_BOOTSTRAP": self.kafka,
            "VLMQ_REDIS_URL": self.redis,
            "VLMQ_REDIS_TOPOLOGY": self.topology,
            "VLMQ_S3_ENDPOINT_URL": self.s3,
            "VLMQ_JOBS_TOPIC": self.jobs_topic,
            "VLMQ_DLQ_TOPIC": self.dlq_topic,
            "VLMQ_GROUP_ID": self.group,
            "VLMQ_METRICS_PORT": "0",
            "VLMQ_LOG_FORMAT": "json",
            "VLMQ_COMMIT_INTERVAL_S": "0.2",
            "VLMQ_SESSION_TIMEOUT_MS": "6000",
            "VLMQ_LEASE_S": "5",  # a killed worker's jobs move on after 5 s, not 30
        }
        env.update({f"VLMQ_{k.upper()}": str(v) for k, v in settings.items()})
        return env


def make_topics(e: Env) -> None:
    async def go() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=e.kafka)
        await admin.start()
        try:
            await admin.create_topics(
                [
                    NewTopic(e.jobs_topic, e.partitions, 1),
                    NewTopic(e.dlq_topic, 1, 1),
                    NewTopic(e.results_topic, 1, 1),
                ]
            )
        finally:
            await admin.close()

    asyncio.run(go())


def put_images(e: Env, n: int, prefix: str = "img", **kw: Any) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=e.s3)
    uris = []
    for i in range(n):
        key = f"{prefix}/{i:05d}.jpg"
        s3.put_object(Bucket=e.bucket, Key=key, Body=photo(seed=i, **kw))
        uris.append(f"s3://{e.bucket}/{key}")
    return uris


def start_worker(
    e: Env,
    name: str = "w",
    *,
    python: str = sys.executable,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    **settings: Any,
) -> subprocess.Popen[bytes]:
    """A real `vlmq worker` process (own session, so kill -9 reaches only it); `python` may
    be another venv's (the CPU engines'), `args` its command-line flags, `env` more variables."""
    log = open(e.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [python, "-m", "vlmq.worker", *args],
        env=e.worker_env(worker_id=name, **settings) | (env or {}),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    e.procs.append(proc)
    return proc


def stop_worker(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout)


def stop_all(e: Env) -> None:
    """Kill every worker's whole process group: a vLLM worker's engine core is a child."""
    for p in e.procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)


def wait_for(check: Any, what: str, timeout: float = 60) -> None:
    wait_until(check, what, timeout)


def log_text(e: Env, name: str) -> str:
    return (e.tmp / f"{name}.log").read_text(errors="replace")


def now() -> float:
    return time.time()


async def wait_running(client: Client, job_id: str, timeout: float = 30) -> None:
    """Until the job's record says `running` (a worker has claimed it)."""
    deadline = time.monotonic() + timeout
    while (await client.status(job_id)).state is not JobState.RUNNING:
        assert time.monotonic() < deadline, f"{job_id} never started"
        await asyncio.sleep(0.05)


# A message produced by hand: (key = its job id, value, headers).
Raw = tuple[str, bytes, Sequence[tuple[str, bytes]]]


async def produce(
    e: Env,
    messages: Iterable[tuple[str, bytes] | Raw],
    *,
    submitted: bool = True,
    batch_id: str | None = None,
) -> None:
    """Messages produced by hand (a non-Python client, a broken producer), keyed by their
    job ids; `submitted`: first recorded as wire.md's enqueue step does (the message's
    digest), so a worker takes them as submitted; otherwise nobody submitted them."""
    raw: list[Raw] = [m if len(m) == 3 else (m[0], m[1], ()) for m in messages]
    if submitted:
        async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
            await client.store.enqueue_many(
                [(key, batch_id, time.time(), {}, message_digest(v, content_type_of(h))) for key, v, h in raw]
            )
    producer = AIOKafkaProducer(
        bootstrap_servers=e.kafka, acks="all", enable_idempotence=False, max_request_size=16 * 1024 * 1024
    )
    await producer.start()
    try:
        for key, value, headers in raw:
            await producer.send_and_wait(e.jobs_topic, value, key=key.encode(), headers=list(headers))
    finally:
        await producer.stop()


async def read_topic(e: Env, topic: str, expect: int, timeout: float = 30) -> list[Any]:
    """Every record of `topic` from the start (no group), waiting for at least `expect`."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=e.kafka, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            got += [m for ms in batch.values() for m in ms]
        if expect == 0:
            batch = await consumer.getmany(timeout_ms=1000)
            got += [m for ms in batch.values() for m in ms]
    finally:
        await consumer.stop()
    return got


async def committed_offsets(e: Env) -> dict[int, int]:
    """The group's committed offset per partition of the jobs topic."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=e.kafka, group_id=e.group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(e.jobs_topic, p) for p in range(e.partitions)]
        return {tp.partition: (await consumer.committed(tp)) or 0 for tp in tps}
    finally:
        await consumer.stop()


@contextlib.contextmanager
def http_server(
    e: Env, name: str, argv: list[str], port: int, timeout: float, env: dict[str, str] | None = None
) -> Iterator[str]:
    """A server process answering GET /health with 200 on `port` (vllm serve, llama-server):
    its base URL while it runs; its whole process group is stopped afterwards; its output in
    e.tmp/<name>.log."""
    with open(e.tmp / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(f"{url}/health") == 200 or proc.poll() is not None, name, timeout)
        assert proc.poll() is None, (e.tmp / f"{name}.log").read_text()[-3000:]
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
