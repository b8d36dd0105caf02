"""The worker under faults, as real processes on real tansu, redis-server and moto_server:
kill -9, rebalance, drain, cancel, deadlines, backpressure."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.expect import expected_text
from tests.helpers import (
    Env,
    committed_offsets,
    log_text,
    put_images,
    read_topic,
    start_worker,
    stop_worker,
    wait_running,
)
from vlmq.core.state import StateStore
from vlmq.producer import Client, caption
from vlmq.schemas import keys
from vlmq.schemas.job import Job, JobState, Message, Sampling
from vlmq.worker.samples import photo

N_IMAGES = 12


def _jobs(e: Env, n: int, uris: list[str], **kw: Any) -> list[Job]:
    return [caption(uris[i % len(uris)], job_id=f"{e.tag}-{i}", batch_id=e.tag, **kw) for i in range(n)]


async def _progress(client: Client, batch: str, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (await client.batch(batch)).finished < at_least:
        assert time.monotonic() < deadline, "no progress"
        await asyncio.sleep(0.05)


async def _check_exactly_once(e: Env, jobs: list[Job], redis: Redis) -> None:
    """Every job succeeded, with the engine's answer, and ended exactly once."""
    store = StateStore(redis)
    expected = {i: expected_text(jobs[i], [photo(64, 48, seed=i % N_IMAGES)]) for i in range(N_IMAGES)}
    results = await store.get_many([j.job_id for j in jobs])
    for i, r in enumerate(results):
        assert r is not None and r.state is JobState.SUCCEEDED, (i, r)
        assert r.text == expected[i % N_IMAGES]
    pipe = redis.pipeline(transaction=False)
    for j in jobs:
        pipe.hget(keys.job_key(j.job_id), "terminal_writes")
    writes = [int(w) for w in await pipe.execute()]
    assert writes == [1] * len(jobs)
    counts = await store.batch_counts(e.tag)
    assert (counts.total, counts.succeeded, counts.running, counts.queued) == (len(jobs),) * 2 + (0, 0)


@pytest.mark.topologies
async def test_kill_9_mid_backlog_then_restart_loses_and_duplicates_nothing(e: Env, redis: Redis) -> None:
    uris = put_images(e, N_IMAGES, w=64, h=48)
    jobs = _jobs(e, 600, uris)
    w1 = start_worker(e, "w1", engine_args="step_ms=3,max_num_seqs=16", max_in_flight=48)
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit_many(jobs)
        await _progress(client, e.tag, 150)
        w1.send_signal(signal.SIGKILL)
        w1.wait(10)
        done_at_kill = (await client.batch(e.tag)).finished
        assert done_at_kill < 600, "the kill came too late to test anything"
        start_worker(e, "w2", engine_args="step_ms=3,max_num_seqs=16", max_in_flight=48)
        await client.wait_many([j.job_id for j in jobs], timeout=120)
    await _check_exactly_once(e, jobs, redis)


async def test_two_workers_one_leaves_rebalance_loses_and_duplicates_nothing(e: Env, redis: Redis) -> None:
    uris = put_images(e, N_IMAGES, w=64, h=48)
    jobs = _jobs(e, 600, uris)
    w1 = start_worker(e, "w1", engine_args="step_ms=3,max_num_seqs=16", max_in_flight=32)
    start_worker(e, "w2", engine_args="step_ms=3,max_num_seqs=16", max_in_flight=32)
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit_many(jobs)
        await _progress(client, e.tag, 150)
        assert stop_worker(w1) == 0  # leaves the group: w2 takes over its partitions
        await client.wait_many([j.job_id for j in jobs], timeout=120)
    await _check_exactly_once(e, jobs, redis)
    assert "partitions assigned" in log_text(e, "w2")


async def test_sigterm_drain_commits_exactly_after_the_finished_work(e: Env, redis: Redis) -> None:
    jobs = [_text_job(f"{e.tag}-{i}") for i in range(300)]
    w = start_worker(
        e,
        "w",
        engine_args="step_ms=20,max_num_seqs=8,completion_tokens=5",
        max_in_flight=16,
        drain_timeout_s=0.3,
    )
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit_many(jobs)
        store = client.store
        deadline = time.monotonic() + 60
        while (
            sum(r is not None and r.state.terminal for r in await store.get_many([j.job_id for j in jobs]))
            < 40
        ):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert stop_worker(w) == 0
        records = await read_topic(e, e.jobs_topic, len(jobs))
        committed = await committed_offsets(e)
        states = {r.job_id: r.state for r in await store.get_many([j.job_id for j in jobs]) if r}
    by_part: dict[int, list[tuple[int, str]]] = {}
    for m in records:
        by_part.setdefault(m.partition, []).append((m.offset, m.key.decode()))
    for part, rows in by_part.items():
        finished_prefix = 0
        for off, job_id in sorted(rows):
            if not states[job_id].terminal:
                break
            finished_prefix = off + 1
        # Committed never passes unfinished work, and covers every finished prefix.
        assert committed[part] == finished_prefix, (part, committed[part], finished_prefix)
    assert sum(committed.values()) < len(records)  # the drain really cut work short


@pytest.mark.topologies
async def test_cancel_queued_and_in_flight_and_deadline_expiry(e: Env) -> None:
    slow = _text_job(f"{e.tag}-slow")
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        queued = caption("s3://x/y", job_id=f"{e.tag}-queued")
        await client.submit(queued)
        assert await client.cancel(queued.job_id)  # before any worker runs
        expired = _text_job(f"{e.tag}-expired", deadline=time.time() + 0.2)
        await client.submit(expired)
        await asyncio.sleep(0.3)
        start_worker(e, "w", engine_args="step_ms=200,completion_tokens=1000", max_in_flight=4)
        await client.submit(slow)
        await wait_running(client, slow.job_id)
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        assert await client.cancel(slow.job_id)
        results = await client.wait_many([queued.job_id, expired.job_id, slow.job_id], timeout=30)
        assert [r.state for r in results] == [JobState.CANCELLED, JobState.EXPIRED, JobState.CANCELLED]
        # The worker aborted the engine request at once and took the next job.
        follow = _text_job(f"{e.tag}-next", sampling=Sampling(max_tokens=2))
        await client.submit(follow)
        assert (await client.wait(follow.job_id, timeout=30)).state is JobState.SUCCEEDED
        assert time.monotonic() - t0 < 15
    assert "aborting cancelled job" in log_text(e, "w")


async def test_slow_engine_with_short_poll_interval_pauses_instead_of_rebalancing(e: Env) -> None:
    jobs = [_text_job(f"{e.tag}-{i}") for i in range(120)]
    # Each job takes ~1.6 s of engine time and 8 are in flight: without pausing, 112 waiting
    # records would starve the poll far past max_poll_interval_ms.
    w = start_worker(
        e,
        "w",
        engine_args="step_ms=100,max_num_seqs=8,completion_tokens=16",
        max_in_flight=8,
        max_poll_interval_ms=3000,
    )
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit_many(jobs)
        results = await client.wait_many([j.job_id for j in jobs], timeout=120)
    assert {r.state for r in results} == {JobState.SUCCEEDED}
    assert stop_worker(w) == 0
    stopped = [
        json.loads(line) for line in log_text(e, "w").splitlines() if "worker drained and stopped" in line
    ]
    assert stopped[0]["assignments"] == 1  # never rebalanced
    assert stopped[0]["max_in_flight_seen"] == 8  # the bound held, and was used


def _text_job(job_id: str, **kw: Any) -> Job:
    return Job(job_id=job_id, messages=[Message("user", f"prompt of {job_id}")], **kw)
