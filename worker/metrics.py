"""Prometheus metrics and the /metrics, /healthz, /readyz endpoints (one aiohttp server)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

JOBS = Counter("vlmq_jobs_total", "Jobs that ended here, by state", ["state"])
ERRORS = Counter("vlmq_job_errors_total", "Failed jobs by error code", ["code"])
DEAD_LETTERS = Counter("vlmq_dead_letters_total", "Records sent to the dead-letter topic")
SKIPPED = Counter("vlmq_jobs_skipped_total", "Deliveries skipped: the job had already ended")
STAGE = Histogram(
    "vlmq_stage_seconds",
    "Time per stage",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
IN_FLIGHT = Gauge("vlmq_in_flight", "Jobs held by this worker")
PARKED = Gauge("vlmq_jobs_parked", "Jobs waiting for their shard's Redis master (no in-flight slot held)")
WAIT_REPLICAS = Gauge("vlmq_redis_wait_replicas", "Replicas each terminal write waits for (WAIT)")
MASTERS_SHORT = Gauge("vlmq_redis_masters_short", "Redis masters with fewer replicas than required now")
PAUSED = Gauge("vlmq_partitions_paused", "1 while intake is paused because in-flight is full")
LAG = Gauge("vlmq_consumer_lag", "Messages behind the log end, per partition", ["partition"])
ENGINE_RUNNING = Gauge("vlmq_engine_running", "Sequences the engine is running (batch occupancy)")
IMAGE_BYTES = Counter("vlmq_image_bytes_total", "Image bytes fetched")
CACHE = Counter(
    "vlmq_cache_total",
    "Result cache lookups: hit, coalesced (after waiting for an identical job), miss (ran and"
    " led), refresh, bypass (off, or not deterministic), error (ran without the cache)",
    ["outcome"],
)
COMMITS = Counter("vlmq_commits_total", "Offset commits")
HELPER_RESTARTS = Counter("vlmq_helper_restarts_total", "Helper tasks restarted after a crash", ["helper"])


async def serve(
    host: str, port: int, healthy: Callable[[], bool], not_ready: Callable[[], list[str]]
) -> web.AppRunner:
    """Start the HTTP server on host:port; the caller cleans it up with `runner.cleanup()`.
    /readyz answers 503 with what is not ready (e.g. "redis", "commits", "engine")."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(status=200 if healthy() else 503, text="ok" if healthy() else "unhealthy")

    async def readyz(_: web.Request) -> web.Response:
        reasons = not_ready()
        return web.Response(
            status=503 if reasons else 200, text=f"not ready: {', '.join(reasons)}" if reasons else "ready"
        )

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics), web.get("/healthz", healthz), web.get("/readyz", readyz)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
