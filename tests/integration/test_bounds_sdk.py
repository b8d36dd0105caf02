"""The SDK's Kafka producer under concurrency and a stalled broker, on real tansu and
redis-server: ten concurrent first submits start one producer, and a broker that stops
answering is vlmq's `Unavailable` naming its address, not aiokafka's own error."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from tests.helpers import Env
from vlmq.deploy.stack import Stack, ensure_topics
from vlmq.producer import Client, caption
from vlmq.producer import client as client_module
from vlmq.producer.errors import JobNotFound, Unavailable
from vlmq.schemas import JobState

TIMEOUT_MS = 3000  # the producer's request timeout: a stall surfaces after this, not 40 s


async def test_ten_concurrent_first_submits_start_one_producer(
    e: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[AIOKafkaProducer] = []

    class Counted(AIOKafkaProducer):  # type: ignore[misc]  # aiokafka has no types
        async def start(self) -> None:
            started.append(self)
            await asyncio.sleep(0.05)  # the others arrive while this one starts
            await super().start()

    monkeypatch.setattr(client_module, "AIOKafkaProducer", Counted)
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        jobs = [caption(f"s3://{e.bucket}/{i}.jpg", job_id=f"{e.tag}-{i}") for i in range(10)]
        handles = await asyncio.gather(*(client.submit(j) for j in jobs))
        assert [h.sent for h in handles] == [True] * 10
        assert len(started) == 1
        assert [(await client.status(j.job_id)).state for j in jobs] == [JobState.QUEUED] * 10


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Stack]:
    """A tansu of this test's own, to stop and start (SIGCONT, then gone, afterwards)."""
    st = Stack(tmp_path / "kafka")
    st._up_kafka(None, None)
    ensure_topics(st.services["kafka"].url, 1)
    yield st
    st.down()


async def _unavailable(coro: Any, address: str) -> Unavailable:
    t0 = time.monotonic()
    with pytest.raises(Unavailable) as err:
        await asyncio.wait_for(coro, 60)
    assert address in str(err.value) and err.value.service == "Kafka", err.value
    assert time.monotonic() - t0 < 30
    return err.value


async def test_a_stalled_broker_is_unavailable_with_its_address(e: Env, broker: Stack) -> None:
    address = broker.services["kafka"].url
    options = {"request_timeout_ms": TIMEOUT_MS}
    async with Client(address, e.redis, kafka_options=options) as client:
        first = caption("s3://b/first.jpg", job_id=f"{e.tag}-first")
        assert (await client.submit(first)).sent
        broker.signal("kafka", signal.SIGSTOP)
        try:
            stalled = caption("s3://b/stalled.jpg", job_id=f"{e.tag}-stalled")
            err = await _unavailable(client.submit(stalled), address)
            assert err.job_id == stalled.job_id  # and the job does not look queued
            with pytest.raises(JobNotFound):
                await client.status(stalled.job_id)
            # A new client's first submit meets the stall while its producer starts.
            async with Client(address, e.redis, kafka_options=options) as fresh:
                await _unavailable(fresh.submit(caption("s3://b/x.jpg", job_id=f"{e.tag}-fresh")), address)
        finally:
            broker.signal("kafka", signal.SIGCONT)
