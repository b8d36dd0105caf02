"""arq: `arq bench.peer_apps.arq_app.WorkerSettings` (max_jobs 64, results kept, retries on)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from arq import create_pool
from arq.connections import RedisSettings
from arq.jobs import Job, JobStatus

from bench.peer_apps.common import URL, body, main

SETTINGS = RedisSettings.from_dsn(URL)


async def noop(ctx: dict[str, Any], i: int, submitted: float) -> list[float]:
    return body(i, submitted)


class WorkerSettings:
    functions = [noop]  # noqa: RUF012 - arq's declared form
    redis_settings = SETTINGS
    max_jobs = 64
    job_timeout = 10  # a killed worker's jobs run again after this (arq re-runs in-progress jobs)
    keep_result = 3600


def submit(ids: list[str]) -> None:
    async def go() -> None:
        pool = await create_pool(SETTINGS)
        for start in range(0, len(ids), 500):
            chunk = enumerate(ids[start : start + 500], start)
            await asyncio.gather(*(pool.enqueue_job("noop", i, time.time(), _job_id=j) for i, j in chunk))
        await pool.aclose()

    asyncio.run(go())


def collect(ids: list[str]) -> list[Any]:
    async def go() -> list[Any]:
        pool = await create_pool(SETTINGS)
        out: list[Any] = []
        for j in ids:
            job = Job(j, pool)
            out.append(await job.result(timeout=0) if await job.status() == JobStatus.complete else None)
        await pool.aclose()
        return out

    return asyncio.run(go())


if __name__ == "__main__":
    main(submit, collect)
