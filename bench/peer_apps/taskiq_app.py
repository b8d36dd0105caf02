"""Taskiq with taskiq-redis: a Redis Streams broker (consumer group; acknowledged once the
result is saved; unacknowledged messages reclaimed after idle_timeout) and the Redis
result backend. `taskiq worker bench.peer_apps.taskiq_app:broker --ack-type when_saved`."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from bench.peer_apps.common import URL, body, main

broker = RedisStreamBroker(URL, idle_timeout=10_000).with_result_backend(
    RedisAsyncResultBackend(URL, result_ex_time=3600)
)


@broker.task(task_name="noop")
async def noop(i: int, submitted: float) -> list[float]:
    return body(i, submitted)


def submit(ids: list[str]) -> None:
    async def go() -> None:
        await broker.startup()
        for start in range(0, len(ids), 500):
            chunk = enumerate(ids[start : start + 500], start)
            await asyncio.gather(*(noop.kicker().with_task_id(j).kiq(i, time.time()) for i, j in chunk))
        await broker.shutdown()

    asyncio.run(go())


def collect(ids: list[str]) -> list[Any]:
    async def go() -> list[Any]:
        backend = broker.result_backend
        out: list[Any] = []
        for j in ids:
            ready = await backend.is_result_ready(j)
            out.append((await backend.get_result(j)).return_value if ready else None)
        return out

    return asyncio.run(go())


if __name__ == "__main__":
    main(submit, collect)
