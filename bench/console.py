"""The console's reads at scale: one batch of N jobs (1,000,000 by default) recorded through
the real scripts (enqueue.lua, finish.lua) into a private redis-server, then the time of
each page the console serves: the batch page (counters, O(shards)), a job list page at the
top and deep behind a cursor, filtered by state, error code and time, a search; and, as the
baseline, the scan the batch page did before (its failure groups read up to 20,000 ended
jobs). Also what the indexes cost: Redis commands and bytes per job.

    python -m bench.console [--jobs 1000000] [--failed-share 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis as sync_redis
from redis.asyncio import Redis

from bench.common import write_result
from vlmq.api.dashboard.console import JobQuery, job_page
from vlmq.core.state import StateStore
from vlmq.deploy.stack import free_port, redis_bin, redis_ok, wait_until
from vlmq.schemas import keys
from vlmq.schemas.errors import ErrorCode
from vlmq.schemas.job import Error, JobState, Result, Timings

BATCH = "bench-console"
CODES = (ErrorCode.ENGINE_ERROR, ErrorCode.TIMEOUT, ErrorCode.IMAGE_CORRUPT)


def stats(url: str) -> tuple[int, int]:
    with sync_redis.Redis.from_url(url) as r:
        return int(r.info("stats")["total_commands_processed"]), int(r.info("memory")["used_memory"])


async def fill(store: StateStore, n: int, failed_share: float) -> float:
    """Enqueue n jobs (chunks of 2000 sharing a submit time, as a bulk submit does), then end
    the oldest 20%: `failed_share` of all jobs failed (three codes), the rest succeeded."""
    t0 = time.time() - n / 2000
    for c in range(0, n, 2000):
        at = t0 + c / 2000
        await store.enqueue_many([(f"j{i:08d}", BATCH, at, {}, "d") for i in range(c, min(c + 2000, n))])
    ended, failed = n // 5, int(n * failed_share)
    for c in range(0, ended, 500):
        results = []
        for i in range(c, min(c + 500, ended)):
            bad = i < failed
            err = Error(CODES[i % len(CODES)], "bench") if bad else None
            state = JobState.FAILED if bad else JobState.SUCCEEDED
            results.append(
                Result(job_id=f"j{i:08d}", state=state, batch_id=BATCH, error=err, timings=Timings())
            )
        await asyncio.gather(*(store.finish(r) for r in results))
    return t0


async def timed(fn: Callable[[], Awaitable[Any]], reps: int = 15) -> dict[str, float]:
    await fn()  # warm
    took = []
    for _ in range(reps):
        t = time.perf_counter()
        await fn()
        took.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(statistics.median(took), 2), "max_ms": round(max(took), 2)}


async def deep_cursor(store: StateStore, pages: int) -> str:
    q = JobQuery()
    for _ in range(pages):
        got = await job_page(store, f"b:{BATCH}", q, 25)
        q = JobQuery(cursor=got.next or "")
    return q.cursor


async def old_scan(store: StateStore, cap: int = 20_000) -> int:
    """What the batch page read before: ended jobs, until `cap`, grouped by code."""
    seen, groups = 0, dict[ErrorCode, int]()
    async for r in store.iter_batch(BATCH):
        seen += 1
        if r.error is not None:
            groups[r.error.code] = groups.get(r.error.code, 0) + 1
        if seen >= cap:
            break
    return seen


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    work = tempfile.mkdtemp(prefix="vlmq-bench-console-")
    proc = subprocess.Popen(
        [redis_bin(), "--port", str(port), "--save", "", "--appendonly", "no", "--dir", work],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(lambda: redis_ok(url), "redis-server")
    return proc, url


async def measure(url: str, n: int, failed_share: float) -> dict[str, Any]:
    redis = Redis.from_url(url)
    store = StateStore(redis, coalesce=True)  # as a worker writes: concurrent calls pipelined
    before = stats(url)
    t = time.perf_counter()
    t0 = await fill(store, n, failed_share)
    fill_s = time.perf_counter() - t
    after = stats(url)
    index_bytes = 0
    for s in range(keys.SHARDS):
        for b in ("all", "open", "succeeded", "failed", *(f"e.{c.value}" for c in CODES)):
            index_bytes += int(await redis.memory_usage(keys.index_key(s, f"b:{BATCH}", b)) or 0)
    cursor = await deep_cursor(store, 100)
    g = f"b:{BATCH}"
    mid = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t0 + n / 4000))
    reads = {
        "batch_page_counters": await timed(lambda: store.batch_counts(BATCH)),
        "jobs_first_page": await timed(lambda: job_page(store, g, JobQuery(), 25)),
        "jobs_page_100_deep": await timed(lambda: job_page(store, g, JobQuery(cursor=cursor), 25)),
        "jobs_failed": await timed(lambda: job_page(store, g, JobQuery(state="failed"), 25)),
        "jobs_error_code": await timed(lambda: job_page(store, g, JobQuery(code="timeout"), 25)),
        "jobs_queued": await timed(lambda: job_page(store, g, JobQuery(state="queued"), 25)),
        "jobs_time_window": await timed(lambda: job_page(store, g, JobQuery(until=mid), 25)),
        "jobs_search": await timed(lambda: job_page(store, g, JobQuery(q="j00000042"), 25)),
    }
    baseline = await timed(lambda: old_scan(store), reps=3)
    await redis.aclose()
    return {
        "reads": reads,
        "old_batch_page_scan": baseline,
        "fill_s": round(fill_s, 1),
        "redis_commands_per_job": round((after[0] - before[0]) / n, 2),
        "index_bytes_per_job": round(index_bytes / n, 1),
        "used_memory_bytes_per_job": round((after[1] - before[1]) / n, 1),
    }


def main(n: int, failed_share: float) -> None:
    proc, url = start_redis()
    try:
        got = asyncio.run(measure(url, n, failed_share))
    finally:
        proc.terminate()
        proc.wait(10)
    value = got["reads"]["jobs_page_100_deep"]["p50_ms"]
    write_result(
        "console-pages",
        "ms per page (p50): a 25-job page 100 pages deep; baseline: the old batch page's scan",
        got["old_batch_page_scan"]["p50_ms"],
        value,
        {"jobs": n, "failed_share": failed_share, "ended_share": 0.2, "shards": keys.SHARDS},
        **got,
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--jobs", type=int, default=1_000_000)
    p.add_argument("--failed-share", type=float, default=0.1)
    a = p.parse_args()
    main(a.jobs, a.failed_share)
