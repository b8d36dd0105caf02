"""The result cache (docs/cache.md) with real worker processes on tansu + redis-server
(+ a Redis Cluster where marked): identical jobs answered once, across batches, per tenant,
coalesced while one runs, and every way a leader can end without an answer."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import boto3
import pytest
from msgspec.structs import replace

from tests.helpers import Env, put_images, start_worker, stop_worker, wait_running
from tests.integration.test_cli_errors import run
from vlmq.core.settings import Connection
from vlmq.core.topology import AnyRedis
from vlmq.producer import Client, caption
from vlmq.schemas import Job, JobState, Result, Sampling, keys
from vlmq.worker.samples import photo

# The cache is off for the rest of the suite (tests/conftest.py): each worker here turns it on.


def client(e: Env, tenant: str | None = None, topic: str | None = None) -> Client:
    settings = Connection.load({"redis_url": e.redis, "kafka_bootstrap": e.kafka, "tenant": tenant})
    return Client(settings=settings, topic=topic or e.jobs_topic)


def copy_image(e: Env, seed: int, key: str) -> str:
    """The same bytes as put_images' image `seed`, under another name."""
    boto3.client("s3", endpoint_url=e.s3).put_object(Bucket=e.bucket, Key=key, Body=photo(seed=seed))
    return f"s3://{e.bucket}/{key}"


async def entries(redis: AnyRedis) -> list[dict[str, str]]:
    """Every cache entry's fields (on every master of a cluster)."""
    out = []
    async for k in redis.scan_iter(match=f"{keys.PREFIX}:{{c*}}:cache:*", count=1000):
        raw: dict[Any, Any] = await redis.hgetall(k)
        out.append({(a.decode() if isinstance(a, bytes) else a): v.decode() for a, v in raw.items()})
    return out


async def until(check: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def prompt(e: Env) -> str:
    return f"Describe it ({e.tag})."  # a prompt of this test's own: no entry of another test matches


@pytest.mark.topologies
async def test_identical_jobs_are_answered_once_across_batches_and_counted(e: Env, redis: AnyRedis) -> None:
    uris = put_images(e, 4, prefix="a")
    copies = [copy_image(e, i, f"copy/{i}.jpg") for i in range(4)]  # same bytes, other URLs
    start_worker(e, "w", engine_args="step_ms=2", cache="true")
    first = [caption(u, prompt(e), job_id=f"{e.tag}-a{i}", batch_id=f"{e.tag}-1") for i, u in enumerate(uris)]
    again = [
        caption(u, prompt(e), job_id=f"{e.tag}-b{i}", batch_id=f"{e.tag}-2") for i, u in enumerate(copies)
    ]
    off = caption(uris[0], prompt(e), job_id=f"{e.tag}-off", batch_id=f"{e.tag}-2", cache="off")
    fresh = caption(uris[1], prompt(e), job_id=f"{e.tag}-refresh", batch_id=f"{e.tag}-2", cache="refresh")
    after = caption(uris[1], prompt(e), job_id=f"{e.tag}-after", batch_id=f"{e.tag}-3")
    async with client(e) as c:
        await c.submit_many(first)
        ran = {r.job_id: r for r in await c.wait_many([j.job_id for j in first], timeout=60)}
        await c.submit_many([*again, off, fresh])
        served = await c.wait_many([j.job_id for j in [*again, off, fresh]], timeout=60)
        await c.submit(after)
        last = await c.wait(after.job_id, 60)
        counts = [await c.batch(f"{e.tag}-{n}") for n in (1, 2, 3)]
    assert all(not r.cached and r.state is JobState.SUCCEEDED for r in ran.values())
    for i, r in enumerate(served[:4]):
        source = ran[f"{e.tag}-a{i}"]
        assert r.state is JobState.SUCCEEDED and r.cached and r.cache_source == source.job_id
        assert (r.text, r.usage, r.model) == (source.text, source.usage, source.model)
        assert r.cache_age_s is not None and r.cache_age_s >= 0
        assert r.batch_id == f"{e.tag}-2" and r.timings and r.timings.engine_s is None
    assert not served[4].cached and not served[5].cached  # off; refresh runs anyway
    assert last.cached and last.cache_source == fresh.job_id  # refresh replaced the entry
    totals = [(b.total, b.succeeded, b.queued, b.running) for b in counts]
    assert totals == [(4, 4, 0, 0), (6, 6, 0, 0), (1, 1, 0, 0)]  # cached answers count, once
    stats = run("cache", "stats", env={"VLMQ_REDIS_URL": e.redis})
    assert "(no tenant)" in stats.stdout and "entries=" in stats.stdout, stats.stderr
    assert all("answer" not in x or x["source"] for x in await entries(redis))


@pytest.mark.topologies
async def test_a_tenant_never_gets_another_tenants_answer(e: Env) -> None:
    (uri,) = put_images(e, 1)
    start_worker(e, "w", engine_args="step_ms=2", cache="true")

    def job(job_id: str, **kw: Any) -> Job:
        return caption(uri, prompt(e), job_id=job_id, **kw)

    async with client(e, "team-a") as a, client(e, "team-b") as b:
        await a.submit(job(f"{e.tag}-a1"))
        assert not (await a.wait(f"{e.tag}-a1", 60)).cached
        await b.submit(job(f"{e.tag}-b1", metadata={keys.CACHE_SCOPE_FIELD: "team-a"}))
        other = await b.wait(f"{e.tag}-b1", 60)  # its submitter's tenant, not the job's claim
        await a.submit(job(f"{e.tag}-a2"))
        same = await a.wait(f"{e.tag}-a2", 60)
    assert other.state is JobState.SUCCEEDED and not other.cached
    assert other.metadata[keys.CACHE_SCOPE_FIELD] == "team-b"
    assert same.cached and same.cache_source == f"{e.tag}-a1"
    purged = run("cache", "purge", "--scope", "team-a", env={"VLMQ_REDIS_URL": e.redis})
    assert "purged 1 entries" in purged.stdout, purged.stderr
    async with client(e, "team-a") as a:
        await a.submit(job(f"{e.tag}-a3"))
        assert not (await a.wait(f"{e.tag}-a3", 60)).cached  # purged: it ran again


@pytest.mark.topologies
async def test_identical_jobs_in_flight_wait_for_one_run(e: Env) -> None:
    (uri,) = put_images(e, 1)
    start_worker(e, "w", engine_args="step_ms=100,completion_tokens=16", cache="true")  # 1.6 s a run
    jobs = [caption(uri, prompt(e), job_id=f"{e.tag}-{i}", batch_id=e.tag) for i in range(5)]
    async with client(e) as c:
        await c.submit_many(jobs)
        results = await c.wait_many([j.job_id for j in jobs], timeout=60)
        counts = await c.batch(e.tag)
    ran = [r for r in results if not r.cached]
    assert len(ran) == 1, [(r.job_id, r.cached) for r in results]
    assert all(r.cached and r.cache_source == ran[0].job_id for r in results if r.cached)
    assert {r.text for r in results} == {ran[0].text}
    assert (counts.total, counts.succeeded) == (5, 5)


async def _following(redis: AnyRedis) -> bool:
    return any(x.get("waiters") == "1" and "leader" in x for x in await entries(redis))


async def test_a_cancelled_leader_leaves_its_follower_to_run(e: Env, redis: AnyRedis) -> None:
    (uri,) = put_images(e, 1)
    start_worker(e, "w", engine_args="step_ms=300,completion_tokens=16", cache="true")  # 4.8 s a run
    async with client(e) as c:
        await c.submit(caption(uri, prompt(e), job_id=f"{e.tag}-lead"))
        await wait_running(c, f"{e.tag}-lead")
        await c.submit(caption(uri, prompt(e), job_id=f"{e.tag}-follow"))
        await until(lambda: _following(redis), "the follower to wait")
        await c.cancel(f"{e.tag}-lead")
        lead = await c.store.wait(f"{e.tag}-lead", 60)  # the Result, not JobCancelled
        follow = await c.wait(f"{e.tag}-follow", 60)
    assert lead is not None and lead.state is JobState.CANCELLED
    assert follow.state is JobState.SUCCEEDED and not follow.cached  # it ran itself


@pytest.mark.parametrize("end", ["fails", "killed"])
async def test_a_leader_that_fails_or_dies_leaves_its_follower_to_run(
    e: Env, redis: AnyRedis, end: str
) -> None:
    """Leader and follower on two workers (two topics, one Redis): the leader's worker
    times its job out, or is killed -9; the follower's runs it itself and succeeds."""
    (uri,) = put_images(e, 1)
    slow = "step_ms=300,completion_tokens=16"  # 4.8 s a run
    leader = start_worker(e, "a", engine_args=slow, job_timeout_s=3, cache="true")
    start_worker(e, "b", engine_args=slow, jobs_topic=e.results_topic, group_id=f"{e.group}-b", cache="true")
    async with client(e) as c, client(e, topic=e.results_topic) as other:
        await c.submit(caption(uri, prompt(e), job_id=f"{e.tag}-lead"))
        await wait_running(c, f"{e.tag}-lead")
        await other.submit(caption(uri, prompt(e), job_id=f"{e.tag}-follow"))
        await until(lambda: _following(redis), "the follower to wait")
        if end == "killed":
            stop_worker(leader, signal.SIGKILL)
        else:
            lead = await c.store.wait(f"{e.tag}-lead", 60)  # the Result, not JobFailed
            assert (
                lead is not None
                and lead.state is JobState.FAILED
                and lead.error
                and lead.error.code.value == "timeout"
            )
        follow = await other.wait(f"{e.tag}-follow", 60)
    assert follow.state is JobState.SUCCEEDED and not follow.cached and follow.error is None


async def test_a_changed_model_option_misses(e: Env) -> None:
    (uri,) = put_images(e, 1)
    start_worker(e, "a", engine_args="step_ms=2,completion_tokens=16", cache="true")
    start_worker(
        e,
        "b",
        engine_args="step_ms=5,completion_tokens=8",  # step_ms is pace only; completion_tokens is not
        jobs_topic=e.results_topic,
        group_id=f"{e.group}-b",
        cache="true",
    )
    async with client(e) as a, client(e, topic=e.results_topic) as b:
        await a.submit(caption(uri, prompt(e), job_id=f"{e.tag}-1"))
        one = await a.wait(f"{e.tag}-1", 60)
        await b.submit(caption(uri, prompt(e), job_id=f"{e.tag}-2"))
        two = await b.wait(f"{e.tag}-2", 60)
        await b.submit(caption(uri, prompt(e), job_id=f"{e.tag}-3"))
        three = await b.wait(f"{e.tag}-3", 60)
    assert not one.cached and not two.cached  # another option: another key
    assert two.usage and two.usage.completion_tokens == 8
    assert three.cached and three.cache_source == f"{e.tag}-2"


async def test_answers_expire_after_the_ttl(e: Env, redis: AnyRedis) -> None:
    (uri,) = put_images(e, 1)
    start_worker(e, "w", engine_args="step_ms=2", cache_ttl_s=2, cache="true")
    async with client(e) as c:
        await c.submit(caption(uri, prompt(e), job_id=f"{e.tag}-1"))
        await c.wait(f"{e.tag}-1", 60)
        await c.submit(caption(uri, prompt(e), job_id=f"{e.tag}-2"))
        assert (await c.wait(f"{e.tag}-2", 60)).cached
        mine = [x for x in await entries(redis) if x.get("source") == f"{e.tag}-1"]
        assert mine, "the entry is written"

        async def gone() -> bool:
            return not any(x.get("source") == f"{e.tag}-1" for x in await entries(redis))

        await until(gone, "the entry to expire")
        await c.submit(caption(uri, prompt(e), job_id=f"{e.tag}-3"))
        late = await c.wait(f"{e.tag}-3", 60)
    assert late.state is JobState.SUCCEEDED and not late.cached


async def test_sampled_requests_are_not_cached_by_default(e: Env) -> None:
    (uri,) = put_images(e, 1)
    start_worker(e, "w", engine_args="step_ms=2", cache="true")
    hot = Sampling(max_tokens=32, temperature=0.8)
    jobs = [replace(caption(uri, prompt(e), job_id=f"{e.tag}-{i}"), sampling=hot) for i in range(2)]
    async with client(e) as c:
        for j in jobs:
            await c.submit(j)
            assert not (await c.wait(j.job_id, 60)).cached


async def test_a_scope_keeps_at_most_its_bound_oldest_first(e: Env) -> None:
    uris = put_images(e, 3)
    start_worker(e, "w", engine_args="step_ms=2", cache_max_entries=2, cache="true")
    async with client(e, f"bound-{e.tag}") as c:
        for i, uri in enumerate(uris):  # three answers in a scope that keeps two
            await c.submit(caption(uri, prompt(e), job_id=f"{e.tag}-{i}"))
            await c.wait(f"{e.tag}-{i}", 60)
        await c.submit(caption(uris[2], prompt(e), job_id=f"{e.tag}-newest"))
        newest = await c.wait(f"{e.tag}-newest", 60)
        await c.submit(caption(uris[0], prompt(e), job_id=f"{e.tag}-oldest"))
        oldest = await c.wait(f"{e.tag}-oldest", 60)
    assert newest.cached and newest.cache_source == f"{e.tag}-2"
    assert not oldest.cached  # evicted


def test_the_api_records_the_keys_tenant_and_maps_vlmq_cache(e: Env) -> None:
    from tests.integration.test_api import Api, line

    api = Api(e)
    base = api.start()
    start_worker(e, "w", engine_args="step_ms=2", cache="true")
    a, b = api.client(base, "a"), api.client(base, "b")
    body = json.loads(line(f"q-{e.tag}"))["body"]
    answers = [
        a.chat.completions.create(**body),
        a.chat.completions.create(**body),
        b.chat.completions.create(**body),
        a.chat.completions.create(**body, metadata={"vlmq_cache": "off"}),
    ]

    async def results() -> list[Result]:
        async with client(e) as c:
            return [await c.status(x.id.removeprefix("chatcmpl-")) for x in answers]

    first, again, other, off = asyncio.run(results())
    assert again.cached and again.cache_source == first.job_id
    assert answers[1].usage == answers[0].usage  # the answer's usage, as it was run
    assert not other.cached and other.metadata[keys.CACHE_SCOPE_FIELD] == f"b-{e.tag}"
    assert first.metadata[keys.CACHE_SCOPE_FIELD] == f"a-{e.tag}"
    assert not off.cached
