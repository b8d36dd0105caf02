"""Security settings that can be proven here: least-privilege Redis, no secret in logs."""

from __future__ import annotations

import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from tests.helpers import Env, log_text, start_worker, stop_worker, wait_running
from vlmq.producer import Client, JobCancelled
from vlmq.schemas import Job, JobState, Message, Result, Sampling, keys
from vlmq.schemas.codec import encode_result

# What docs/operations.md recommends: vlmq's keys and channels only, no dangerous commands;
# a producer may read everything of vlmq's but write only its own `sub:` keys.
WORKER_KEYS = ["~vlmq:*"]
PRODUCER_KEYS = ["%R~vlmq:*", f"%RW~{keys.PRODUCER_KEYS}"]


async def _acl_user(redis: Redis, secret: str, key_rules: list[str] = WORKER_KEYS) -> str:
    name = f"vlmq-{uuid.uuid4().hex[:6]}"
    rules = ["on", f">{secret}", *key_rules, "&vlmq:*", "+@read", "+@write", "+@scripting", "+@pubsub"]
    await redis.execute_command(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        "ACL", "SETUSER", name, *rules, "-@dangerous", "+ping", "+info"
    )
    return name


async def test_a_producer_credential_submits_and_cancels_but_cannot_forge_a_result(
    e: Env, redis: Redis
) -> None:
    secret = f"p-{uuid.uuid4().hex}"
    producer = e.redis.replace(
        "redis://", f"redis://{await _acl_user(redis, secret, PRODUCER_KEYS)}:{secret}@"
    )
    worker = e.redis.replace("redis://", f"redis://{await _acl_user(redis, secret)}:{secret}@")
    victim, slow = f"{e.tag}-victim", f"{e.tag}-slow"
    async with Client(e.kafka, producer, topic=e.jobs_topic) as client:
        quick = Sampling(max_tokens=2)
        await client.submit(
            Job(job_id=victim, messages=[Message("user", "hello")], batch_id=e.tag, sampling=quick)
        )
        forged = Result(victim, JobState.SUCCEEDED, text="forged", batch_id=e.tag)
        with pytest.raises(NoPermissionError):  # the script that writes terminal states
            await client.store.finish(forged)
        for key in (keys.job_key(victim), keys.batch_key(keys.shard(victim), e.tag)):
            with pytest.raises(NoPermissionError):  # or the keys themselves
                await client.redis.hset(key, "state", "succeeded")
        # A `record` in the producer's own key is never read as a result.
        await client.redis.hset(keys.submitted_key(victim), "record", encode_result(forged))
        assert (await client.status(victim)).state is JobState.QUEUED
        w = start_worker(e, "w", redis_url=worker, engine_args="step_ms=200,completion_tokens=1000")
        result = await client.wait(victim, timeout=30)
        assert result.state is JobState.SUCCEEDED and result.text != "forged"
        await client.submit(Job(job_id=slow, messages=[Message("user", "slow")], batch_id=e.tag))
        await wait_running(client, slow)
        assert await client.cancel(slow)  # a request the worker carries out
        with pytest.raises(JobCancelled):
            await client.wait(slow, timeout=30)
        counts = await client.batch(e.tag)
    assert (counts.total, counts.succeeded, counts.cancelled) == (2, 1, 1)
    assert stop_worker(w) == 0


async def test_worker_and_client_work_with_an_acl_user_limited_to_vlmq_keys(e: Env, redis: Redis) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    user = await _acl_user(redis, secret)
    url = e.redis.replace("redis://", f"redis://{user}:{secret}@")
    limited = Redis.from_url(url)
    with pytest.raises(Exception, match="no permissions"):
        await limited.set("other:key", "x")  # the ACL really limits
    await limited.aclose()
    w = start_worker(e, "w", redis_url=url, kafka_sasl_password=f"kafka-{secret}")
    async with Client(e.kafka, url, topic=e.jobs_topic) as client:
        await client.submit(Job(job_id=f"{e.tag}-acl", messages=[Message("user", "hello")]))
        result = await client.wait(f"{e.tag}-acl", timeout=30)
    assert result.state is JobState.SUCCEEDED
    assert stop_worker(w) == 0
    log = log_text(e, "w")
    assert "worker starting" in log and "***" in log
    assert secret not in log  # neither the Redis password nor the Kafka SASL password
