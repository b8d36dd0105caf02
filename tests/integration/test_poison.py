"""Poison-proofing, each through a real worker process against real servers: a job that
kills its worker ends `poison`; a message cannot move a job to another batch; an invalid job
in a batch is counted there; a Redis error caused by one job's keys fails that job, not the
worker; junk on the cancel channel does not stop cancellation."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from tests.helpers import Env, read_topic, start_worker, stop_worker, wait_for, wait_running
from vlmq.core.state import StateStore
from vlmq.producer import Client
from vlmq.schemas import ErrorCode, Job, JobState, Message, Sampling
from vlmq.schemas import keys as rkeys
from vlmq.schemas.codec import decode_dead_letter, encode_job, message_digest


def _job(job_id: str, prompt: str = "hi", **kw: Any) -> Job:
    return Job(job_id=job_id, messages=[Message("user", prompt)], **kw)


async def _produce(e: Env, *messages: tuple[str, bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=e.kafka, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        for key, value in messages:
            await producer.send_and_wait(e.jobs_topic, value, key=key.encode())
    finally:
        await producer.stop()


async def test_a_job_that_kills_its_worker_ends_poison_after_max_attempts(e: Env) -> None:
    crash = _job(f"{e.tag}-crash", "please CRASH now")
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit(crash)
        for attempt in (1, 2):  # each delivery kills the worker mid-job; a new one takes over
            w = start_worker(e, f"w{attempt}", engine_args="crash_on=CRASH", max_attempts=2)
            wait_for(lambda w=w: w.poll() is not None, f"worker {attempt} to die on the job", timeout=60)
            assert w.returncode == -9
        w = start_worker(e, "w3", engine_args="crash_on=CRASH", max_attempts=2)
        (got,) = await client.wait_many([crash.job_id], timeout=90)
        assert got.state is JobState.FAILED and got.error is not None
        assert got.error.code is ErrorCode.POISON and got.attempt == 3, got
        after = _job(f"{e.tag}-after")
        await client.submit(after)
        assert (await client.wait(after.job_id, timeout=30)).state is JobState.SUCCEEDED
    dead = [decode_dead_letter(m.value) for m in await read_topic(e, e.dlq_topic, 1)]
    assert [(d.job_id, d.error.code) for d in dead] == [(crash.job_id, ErrorCode.POISON)]
    assert stop_worker(w) == 0


async def test_a_message_cannot_move_a_job_to_another_batch(e: Env, redis: Redis) -> None:
    store = StateStore(redis)
    job = _job(f"{e.tag}-j", batch_id=f"{e.tag}-b1")
    genuine = encode_job(job)[0]
    await store.enqueue(job.job_id, job.batch_id, time.time(), digest=message_digest(genuine, None))
    forged = _job(job.job_id, batch_id=f"{e.tag}-b2")  # same job, someone else's batch
    w = start_worker(e)
    await _produce(e, (job.job_id, encode_job(forged)[0]))
    dead = [decode_dead_letter(m.value) for m in await read_topic(e, e.dlq_topic, 1)]
    assert [(d.job_id, d.error.code) for d in dead] == [(None, ErrorCode.FORGED)]  # never on the job's page
    record = await store.get(job.job_id)
    assert record is not None and record.state is JobState.QUEUED
    assert not await redis.exists(rkeys.batch_key(rkeys.shard(job.job_id), f"{e.tag}-b2"))
    await _produce(e, (job.job_id, genuine))  # the genuine message still runs
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        assert (await client.wait(job.job_id, timeout=30)).state is JobState.SUCCEEDED
        counts = await client.batch(f"{e.tag}-b1")
    assert (counts.total, counts.succeeded, counts.queued, counts.running) == (1, 1, 0, 0)
    assert stop_worker(w) == 0


async def test_an_invalid_job_in_a_batch_ends_there(e: Env, redis: Redis) -> None:
    store = StateStore(redis)
    batch = f"{e.tag}-b"
    job_id = f"{e.tag}-bad"
    invalid: dict[str, Any] = {
        "job_id": job_id,
        "batch_id": batch,
        "messages": [{"role": "user", "content": "x"}],
    }
    invalid["sampling"] = {"max_tokens": 0}  # what a non-SDK producer might send
    value = json.dumps(invalid).encode()
    await store.enqueue(job_id, batch, time.time(), digest=message_digest(value, None))  # its enqueue step
    w = start_worker(e)
    await _produce(e, (job_id, value))
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        (r,) = await client.wait_many([job_id], timeout=30)
        counts = await client.batch(batch)
    assert r.state is JobState.FAILED and r.error is not None and r.error.code is ErrorCode.INVALID_JOB
    assert r.batch_id == batch
    assert (counts.total, counts.failed, counts.queued) == (1, 1, 0)  # `bulk watch` ends
    assert stop_worker(w) == 0


async def test_a_redis_error_from_one_jobs_keys_fails_that_job_not_the_worker(e: Env, redis: Redis) -> None:
    # Ids cannot make keys collide any more (tests/unit/test_keys.py), but a key of the
    # wrong type (an operator's mistake, another program) makes Redis refuse the claim
    # script (WRONGTYPE): for that job only.
    first = _job(f"{e.tag}-first", batch_id=f"{e.tag}-X")
    clash = _job(f"{e.tag}-clash", batch_id=f"{e.tag}-X:done")
    after = _job(f"{e.tag}-after")
    await redis.set(rkeys.job_key(clash.job_id), "not a hash", ex=600)
    w = start_worker(e)
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit(first)
        assert (await client.wait(first.job_id, timeout=30)).state is JobState.SUCCEEDED
        await _produce(e, (clash.job_id, encode_job(clash)[0]))  # past the SDK's enqueue
        dead = [decode_dead_letter(m.value) for m in await read_topic(e, e.dlq_topic, 1)]
        assert [(d.job_id, d.error.code) for d in dead] == [(clash.job_id, ErrorCode.INTERNAL)]
        assert "WRONGTYPE" in dead[0].error.message
        await client.submit(after)
        assert (await client.wait(after.job_id, timeout=30)).state is JobState.SUCCEEDED
    assert w.poll() is None and stop_worker(w) == 0


async def test_junk_on_the_cancel_channel_does_not_stop_cancellation(e: Env, redis: Redis) -> None:
    w = start_worker(e, engine_args="step_ms=50,completion_tokens=100000")
    long = _job(f"{e.tag}-long", sampling=Sampling(max_tokens=30000))
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit(long)
        await wait_running(client, long.job_id)
        await redis.publish(rkeys.CANCEL_CHANNEL, b"\xff\xfe not utf-8")
        await redis.publish(rkeys.CANCEL_CHANNEL, b"")
        assert await client.cancel(long.job_id)
        r = await client.store.wait(long.job_id, timeout=10)
    assert r is not None and r.state is JobState.CANCELLED
    assert w.poll() is None and stop_worker(w) == 0


async def test_kill_9_of_a_worker_with_50_running_jobs_ends_each_once(e: Env, redis: Redis) -> None:
    slow = "step_ms=100,completion_tokens=60,max_num_seqs=64"  # about 6 s a job
    settings: dict[str, Any] = {"engine_args": slow, "lease_s": 6, "max_in_flight": 64}
    jobs = [_job(f"{e.tag}-{i}", f"job {i}", sampling=Sampling(max_tokens=60)) for i in range(50)]
    doomed = start_worker(e, "doomed", **settings)
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit_many(jobs)
        for j in jobs:
            await wait_running(client, j.job_id)
        doomed.kill()  # kill -9: 50 jobs running, their leases held for up to 6 s
        doomed.wait()
        heir = start_worker(e, "heir", **settings)
        t0 = time.monotonic()
        results = await client.wait_many([j.job_id for j in jobs], timeout=120)
        took = time.monotonic() - t0
    store = StateStore(redis)
    writes = [await redis.hget(rkeys.job_key(j.job_id), "terminal_writes") for j in jobs]
    assert all(r.state is JobState.SUCCEEDED for r in results)
    assert writes == [b"1"] * 50  # each ended exactly once
    assert {r.worker for r in results} == {"heir"} and {r.attempt for r in results} == {2}
    assert took < 6 + 6 + 30, took  # session timeout + lease + the work itself
    records = await store.get_many([j.job_id for j in jobs])
    assert all(r is not None and r.state is JobState.SUCCEEDED for r in records)  # nothing left running
    assert stop_worker(heir) == 0


async def test_a_second_delivery_of_a_running_job_never_runs_it_twice(e: Env) -> None:
    w1 = start_worker(e, "w1", engine_args="step_ms=50,completion_tokens=60")
    job = _job(f"{e.tag}-dup", sampling=Sampling(max_tokens=60))
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit(job)
        await wait_running(client, job.job_id)
        w2 = start_worker(e, "w2", engine_args="step_ms=50,completion_tokens=60")  # shares the group
        await _produce(e, (job.job_id, encode_job(job)[0]), (job.job_id, encode_job(job)[0]))
        result = await client.wait(job.job_id, timeout=60)
        await asyncio.sleep(3)  # the duplicates are seen (and skipped) after the end
        again = await client.status(job.job_id)
    assert result.state is JobState.SUCCEEDED and again.attempt == 1  # one claim, one run
    assert stop_worker(w1) == 0 and stop_worker(w2) == 0
