"""POST /v1/chat/completions without streaming: the request becomes one online job (engine
priority 0, ahead of every batch request), submitted and waited for. When more online
requests wait than `online_max_queued` (over all replicas), the answer is 429 with
Retry-After at once: a client backs off instead of piling onto a full queue."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import structlog

from vlmq.api.records import Records
from vlmq.api.settings import ApiSettings
from vlmq.api.waiters import Waiters
from vlmq.producer.bulk import OpenAIReader, chat_completion, http_error, public
from vlmq.producer.client import Client
from vlmq.schemas.job import Job, JobState, Result

RETRY_AFTER_S = 1
log = structlog.get_logger("vlmq.api")


class Failure(Exception):
    """An OpenAI-style error answer: HTTP status, message, type, code, param."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}


def online_job(body: bytes, settings: ApiSettings) -> Job:
    """The request body as a job, or Failure (400: what is wrong; 404: unknown model)."""
    try:
        row = json.loads(body)
    except ValueError as exc:
        raise Failure(400, f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise Failure(400, "the body is nested too deeply") from None
    if not isinstance(row, dict):
        raise Failure(400, "the body must be a JSON object")
    job_id = f"chat-{uuid.uuid4().hex}"
    line = {"custom_id": job_id, "method": "POST", "url": "/v1/chat/completions", "body": row}
    try:  # a body just under the parser's depth is deeper than that once wrapped in `line`
        text = json.dumps(line)
    except RecursionError:
        raise Failure(400, "the body is nested too deeply") from None
    item = OpenAIReader("online", allow_https=settings.allow_https).line(1, text)
    if not isinstance(item, Job):
        reason = item.reason if item else "empty body"
        raise Failure(400, reason, code=item.code if item else None)
    served = settings.served(item.model)
    if served is None:
        raise Failure(404, f"the model {json.dumps(item.model)} does not exist here", code="model_not_found")
    return msgspec.structs.replace(
        item,
        job_id=job_id,
        batch_id=None,
        model=served,
        priority=0,
        deadline=time.time() + settings.online_timeout_s,
    )


class Online:
    """The online door of one process: a local bound on waiting requests (answered 429
    before the body is read or Redis is asked), a bound on the pool connections they use at
    once (`online_redis_share`: the rest stays for /healthz, the batch driver and the
    dashboard), the fleet-wide admission (`online_max_queued`), and the shared waiters."""

    def __init__(self, settings: ApiSettings, records: Records, client: Client) -> None:
        self.s, self.records, self.client = settings, records, client
        self.waiters = Waiters(client.redis, client.store)
        self.gate = asyncio.Semaphore(settings.online_redis_share())
        self.inside = 0  # requests of this process between arrival and answer
        self.held: set[str] = set()  # job ids holding a fleet-wide slot (leases to renew)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """A place among this process's online requests, or 429 at once."""
        if self.inside >= self.s.online_max_waiting:
            raise busy(f"this replica holds {self.s.online_max_waiting} online requests", "replica_full")
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1

    async def complete(self, body: bytes) -> dict[str, Any]:
        """Run one chat completion through the queue; its ChatCompletion object, or Failure."""
        job = online_job(body, self.s)
        me, lease = self.s.replica_id, self.s.online_lease_s
        async with self.gate:
            if not await self.records.admit_online(me, job.job_id, lease, self.s.online_max_queued):
                raise busy(f"more than {self.s.online_max_queued} requests are waiting", "queue_full")
        self.held.add(job.job_id)
        try:
            result = await self._run(job)
        finally:
            self.held.discard(job.job_id)
            async with self.gate:
                await self.records.online_done(me, job.job_id)
        return answer(result, self.s.online_timeout_s)

    async def renew(self) -> None:
        """Forever: renew this replica's slots every third of their lease, so they outlive
        their requests only when the replica died."""
        while True:
            await asyncio.sleep(self.s.online_lease_s / 3)
            try:
                async with self.gate:
                    await self.records.renew_online(self.s.replica_id, list(self.held), self.s.online_lease_s)
            except Exception as exc:  # Redis away: the next round tries again
                log.warning("online leases not renewed", error=f"{type(exc).__name__}: {exc}")

    async def _run(self, job: Job) -> Result | None:
        await self.waiters.watch(job.job_id)
        try:
            async with self.gate:
                await self.client.submit(job)
            result = await self.waiters.wait(job.job_id, self.s.online_timeout_s)
            if result is None:
                async with self.gate:
                    await self.client.cancel(job.job_id)
            return result
        finally:
            await self.waiters.forget(job.job_id)


def busy(why: str, code: str) -> Failure:
    return Failure(
        429,
        f"{why}: retry after {RETRY_AFTER_S} s",
        "rate_limit_error",
        code,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def answer(result: Result | None, timeout_s: float) -> dict[str, Any]:
    """A job's end as a ChatCompletion, or the Failure that says why there is none."""
    if result is None:
        raise Failure(504, f"no answer within {timeout_s} s", "server_error", "timeout")
    if result.state is JobState.SUCCEEDED:
        return chat_completion(result)
    if result.error is None:
        raise Failure(503, f"the request ended {result.state.value}", "server_error", result.state.value)
    status, kind, code = http_error(result.error.code)
    raise Failure(status, public(result.error.message), kind, code)
