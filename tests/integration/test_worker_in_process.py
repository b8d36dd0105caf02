"""A worker in this process with its clients handed in (the seam `Worker(..., redis=,
producer=, consumer=)`), against real tansu and redis-server: what it commits is watched
from inside, which a worker process cannot show."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.asyncio import Redis

from tests.helpers import Env, committed_offsets
from vlmq.deploy.stack import free_port, http_status
from vlmq.producer import Client
from vlmq.schemas import Job, JobState, Message
from vlmq.worker.engines.fake import FakeEngine
from vlmq.worker.service import Worker, make_consumer, make_producer
from vlmq.worker.settings import WorkerSettings


def _settings(e: Env) -> WorkerSettings:
    return WorkerSettings(
        kafka_bootstrap=e.kafka,
        redis_url=e.redis,
        s3_endpoint_url=e.s3,
        jobs_topic=e.jobs_topic,
        dlq_topic=e.dlq_topic,
        group_id=e.group,
        worker_id="inproc",
        metrics_port=free_port(),
        commit_interval_s=0.05,
        session_timeout_ms=6000,
    )


async def test_injected_clients_are_used_and_commits_never_pass_unfinished_work(e: Env) -> None:
    made: list[str] = []
    commits: list[dict[TopicPartition, int]] = []
    committed: dict[TopicPartition, int] = {}
    overrun: list[str] = []
    watcher = Client(e.kafka, e.redis, topic=e.jobs_topic)

    def redis(s: WorkerSettings) -> Redis:
        made.append("redis")
        return Redis.from_url(s.redis_url, client_name="vlmq-inproc")

    def producer(s: WorkerSettings) -> AIOKafkaProducer:
        made.append("producer")
        return make_producer(s)

    def consumer(s: WorkerSettings) -> AIOKafkaConsumer:
        made.append("consumer")
        c = make_consumer(s)
        commit: Callable[..., Awaitable[None]] = c.commit

        async def recording(offsets: dict[TopicPartition, int]) -> None:
            # A commit says every message before it has ended: Redis must agree already.
            commits.append(dict(offsets))
            committed.update(offsets)
            finished = (await watcher.batch(e.tag)).finished
            if sum(committed.values()) > finished:
                overrun.append(f"committed {sum(committed.values())} with {finished} ended")
            await commit(offsets)

        c.commit = recording  # watching the real consumer's commits (aiokafka is untyped)
        return c

    worker = Worker(_settings(e), FakeEngine(step_ms=2), redis=redis, producer=producer, consumer=consumer)
    run = asyncio.create_task(worker.run())
    n = 120
    jobs = [Job(job_id=f"{e.tag}-{i}", messages=[Message("user", f"p{i}")], batch_id=e.tag) for i in range(n)]
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit_many(jobs)
        results = await client.wait_many([j.job_id for j in jobs], timeout=60)
        assert {r.state for r in results} == {JobState.SUCCEEDED}
        assert {r.worker for r in results} == {"inproc"}
        names = [c.get("name") for c in await client.redis.client_list()]
        assert "vlmq-inproc" in names  # the worker talks to Redis through the injected client
    readyz = f"http://127.0.0.1:{worker.settings.metrics_port}/readyz"
    assert await asyncio.to_thread(http_status, readyz) == 200
    worker._down.add("redis")  # what the Redis probe does when PING fails
    assert await asyncio.to_thread(http_status, readyz) == 503
    worker._down.discard("redis")
    worker.stop()
    assert await asyncio.wait_for(run, 60) == 0
    await watcher.close()
    assert not overrun, overrun
    assert sorted(made) == ["consumer", "producer", "redis"]
    # Committed offsets only grow, and in the end cover every message exactly.
    last: dict[TopicPartition, int] = {}
    for c in commits:
        for tp, off in c.items():
            assert off >= last.get(tp, 0), (tp, off, last)
            last[tp] = off
    assert sum(last.values()) == n
    assert sum((await committed_offsets(e)).values()) == n
