"""What the dashboard's buttons and pages stand on, against real servers and workers:
retrying a batch's failed jobs runs each exactly once more (counted by terminal writes,
however often it is asked and however often the messages are resent), cancelling a whole
batch, worker heartbeats, and reading dead letters and consumer lag back from Kafka."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import msgspec
import pytest

from tests.helpers import Env, put_images, start_worker, stop_worker
from vlmq.api.dashboard.data import Board
from vlmq.api.records import Records
from vlmq.core import workers
from vlmq.core.settings import Connection
from vlmq.producer import Client
from vlmq.producer.builders import caption
from vlmq.producer.client import validated
from vlmq.schemas import JobState
from vlmq.schemas.codec import MSGPACK
from vlmq.schemas.job import Job


def client_of(e: Env) -> Client:
    return Client(
        settings=Connection.load(
            {
                "kafka_bootstrap": e.kafka,
                "redis_url": e.redis,
                "redis_topology": e.topology,
                "jobs_topic": e.jobs_topic,
                "dlq_topic": e.dlq_topic,
            }
        )
    )


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


def flaky_jobs(e: Env, n: int, every: int) -> list[Job]:
    uris = put_images(e, n)
    return [
        caption(uri, job_id=f"{e.tag}-{i}", batch_id=e.tag, prompt="flaky one" if i % every == 0 else "fine")
        for i, uri in enumerate(uris)
    ]


@pytest.mark.parametrize("topology", ["single", "cluster"], indirect=True)
async def test_retry_runs_each_failed_job_exactly_once_more(e: Env) -> None:
    client = client_of(e)
    board = Board(client, Records(client.redis), e.dlq_topic)
    try:
        flaky = start_worker(e, "flaky", engine_args="fail_on=flaky")
        submitted_at = time.time()  # set here, so the test knows each message's bytes
        submitted = [
            msgspec.structs.replace(j, submitted_at=submitted_at) for j in flaky_jobs(e, 24, every=4)
        ]
        await client.submit_many(submitted)
        await until(lambda: _ended(client, e.tag, 24), "the first pass")
        counts = await client.store.batch_counts(e.tag)
        assert (counts.succeeded, counts.failed) == (18, 6)
        failed = await board.failures(e.tag)
        assert failed.by_code["engine_error"].count == 6
        view = await board.job(failed.by_code["engine_error"].examples[0].job_id)
        assert view is not None and view.dead is not None and view.job is not None  # read back from Kafka
        assert view.dead.error.code.value == "engine_error"

        stop_worker(flaky)  # the bug is fixed: a worker without it
        start_worker(e, "fixed")
        first, second = await asyncio.gather(board.retry(e.tag), board.retry(e.tag))  # a double click
        assert first.resent + second.resent >= 6 and first.unreadable == second.unreadable == 0
        # and a resend after a crash: the messages as submitted (their digests are recorded)
        await client.resend(
            [(j.job_id, validated(j)[0], MSGPACK) for i, j in enumerate(submitted) if i % 4 == 0]
        )
        await until(lambda: _succeeded(client, e.tag, 24), "the retried jobs")

        writes = [await client.store.terminal_writes(f"{e.tag}-{i}") for i in range(24)]
        assert Counter(writes) == {1: 18, 2: 6}  # one more terminal write each, no more
        again = await board.retry(e.tag)  # nothing failed now: nothing is sent
        assert again.resent == 0
        r = await client.store.get(f"{e.tag}-0")
        assert r is not None and r.state is JobState.SUCCEEDED and r.attempt == 2
        ended = [x.job_id async for x in client.store.iter_batch(e.tag)]
        assert sorted(ended) == sorted(f"{e.tag}-{i}" for i in range(24))  # once each in the done lists
    finally:
        await board.close()
        await client.close()


async def test_cancelling_a_whole_batch_and_heartbeats_and_lag(e: Env) -> None:
    client = client_of(e)
    board = Board(client, Records(client.redis), e.dlq_topic)
    try:
        start_worker(e, "slow", engine_args="step_ms=50,max_num_seqs=2", max_in_flight=4, heartbeat_s=0.5)
        await client.submit_many(flaky_jobs(e, 60, every=1000))

        async def beating() -> bool:
            return any(b.worker == "slow" and b.in_flight > 0 for b in await workers.alive(client.redis))

        await until(beating, "a heartbeat with work in flight")
        beat = next(b for b in await workers.alive(client.redis) if b.worker == "slow")
        assert beat.engine == "fake" and beat.partitions and beat.gpu_busy is None
        await board.cancel(e.tag)
        await until(lambda: _ended(client, e.tag, 60), "the cancelled batch")
        counts = await client.store.batch_counts(e.tag)
        assert counts.cancelled > 40 and counts.succeeded + counts.cancelled == 60
        assert await client.store.batch_cancelled(e.tag)
        lag = await board.lag(e.group, e.jobs_topic)
        assert sum(p.end for p in lag) == 60 and len(lag) == e.partitions
    finally:
        await board.close()
        await client.close()


async def _ended(client: Client, batch: str, n: int) -> bool:
    return (await client.store.batch_counts(batch)).finished >= n


async def _succeeded(client: Client, batch: str, n: int) -> bool:
    return (await client.store.batch_counts(batch)).succeeded >= n
