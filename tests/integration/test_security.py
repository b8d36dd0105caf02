"""Security settings that can be proven here: least-privilege Redis, no secret in logs."""

from __future__ import annotations

import uuid

import pytest
from redis.asyncio import Redis

from tests.helpers import Env, log_text, start_worker, stop_worker
from vlmq.producer import Client
from vlmq.schemas import Job, JobState, Message


async def _acl_user(redis: Redis, secret: str) -> str:
    name = f"vlmq-{uuid.uuid4().hex[:6]}"
    # What docs/operations.md recommends: vlmq's keys and channels only, no dangerous commands.
    await redis.execute_command(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        "ACL",
        "SETUSER",
        name,
        "on",
        f">{secret}",
        "~vlmq:*",
        "&vlmq:*",
        "+@read",
        "+@write",
        "+@scripting",
        "+@pubsub",
        "+ping",
        "+info",
        "-@dangerous",
    )
    return name


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
