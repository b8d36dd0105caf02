"""The result cache, worker side (docs/cache.md): the request key, and one job's way
through the cache: hit, wait for an identical running job, or run and lead.

The key is computed after the fetch, from the bytes as fetched (content, not URL) and
everything else that decides the answer. A job the cache serves becomes an ordinary
Result (finish.lua, batch counters, exactly once) marked `cached`. A job that runs leads its
entry until its own terminal write, then writes the answer (or drops the lead: a failure,
a cancel, a hand-back), and identical jobs that waited look again. The cache never fails a
job: when Redis cannot answer for the cache, the job runs as if there were none.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from typing import Any

import msgspec
import structlog
from redis.exceptions import RedisError

from vlmq.core.cache import Answer, CacheStore, Hit, Wait, entry_digest
from vlmq.core.state import follow
from vlmq.core.topology import AnyRedis
from vlmq.schemas import keys
from vlmq.schemas.job import EmbeddingRef, Job, JobState, Result, TextPart
from vlmq.worker import metrics
from vlmq.worker.engines.base import Engine
from vlmq.worker.render import Sizing
from vlmq.worker.settings import WorkerSettings
from vlmq.worker.video import VideoSampling

log = structlog.get_logger("vlmq.cache")

# Bump whenever what goes into the key, or how an answer is made from the same inputs,
# changes (a new preprocessing step, a renderer change): old entries then simply miss.
KEY_VERSION = 1
# Engine options that change how fast or how much runs at once, never the answer: left
# out of the key, so retuning a fleet keeps its cache. Every other option is in it.
NEUTRAL_ENGINE_ARGS = frozenset(
    {
        "gpu_memory_utilization",
        "max_num_seqs",
        "max_num_batched_tokens",
        "swap_space",
        "disable_log_stats",
        "disable_log_requests",
        "enable_prefix_caching",
        "max_batch_size",
        "cache_max_entry_count",
        "step_ms",  # the fake engine's pace
    }
)
RECHECK_S = 1.0  # a waiter looks again this often, in case a wake-up was missed
_ENC = msgspec.json.Encoder(order="sorted")


def applies(job: Job, settings: WorkerSettings) -> bool:
    """Whether the cache serves this job: on, not `off` for the job, and deterministic
    (temperature 0 or a fixed seed) unless the worker takes sampled requests too."""
    if not settings.cache or job.cache == "off":
        return False
    s = job.sampling
    return s.temperature == 0.0 or s.seed is not None or settings.cache_sampled


def scope_of(job: Job, settings: WorkerSettings) -> str:
    """The job's cache scope: the tenant its submitter recorded (job metadata, bound to the
    submit record by the claim's digest check: docs/cache.md#scope), or one scope for all
    when the operator shares it. Jobs without a tenant share the unnamed scope."""
    if settings.cache_scope == "shared":
        return "*"
    return job.metadata.get(keys.CACHE_SCOPE_FIELD, "")


def request_key(
    job: Job, blobs: list[bytes], sizing: list[Sizing], engine: Engine, settings: WorkerSettings
) -> str:
    """The digest of everything that decides the answer (docs/cache.md#the-key)."""
    doc = {
        "v": KEY_VERSION,
        "engine": engine.name,
        "model": engine.model,
        "engine_args": {k: v for k, v in settings.engine_args.items() if k not in NEUTRAL_ENGINE_ARGS},
        "messages": _messages(job, blobs, sizing),
        # every field, defaults included: a changed default must not meet an old entry
        "sampling": msgspec.structs.asdict(job.sampling),
        "response_format": msgspec.to_builtins(job.response_format),
        "preprocess": {
            "video_fps": settings.video_fps,
            "max_video_frames": settings.max_video_frames,
            "max_video_s": settings.max_video_s,
        },
    }
    return hashlib.sha256(_ENC.encode(doc)).hexdigest()


def _messages(job: Job, blobs: list[bytes], sizing: list[Sizing]) -> list[Any]:
    """The messages with each medium as its content's sha256 and its preprocessing."""
    media = iter(zip(blobs, sizing, strict=True))
    out = []
    for m in job.messages:
        parts: list[Any] = []
        for p in m.parts:
            if isinstance(p, TextPart):
                parts.append(["text", p.text])
                continue
            blob, size = next(media)
            parts.append([p.kind, hashlib.sha256(blob).hexdigest(), _sizing(size)])
        out.append([m.role, parts])
    return out


def _sizing(size: Sizing) -> Any:
    if isinstance(size, VideoSampling):
        return msgspec.structs.asdict(size)
    if isinstance(size, EmbeddingRef):
        return {"image_grid_thw": size.image_grid_thw}
    return list(size)


class _Ticket(msgspec.Struct):
    digest: str
    scope: str
    lead: bool  # False: `refresh` writes its answer without having led


class ResultCache:
    """One worker's side of the cache: lookups, leads, wake-ups."""

    def __init__(self, redis: AnyRedis, settings: WorkerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.store = CacheStore(
            redis, ttl_s=settings.cache_ttl_s, max_entries=settings.cache_max_entries, lead_s=settings.lease_s
        )
        self._held: dict[str, _Ticket] = {}  # job id -> its entry, until its answer is written
        self._wakers: dict[str, asyncio.Event] = {}  # entry digest -> its waiters' event
        self._looking: dict[str, int] = {}  # entry digest -> jobs in _take for it here
        self._helpers: list[asyncio.Task[None]] = []
        self._dropping: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._helpers = [asyncio.create_task(self._listen()), asyncio.create_task(self._renew())]

    def close(self) -> None:
        for t in self._helpers:
            t.cancel()

    async def lookup(self, job: Job, blobs: list[bytes], sizing: list[Sizing]) -> Hit | None:
        """An identical job's answer (at once, or after waiting for it), or None: run the
        job (it may now lead its entry)."""
        if not applies(job, self.settings):
            metrics.CACHE.labels("bypass").inc()
            return None
        scope = scope_of(job, self.settings)
        digest = entry_digest(scope, request_key(job, blobs, sizing, self.engine, self.settings))
        if job.cache == "refresh":
            self._held[job.job_id] = _Ticket(digest, scope, lead=False)
            metrics.CACHE.labels("refresh").inc()
            return None
        try:
            return await self._take(job.job_id, digest, scope)
        except (RedisError, OSError) as exc:  # the cache is an optimisation: run without it
            log.warning("cache unavailable; running the job", error=repr(exc))
            metrics.CACHE.labels("error").inc()
            return None

    async def _take(self, job_id: str, digest: str, scope: str) -> Hit | None:
        self._looking[digest] = self._looking.get(digest, 0) + 1
        try:
            return await self._look(job_id, digest, scope)
        finally:
            self._looking[digest] -= 1
            if not self._looking[digest]:  # nobody here waits for it: no event kept
                del self._looking[digest]
                self._wakers.pop(digest, None)

    async def _look(self, job_id: str, digest: str, scope: str) -> Hit | None:
        waited = False
        while True:
            # The event exists before the look, so a wake-up during it is not lost.
            woken = self._wakers.setdefault(digest, asyncio.Event())
            taken = await self.store.take(digest, job_id)
            if isinstance(taken, Hit):
                metrics.CACHE.labels("coalesced" if waited else "hit").inc()
                return taken
            if not isinstance(taken, Wait):
                self._held[job_id] = _Ticket(digest, scope, lead=True)
                metrics.CACHE.labels("miss").inc()
                return None
            waited = True
            wait_s = min(max(taken.lead_until - time.time(), 0.0) + 0.05, RECHECK_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await woken.wait()

    async def settle(self, result: Result, wrote: bool) -> None:
        """After the job's terminal write: its answer into the entry (a success this job
        wrote), else its lead dropped; waiters here look again either way."""
        ticket = self._held.pop(result.job_id, None)
        if ticket is None:
            return
        try:
            if wrote and result.state is JobState.SUCCEEDED and not result.cached:
                answer = Answer(result.text, result.parsed, result.finish_reason, result.usage, result.model)
                await self.store.put(ticket.digest, ticket.scope, result.job_id, answer)
            elif ticket.lead:
                await self.store.drop(ticket.digest, result.job_id)
        except (RedisError, OSError) as exc:  # the lead runs out by itself; the job has ended
            log.warning("cache write failed", error=repr(exc))
        self._wake(ticket.digest)

    def forget(self, job_id: str) -> None:
        """The job's handling ended without `settle` (cancelled, handed back, an error):
        drop its lead now rather than when it runs out."""
        ticket = self._held.pop(job_id, None)
        if ticket is None or not ticket.lead:
            return
        task = asyncio.create_task(self._drop(ticket.digest, job_id))
        self._dropping.add(task)
        task.add_done_callback(self._dropping.discard)

    async def _drop(self, digest: str, job_id: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.store.drop(digest, job_id)
        self._wake(digest)

    def _wake(self, digest: str) -> None:
        woken = self._wakers.pop(digest, None)
        if woken is not None:
            woken.set()

    async def _renew(self) -> None:
        """Keep the leads of jobs running here, as their leases are kept."""
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            leads = [(t.digest, job_id) for job_id, t in self._held.items() if t.lead]
            try:
                await self.store.renew(leads)
            except (RedisError, OSError) as exc:
                log.warning("cache lead renewal failed; retrying", error=repr(exc))

    async def _listen(self) -> None:
        """Wake-ups for jobs waiting on leaders of other workers (cache_put/drop publish the
        entry digest when someone waits)."""
        await follow(self.store.redis, keys.CACHE_CHANNEL, self._wake, "cache listener")


def cached_result(hit: Hit, now: float) -> dict[str, Any]:
    """The Result fields a cache hit gives a job (the rest are the job's own)."""
    a = hit.answer
    return {
        "text": a.text,
        "parsed": a.parsed,
        "finish_reason": a.finish_reason,
        "usage": a.usage,
        "cached": True,
        "cache_age_s": round(max(now - hit.at, 0.0), 3),
        "cache_source": hit.source,
    }
