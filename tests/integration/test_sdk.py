"""The producer SDK against real tansu + redis-server + a worker process (fake engine)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.helpers import Env, put_images, read_topic, start_worker
from vlmq.producer import (
    Client,
    JobCancelled,
    JobExpired,
    JobFailed,
    JobNotFound,
    SyncClient,
    Timeout,
    ValidationError,
    caption,
    moderate,
)
from vlmq.schemas import ImageRef, Job, JobState, Message, Sampling


def _text(job_id: str, prompt: str = "hello", **kw: Any) -> Job:
    return Job(job_id=job_id, messages=[Message("user", prompt)], **kw)


@pytest.mark.topologies
async def test_submit_wait_status_result_and_typed_errors(e: Env) -> None:
    (uri,) = put_images(e, 1, w=64, h=48)
    start_worker(e, "w", engine_args="step_ms=5,fail_on=BOOM", max_images_per_job=2)
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        ok = await client.submit(caption(uri, job_id=f"{e.tag}-ok"))
        assert ok.sent and ok.state is JobState.QUEUED
        result = await client.wait(ok.job_id, timeout=30)
        assert result.state is JobState.SUCCEEDED and result.text and result.text.startswith("fake:")
        assert (await client.result(ok.job_id)).text == result.text
        assert (await client.status(ok.job_id)).state is JobState.SUCCEEDED

        mod = await client.submit(moderate(uri, ["safe", "nsfw", "violence"], job_id=f"{e.tag}-m"))
        assert (await client.wait(mod.job_id, timeout=30)).text in ("safe", "nsfw", "violence")
        why = moderate(uri, ["safe", "nsfw"], job_id=f"{e.tag}-why", with_reason=True)
        parsed = (await client.wait((await client.submit(why)).job_id, timeout=30)).parsed
        assert parsed["label"] in ("safe", "nsfw") and isinstance(parsed["reason"], str)

        await client.submit(_text(f"{e.tag}-boom", "BOOM"))
        with pytest.raises(JobFailed) as failed:
            await client.wait(f"{e.tag}-boom", timeout=30)
        assert failed.value.result.error is not None
        assert failed.value.result.error.code.value == "engine_error"
        assert failed.value.result.error.retryable
        with pytest.raises(JobFailed):
            await client.result(f"{e.tag}-boom")

        many = Job(job_id=f"{e.tag}-many", messages=[Message("user", [ImageRef(uri)] * 3)])
        await client.submit(many)
        with pytest.raises(JobFailed, match="too_many_images"):
            await client.wait(many.job_id, timeout=30)

        with pytest.raises(JobNotFound):
            await client.status("never-submitted")
        with pytest.raises(JobNotFound):
            await client.wait("never-submitted", timeout=1)
        with pytest.raises(ValidationError, match=r"\$.sampling.max_tokens"):
            await client.submit(_text(f"{e.tag}-bad", sampling=Sampling(max_tokens=-5)))


@pytest.mark.topologies
async def test_timeout_cancel_and_expired_surface_as_exceptions(e: Env) -> None:
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        # No worker yet: nothing can end.
        await client.submit(_text(f"{e.tag}-slow"))
        with pytest.raises(Timeout):
            await client.wait(f"{e.tag}-slow", timeout=0.5)
        with pytest.raises(Timeout):
            await client.result(f"{e.tag}-slow")
        assert await client.cancel(f"{e.tag}-slow")  # a request: no worker carried it out yet
        assert (await client.status(f"{e.tag}-slow")).state is JobState.QUEUED
        await client.submit(_text(f"{e.tag}-late", deadline=1.0))
        start_worker(e, "w")
        with pytest.raises(JobCancelled):
            await client.wait(f"{e.tag}-slow", timeout=30)
        assert not await client.cancel(f"{e.tag}-slow")  # it has ended
        with pytest.raises(JobExpired):
            await client.wait(f"{e.tag}-late", timeout=30)


async def test_resubmitting_the_same_job_id_never_runs_it_twice(e: Env) -> None:
    start_worker(e, "w", engine_args="step_ms=5")
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        job = _text(f"{e.tag}-once")
        first = await client.submit(job)
        again = await client.submit(job)  # acknowledged already: not sent again
        assert first.sent and not again.sent
        await client.wait(job.job_id, timeout=30)
        after = await client.submit(job)
        assert not after.sent and after.state is JobState.SUCCEEDED
        report = await client.submit_many([job, _text(f"{e.tag}-new")])
        assert (report.sent, report.skipped) == (1, 1)
        await client.wait(f"{e.tag}-new", timeout=30)
        record = await client.status(job.job_id)
    assert record.attempt == 1
    msgs = await read_topic(e, e.jobs_topic, 2)
    assert sorted(m.key.decode() for m in msgs) == [f"{e.tag}-new", f"{e.tag}-once"]


@pytest.mark.topologies
async def test_as_completed_yields_in_the_order_jobs_end(e: Env) -> None:
    start_worker(e, "w", engine_args="step_ms=50,max_num_seqs=8,completion_tokens=100")
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        lengths = {f"{e.tag}-{n}": n for n in (40, 5, 20, 1)}  # tokens = engine time
        jobs = [_text(j, sampling=Sampling(max_tokens=n)) for j, n in lengths.items()]
        await client.submit_many(jobs)
        order = [r.job_id async for r in client.as_completed(list(lengths), timeout=60)]
    assert order == sorted(lengths, key=lengths.__getitem__)


def test_sync_client(e: Env) -> None:
    start_worker(e, "w")
    with SyncClient(e.kafka, e.redis, topic=e.jobs_topic, redis_options={"socket_timeout": 30}) as client:
        redis = client._client.redis
        assert isinstance(redis, Redis) and redis.connection_pool.connection_kwargs["socket_timeout"] == 30
        h = client.submit(_text(f"{e.tag}-sync"))
        assert client.wait(h.job_id, timeout=30).state is JobState.SUCCEEDED
        client.submit_many([_text(f"{e.tag}-s{i}", batch_id=e.tag) for i in range(5)])
        got = [r.job_id for r in client.as_completed([f"{e.tag}-s{i}" for i in range(5)], timeout=30)]
        assert sorted(got) == sorted(f"{e.tag}-s{i}" for i in range(5))
        assert client.batch(e.tag).succeeded == 5
        assert len(list(client.iter_results(e.tag))) == 5


async def test_wait_many_does_not_poll_redis_in_a_loop(e: Env) -> None:
    """While nothing ends, waiting costs ~no Redis commands (pub/sub, re-check every 5 s)."""
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        ids = [f"{e.tag}-idle{i}" for i in range(50)]
        await client.submit_many([_text(i) for i in ids])
        before = int((await client.redis.info("stats"))["total_commands_processed"])
        with pytest.raises(Timeout):
            await client.wait_many(ids, timeout=2)
        after = int((await client.redis.info("stats"))["total_commands_processed"])
    assert after - before < 300  # 1 subscribe + 1 pipelined read of 2 keys x 50, not 50 x polls
    await asyncio.sleep(0)
