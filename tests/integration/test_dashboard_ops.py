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
from vlmq.api.dashboard.console import JobQuery, job_page
from vlmq.api.dashboard.data import Board
from vlmq.api.records import Records
from vlmq.core import joblist, workers
from vlmq.core.settings import Connection
from vlmq.core.state import StateStore
from vlmq.producer import Client
from vlmq.producer.builders import batch_job_id, caption
from vlmq.producer.client import validated
from vlmq.schemas import JobState, keys
from vlmq.schemas.codec import MSGPACK
from vlmq.schemas.errors import ErrorCode
from vlmq.schemas.job import Error, Job, Result, Timings


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
        assert [(g.code, g.count) for g in board.failures(counts)] == [("engine_error", 6)]
        failed = await job_page(client.store, f"b:{e.tag}", JobQuery(code="engine_error"), 25)
        assert sorted(r.job_id for r in failed.rows) == sorted(f"{e.tag}-{i}" for i in range(0, 24, 4))
        view = await board.job(failed.rows[0].job_id)
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
        # the retried jobs moved in the indexes and the per-code counters: no failure is left
        assert (await client.store.batch_counts(e.tag)).by_code == {}
        for state, n in (("failed", 0), ("succeeded", 24), ("", 24), ("queued", 0)):
            got = await job_page(client.store, f"b:{e.tag}", JobQuery(state=state), 100)
            assert len(got.rows) == n, state
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


@pytest.mark.parametrize("topology", ["single", "cluster"], indirect=True)
async def test_job_lists_page_filter_and_search_in_order_page(e: Env) -> None:
    """The indexes as the scripts keep them (enqueue, finish; no Kafka needed): pages cover
    the list exactly once, newest first, also while it grows; filters and search."""
    store = client_of(e).store
    try:
        n, batch = 1200, e.tag
        ids = [f"{batch}-{i:05d}" for i in range(n)]
        at = 1_700_000_000.0
        # Ties on purpose: a bulk chunk shares one submit time (every 100 jobs here).
        await store.enqueue_many(
            [(j, batch, at + i // 100, {"custom_id": f"c{i}"}, "d") for i, j in enumerate(ids)]
        )
        for i, j in enumerate(ids[:300]):
            state = JobState.FAILED if i % 3 == 0 else JobState.SUCCEEDED
            err = Error(ErrorCode.ENGINE_ERROR if i % 2 else ErrorCode.TIMEOUT, "x") if i % 3 == 0 else None
            await store.finish(
                Result(job_id=j, state=state, batch_id=batch, error=err, timings=Timings(submitted_at=at))
            )
        # A producer may write an index (a `sub:` key): another list's job slipped in is not shown.
        stranger = f"{batch}-stranger"
        await store.enqueue_many([(stranger, f"{batch}-elsewhere", at + 500, {}, "d")])
        slot = keys.index_key(joblist.index_shard(store.redis, stranger), f"b:{batch}", "all")
        await store.redis.zadd(slot, {stranger: at + 500})
        seen: list[str] = []
        q = JobQuery()
        while True:
            got = await job_page(store, f"b:{batch}", q, 25)
            seen += [r.job_id for r in got.rows]
            if 50 <= len(seen) < 75:  # the list grows between pages: the cursor still holds
                await store.enqueue_many([(f"{batch}-late", batch, at + 99, {}, "d")])
            if got.next is None:
                break
            q = JobQuery(cursor=got.next)
        assert sorted(seen) == sorted(ids) and len(seen) == n  # each once; the late one was before the cursor
        assert stranger not in seen
        subs = [(r, at + int(r.rsplit("-", 1)[1]) // 100) for r in seen]
        assert [a for _, a in subs] == sorted((a for _, a in subs), reverse=True)  # newest first
        failed = await _all(store, f"b:{batch}", JobQuery(state="failed"))
        assert sorted(failed) == sorted(ids[i] for i in range(0, 300, 3))
        timeouts = await _all(store, f"b:{batch}", JobQuery(code="timeout"))
        assert sorted(timeouts) == sorted(ids[i] for i in range(0, 300, 6))
        assert len(await _all(store, f"b:{batch}", JobQuery(state="queued"))) == n - 300 + 1  # + the late one
        assert (await store.batch_counts(batch)).by_code == {"engine_error": 50, "timeout": 50}
        window = JobQuery(since="2023-11-14T22:13:21", until="2023-11-14T22:13:22")  # at+1 .. at+2
        assert len(await _all(store, f"b:{batch}", window)) == 200
        derived = batch_job_id(batch, "cust-1")  # an OpenAI line's or a bulk key's id
        await store.enqueue_many([(derived, batch, at, {"custom_id": "cust-1"}, "d")])
        found = await job_page(store, f"b:{batch}", JobQuery(q="cust-1"), 25)
        assert [r.job_id for r in found.rows] == [derived]
        found = await job_page(store, f"b:{batch}", JobQuery(q=ids[7]), 25)
        assert [r.job_id for r in found.rows] == [ids[7]]
        assert (await job_page(store, "b:another", JobQuery(q=ids[7]), 25)).rows == []  # not that list's
    finally:
        await store.redis.aclose()


async def _all(store: StateStore, group: str, q: JobQuery) -> list[str]:
    out: list[str] = []
    while True:
        got = await job_page(store, group, q, 40)
        out += [r.job_id for r in got.rows]
        if got.next is None:
            return out
        q = msgspec.structs.replace(q, cursor=got.next)


async def test_an_operator_pauses_resumes_and_drains_a_worker(e: Env) -> None:
    client = client_of(e)
    try:
        w = start_worker(e, "ctl", engine_args="step_ms=1", heartbeat_s=0.5)

        async def control(state: str) -> bool:
            return any(b.worker == "ctl" and b.control == state for b in await workers.alive(client.redis))

        await until(lambda: control(""), "the worker's first beat")
        await workers.command(client.redis, "ctl", "pause")
        await until(lambda: control("paused"), "the pause")
        await client.submit_many(flaky_jobs(e, 5, every=1000))
        await asyncio.sleep(2)  # paused: nothing is taken
        assert (await client.store.batch_counts(e.tag)).finished == 0
        await workers.command(client.redis, "ctl", "resume")
        await until(lambda: _ended(client, e.tag, 5), "the jobs, once resumed")
        await workers.command(client.redis, "ctl", "drain")
        assert await asyncio.to_thread(w.wait, 60) == 0  # drained and stopped by itself
        assert await workers.commanded(client.redis, "ctl") == ""  # a restart runs again
    finally:
        await client.close()


async def _ended(client: Client, batch: str, n: int) -> bool:
    return (await client.store.batch_counts(batch)).finished >= n


async def _succeeded(client: Client, batch: str, n: int) -> bool:
    return (await client.store.batch_counts(batch)).succeeded >= n
