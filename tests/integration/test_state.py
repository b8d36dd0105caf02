"""The Redis state machine (Lua) against a real redis-server."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis

from vlmq.core.state import StateStore
from vlmq.core.topology import AnyRedis
from vlmq.deploy.stack import free_port, redis_bin, redis_ok, wait_until
from vlmq.schemas import keys
from vlmq.schemas.job import JobState, Result

pytestmark = pytest.mark.topologies


def _ids(n: int = 1) -> list[str]:
    return [uuid.uuid4().hex for _ in range(n)]


async def test_enqueue_is_idempotent_and_counts_once(redis: AnyRedis) -> None:
    store = StateStore(redis, ttl_s=60)
    (job,), batch = _ids(), uuid.uuid4().hex
    first = await store.enqueue(job, batch, time.time())
    assert first.new and first.must_send
    again = await store.enqueue(job, batch, time.time())
    assert not again.new and again.must_send  # not acknowledged yet: may be sent again
    await store.mark_sent([job])
    assert not (await store.enqueue(job, batch, time.time())).must_send
    counts = await store.batch_counts(batch)
    assert (counts.total, counts.queued) == (1, 1)
    assert 0 < await redis.ttl(keys.submitted_key(job)) <= 60
    assert 0 < await redis.ttl(keys.batch_submitted_key(keys.shard(job), batch)) <= 60


async def test_claim_finish_first_terminal_write_wins(redis: AnyRedis) -> None:
    store = StateStore(redis, ttl_s=60)
    (job,), batch = _ids(), uuid.uuid4().hex
    await store.enqueue(job, batch, time.time())
    claim = await store.claim(job, batch, "w1", lease_s=0.05)
    assert claim.granted and claim.attempt == 1
    await asyncio.sleep(0.1)
    again = await store.claim(job, batch, "w2")  # a redelivery after w1 died (its lease ran out)
    assert again.granted and again.attempt == 2
    assert await store.finish(Result(job, JobState.SUCCEEDED, text="a", batch_id=batch))
    assert not await store.finish(Result(job, JobState.FAILED, text="b", batch_id=batch))
    assert not (await store.claim(job, batch, "w3")).granted
    got = await store.get(job)
    assert got is not None and (got.state, got.text) == (JobState.SUCCEEDED, "a")
    assert await store.terminal_writes(job) == 1
    counts = await store.batch_counts(batch)
    assert (counts.total, counts.queued, counts.running, counts.succeeded) == (1, 0, 0, 1)
    assert [r.job_id async for r in store.iter_batch(batch)] == [job]
    assert 0 < await redis.ttl(keys.batch_done_key(keys.shard(job), batch)) <= 60
    assert 0 < await redis.ttl(keys.batch_key(keys.shard(job), batch)) <= 60


async def test_a_ticks_claims_are_one_script_call_per_slot(redis: AnyRedis, topology: str) -> None:
    """300 concurrent claims of a coalescing store (the worker's) run as one `claim` call
    on one Redis, one per slot on a cluster, and each caller gets its own job's answer."""
    store = StateStore(redis, ttl_s=60, coalesce=True)
    jobs, batch = _ids(300), uuid.uuid4().hex
    await store.enqueue_many([(j, batch, time.time(), {}, "") for j in jobs])
    done = Result(job_id=jobs[0], state=JobState.SUCCEEDED, batch_id=batch)
    assert (await store.claim(jobs[0], batch, "w")).granted and await store.finish(done)
    sent: list[int] = []
    run = store.scripts._run

    async def counting(calls, durable):  # type: ignore[no-untyped-def]
        sent.append(sum(c.script == "claim" for c in calls))
        return await run(calls, durable)

    store.scripts._run = counting  # type: ignore[method-assign]
    claims = await asyncio.gather(*(store.claim(j, batch, "w") for j in jobs))
    assert claims[0].state is JobState.SUCCEEDED and not claims[0].granted  # ended: skipped
    assert all(c.granted and c.attempt == 1 for c in claims[1:])
    slots = len({keys.shard(j) for j in jobs}) if topology == "cluster" else 1
    assert sum(sent) == slots, sent
    assert (await store.batch_counts(batch)).running == 299


async def test_a_job_never_enqueued_is_counted_when_claimed(redis: AnyRedis) -> None:
    store = StateStore(redis, ttl_s=60)
    (job,), batch = _ids(), uuid.uuid4().hex
    assert (await store.claim(job, batch, "w")).granted  # e.g. produced by a non-SDK client
    await store.finish(Result(job, JobState.FAILED, batch_id=batch))
    counts = await store.batch_counts(batch)
    assert (counts.total, counts.running, counts.failed) == (1, 0, 1)


async def test_cancel_is_a_request_that_only_a_worker_turns_into_a_state(redis: AnyRedis) -> None:
    store = StateStore(redis, ttl_s=60)
    batch = uuid.uuid4().hex
    queued, running, ended, other = _ids(4)
    for j in (queued, running, ended, other):
        await store.enqueue(j, batch, time.time())
    await store.claim(running, batch, "w")
    await store.finish(Result(ended, JobState.SUCCEEDED, batch_id=batch))
    assert (await store.cancel(queued)).requested and (await store.cancel(running)).requested
    assert (await store.cancel(ended)).ended is JobState.SUCCEEDED
    assert not (await store.cancel("never-seen")).found
    states = [r.state if r else None for r in await store.get_many([queued, running])]
    assert states == [JobState.QUEUED, JobState.RUNNING]  # requested, not yet carried out
    # A worker hearing the request ends the queued one; the running one is its owner's.
    assert await store.end_recorded(queued, JobState.CANCELLED, requested=True)
    assert not await store.end_recorded(running, JobState.CANCELLED, requested=True)
    assert not await store.end_recorded(other, JobState.CANCELLED, requested=True)  # none asked
    redelivered = await store.claim(running, batch, "w2", lease_s=30)  # e.g. after w died
    assert redelivered.cancel_requested and redelivered.granted
    assert await store.finish(Result(running, JobState.CANCELLED, batch_id=batch))
    counts = await store.batch_counts(batch)
    assert (counts.total, counts.queued, counts.running, counts.cancelled) == (4, 1, 0, 2)
    no_batch = StateStore._job_keys(queued, None)[2:]
    assert not any([await redis.exists(k) for k in no_batch])  # placeholders never written


async def test_a_job_ended_while_queued_keeps_its_metadata(redis: AnyRedis) -> None:
    store = StateStore(redis, ttl_s=60)
    batch = uuid.uuid4().hex
    tagged, bare = _ids(2)
    await store.enqueue(tagged, batch, time.time(), {"custom_id": "r8", "note": "\u00e9:x"})
    await store.enqueue(bare, batch, time.time())
    queued = await store.get(tagged)
    assert queued is not None and queued.metadata == {"custom_id": "r8", "note": "\u00e9:x"}
    await store.cancel(tagged)
    await store.cancel(bare)
    await redis.hset(keys.submitted_key(bare), "metadata", b"\xff not json")  # a stray value
    assert await store.end_recorded(tagged, JobState.CANCELLED, requested=True)
    assert await store.end_recorded(bare, JobState.CANCELLED, requested=True)
    ended, plain = await store.get_many([tagged, bare])
    assert ended is not None and ended.state is JobState.CANCELLED and ended.metadata["custom_id"] == "r8"
    assert plain is not None and plain.state is JobState.CANCELLED and plain.metadata == {}


async def test_wait_wakes_on_completion_without_polling(redis: AnyRedis) -> None:
    store = StateStore(redis, ttl_s=60, recheck_s=30)  # a wake-up can only come from pub/sub
    (job,) = _ids()
    await store.enqueue(job, None, time.time())
    waiter = asyncio.create_task(store.wait(job, timeout=20))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    t0 = time.monotonic()
    await store.finish(Result(job, JobState.SUCCEEDED, text="x"))
    result = await waiter
    assert result is not None and result.text == "x"
    assert time.monotonic() - t0 < 2


async def test_wait_times_out_and_as_completed_yields_in_end_order(redis: AnyRedis) -> None:
    store = StateStore(redis, ttl_s=60, recheck_s=0.2)
    a, b, c = _ids(3)
    for j in (a, b, c):
        await store.enqueue(j, None, time.time())
    assert await store.wait(a, timeout=0.3) is None
    await store.finish(Result(c, JobState.SUCCEEDED))
    order: list[str] = []

    async def finish_later() -> None:
        await asyncio.sleep(0.3)
        await store.finish(Result(a, JobState.FAILED))
        await asyncio.sleep(0.3)
        await store.finish(Result(b, JobState.SUCCEEDED))

    task = asyncio.create_task(finish_later())
    async for r in store.as_completed([a, b, c], timeout=10):
        order.append(r.job_id)
    await task
    assert order == [c, a, b]


def _redis_server(port: int, data: Path) -> subprocess.Popen[bytes]:
    cmd = [redis_bin(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", ""]
    proc = subprocess.Popen([*cmd, "--appendonly", "yes"], stdout=subprocess.DEVNULL)
    wait_until(lambda: redis_ok(f"redis://127.0.0.1:{port}/0"), "redis-server")
    return proc


async def test_a_waiter_rides_out_a_redis_restart_and_leaves_no_subscription(tmp_path: Path) -> None:
    port = free_port()
    server = _redis_server(port, tmp_path)
    redis = Redis.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        store = StateStore(redis, recheck_s=0.5, outage_s=30)
        (j,) = _ids()
        await store.enqueue(j, None, time.time())
        waiter = asyncio.create_task(store.wait(j, timeout=60))
        await asyncio.sleep(0.3)  # subscribed
        server.kill()
        server.wait()
        await asyncio.sleep(1.0)  # the waiter sees the connection drop and retries
        server = _redis_server(port, tmp_path)  # the AOF brings the queued record back
        await store.claim(j, None, "w")
        await store.finish(Result(job_id=j, state=JobState.SUCCEEDED, text="after the restart"))
        result = await asyncio.wait_for(waiter, 30)
        assert result is not None and result.text == "after the restart"
        clients = await redis.client_list()  # a single Redis: the restart is of one server
        assert all(int(c.get("sub", 0)) == 0 for c in clients), clients  # wait() unsubscribed
    finally:
        await redis.aclose()
        server.kill()
        server.wait()


async def test_a_lease_keeps_a_running_job_from_a_second_worker(redis: AnyRedis) -> None:
    store = StateStore(redis)
    (j,) = _ids()
    first = await store.claim(j, None, "w1", lease_s=30)
    assert first.granted and first.attempt == 1
    held = await store.claim(j, None, "w2", lease_s=30)
    assert not held.granted and held.leased_until is not None and held.leased_until > time.time() + 25
    assert await store.lease([j], "w2", 30) == 0  # not w2's to renew
    assert await store.lease([j], "w1", 0) == 1  # w1 hands it back
    second = await store.claim(j, None, "w2", lease_s=30)
    assert second.granted and second.attempt == 2
    assert not (await store.claim(j, None, "w1", lease_s=30)).granted  # now w2's
    await store.finish(Result(job_id=j, state=JobState.SUCCEEDED))
    assert await store.lease([j], "w2", 30) == 0  # ended: nothing to renew
    ended = await store.claim(j, None, "w3", lease_s=30)
    assert ended.state is JobState.SUCCEEDED and not ended.granted


async def test_a_lapsed_lease_is_taken_over(redis: AnyRedis) -> None:
    store = StateStore(redis)
    (j,) = _ids()
    assert (await store.claim(j, None, "dead", lease_s=0.2)).granted
    await asyncio.sleep(0.3)
    taken = await store.claim(j, None, "alive", lease_s=30)
    assert taken.granted and taken.attempt == 2
