"""The online door under load and when a replica dies: real `vlmq api` processes, tansu,
redis-server, moto_server and a fake-engine worker, flooded with concurrent
`/v1/chat/completions` requests (httpx) while `/healthz` is polled."""

from __future__ import annotations

import asyncio
import json
import time

import httpx2 as httpx
import pytest

from tests.helpers import Env, log_text, start_worker
from tests.integration.test_api import Api, line
from vlmq.api.records import Records
from vlmq.core.settings import Connection
from vlmq.core.topology import connect_redis
from vlmq.deploy.stack import wait_until

BODY = json.loads(line("load"))["body"]


@pytest.fixture
def api(e: Env) -> Api:
    return Api(e)


async def flood(base: str, key: str, n: int) -> tuple[list[httpx.Response], list[float]]:
    """`n` concurrent chat completions; /healthz polled every 50 ms meanwhile. The answers
    and each /healthz's latency (or -1 for a /healthz that was not 200)."""
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        headers = {"Authorization": f"Bearer {key}"}
        calls = [http.post(f"{base}/chat/completions", json=BODY, headers=headers) for _ in range(n)]
        done = asyncio.Event()
        health: list[float] = []

        async def poll() -> None:
            root = base.removesuffix("/v1")
            while not done.is_set():
                t0 = time.monotonic()
                r = await http.get(f"{root}/healthz")
                health.append(time.monotonic() - t0 if r.status_code == 200 else -1)
                await asyncio.sleep(0.05)

        poller = asyncio.create_task(poll())
        try:
            answers = await asyncio.gather(*calls)
        finally:
            done.set()
            await poller
    return answers, health


def test_ten_times_the_limit_gets_429s_and_healthz_stays_up(e: Env, api: Api) -> None:
    """10x `online_max_queued` at once, on a pool of 16 connections: admitted requests are
    answered, the rest get 429 with Retry-After, nothing else; /healthz answers throughout.
    (Before: each waiter held a pool connection and a full pool read as a Redis outage.)"""
    start_worker(e, "w", engine_args="step_ms=20,max_num_seqs=64")
    wait_until(lambda: "partitions assigned" in log_text(e, "w"), "the worker's partitions", 60)
    base = api.start(online_max_queued=20, redis_max_connections=16, online_timeout_s=120)
    answers, health = asyncio.run(flood(base, api.key("load"), 200))
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    ok = [r for r in answers if r.status_code == 200]
    full = [r for r in answers if r.status_code == 429]
    assert len(ok) >= 20 and full, (len(ok), len(full))
    for r in full:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    assert all(r.json()["choices"][0]["message"]["content"] for r in ok)
    assert health and min(health) >= 0, "a /healthz was not 200"
    assert max(health) < 2.0, f"slowest /healthz {max(health):.2f} s"
    print(f"200: {len(ok)}, 429: {len(full)}, /healthz max {max(health) * 1000:.0f} ms")


def test_a_killed_replicas_slots_are_freed_within_seconds(e: Env, api: Api) -> None:
    """kill -9 of a replica with requests waiting (no worker: they wait): its admission
    slots leave the online set within a few `online_lease_s`, not `online_timeout_s`."""
    first = api.start("api-1", online_max_queued=10, online_lease_s=1, online_timeout_s=600)
    second = api.start("api-2", online_max_queued=10, online_lease_s=1, online_timeout_s=600)
    key = api.key("kill")

    async def fill() -> None:
        async with httpx.AsyncClient(timeout=600) as http:
            headers = {"Authorization": f"Bearer {key}"}
            waiting = [
                asyncio.create_task(http.post(f"{first}/chat/completions", json=BODY, headers=headers))
                for _ in range(10)
            ]
            await _until_depth(e, 10, 30)
            full = await http.post(f"{second}/chat/completions", json=BODY, headers=headers)
            assert full.status_code == 429  # the first replica's 10 hold every slot
            api.kill(first)
            t0 = time.monotonic()
            await _until_depth(e, 0, 15)
            print(f"a dead replica's 10 slots freed after {time.monotonic() - t0:.1f} s")
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)

    asyncio.run(fill())


async def _until_depth(e: Env, n: int, timeout: float) -> None:
    """Wait until `n` online requests hold admission slots (fleet-wide)."""
    redis = connect_redis(Connection.load({"redis_url": e.redis, "redis_topology": e.topology}))
    deadline = time.monotonic() + timeout
    try:
        while (depth := await Records(redis).online_depth()) != n:
            assert time.monotonic() < deadline, f"{depth} slots held, not {n}"
            await asyncio.sleep(0.1)
    finally:
        await redis.aclose()
