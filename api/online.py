"""POST /v1/chat/completions without streaming: the request becomes one online job (engine
priority 0, ahead of every batch request), submitted and waited for. When more online
requests wait than `online_max_queued` (over all replicas), the answer is 429 with
Retry-After at once: a client backs off instead of piling onto a full queue."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import msgspec
import structlog

from vlmq.api.records import Records
from vlmq.api.settings import ApiSettings
from vlmq.api.waiters import Waiters
from vlmq.producer.builders import with_tenant
from vlmq.producer.bulk import OpenAIReader, chat_completion, http_error, public, unsupported_parameter
from vlmq.producer.client import Client
from vlmq.schemas.errors import ErrorCode
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


class Streaming(msgspec.Struct, frozen=True):
    include_usage: bool = False


def online_job(body: bytes, settings: ApiSettings) -> tuple[Job, Streaming | None]:
    """The request body as a job and how to stream it (None: not streamed), or Failure
    (400: what is wrong, naming the parameter; 404: unknown model)."""
    try:
        row = json.loads(body)
    except ValueError as exc:
        raise Failure(400, f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise Failure(400, "the body is nested too deeply") from None
    if not isinstance(row, dict):
        raise Failure(400, "the body must be a JSON object")
    streaming = _streaming(row)
    if (param := unsupported_parameter(row)) is not None:
        raise Failure(400, f"{param} is not supported here", code="unsupported_parameter", param=param)
    if row.get("n", 1) != 1:
        raise Failure(400, "n must be 1 (one choice per request)", code="unsupported_parameter", param="n")
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
    job = msgspec.structs.replace(
        item,
        job_id=job_id,
        batch_id=None,
        model=served,
        priority=0,
        deadline=time.time() + settings.online_timeout_s,
    )
    return job, streaming


def _streaming(row: dict[str, Any]) -> Streaming | None:
    """Take `stream` and `stream_options` out of the body (the job does not carry them)."""
    stream, options = row.pop("stream", None), row.pop("stream_options", None)
    if stream not in (None, True, False):
        raise Failure(400, "stream must be a boolean", param="stream")
    if options is not None and not stream:
        raise Failure(400, "stream_options is only allowed when stream is true", param="stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise Failure(400, "stream_options may hold include_usage only", param="stream_options")
    return Streaming(bool((options or {}).get("include_usage"))) if stream else None


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
        self._releasing: set[asyncio.Task[None]] = set()  # `release`s under way (kept from the GC)

    def enter(self) -> None:
        """A place among this process's online requests, or 429 at once (before the key is
        looked up or Redis asked: also when this replica's own requests hold every slot of
        the fleet); `leave` gives it back."""
        if self.inside >= self.s.online_max_waiting:
            raise busy(f"this replica holds {self.s.online_max_waiting} online requests", "replica_full")
        if len(self.held) >= self.s.online_max_queued:  # this replica's slots alone fill the fleet's
            raise busy(f"more than {self.s.online_max_queued} requests are waiting", "queue_full")
        self.inside += 1

    def leave(self) -> None:
        self.inside -= 1

    async def start(self, body: bytes, tenant: str) -> tuple[Job, Streaming | None]:
        """Check the body, take a fleet-wide slot and submit the job (its answer is then
        awaited with `finish`, which gives the slot back). Failure before anything is held.
        `tenant`: the API key's, recorded on the job (the result cache's scope)."""
        job, streaming = online_job(body, self.s)
        job = with_tenant(job, tenant)
        async with self.gate:
            admitted = await self.records.admit_online(
                self.s.replica_id, job.job_id, self.s.online_lease_s, self.s.online_max_queued
            )
        if not admitted:
            raise busy(f"more than {self.s.online_max_queued} requests are waiting", "queue_full")
        self.held.add(job.job_id)
        try:
            await self.waiters.watch(job.job_id)  # before the submit: its end cannot be missed
            async with self.gate:
                await self.client.submit(job)
        except BaseException:
            await self.finish(job.job_id)
            raise
        return job, streaming

    async def wait(self, job_id: str, timeout: float) -> Result | None:
        return await self.waiters.wait(job_id, timeout)

    async def finish(self, job_id: str, cancel: bool = False) -> None:
        """Stop waiting for a job and give its slot back; `cancel`: ask the workers to
        stop it too (nobody will read its answer)."""
        self.held.discard(job_id)
        await self.waiters.forget(job_id)
        async with self.gate:
            if cancel:
                await self.client.cancel(job_id)
            await self.records.online_done(self.s.replica_id, job_id)

    def release(self, job_id: str) -> None:
        """`finish` for an answered job, run beside its response: the slot's Redis round
        trip is not on the request's path. Should it fail, the slot is no longer renewed
        and frees itself within `online_lease_s`."""
        task = asyncio.create_task(self.finish(job_id))
        self._releasing.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("online slot not released; its lease frees it", error=f"{type(exc).__name__}: {exc}")

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


def busy(why: str, code: str) -> Failure:
    return Failure(
        429,
        f"{why}: retry after {RETRY_AFTER_S} s",
        "rate_limit_error",
        code,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


# A job's failure codes that are the request's own end, already retried by the worker as
# far as its policy goes: answered 422, which the SDKs do not retry (they retry 408, 409,
# 429 and every 5xx: a 500 made one call three jobs).
NOT_RETRIED = {ErrorCode.ENGINE_ERROR, ErrorCode.POISON}


def failure(result: Result | None, timeout_s: float) -> Failure | None:
    """Why a job's end is no ChatCompletion (None: it succeeded)."""
    if result is None:
        return Failure(504, f"no answer within {timeout_s} s", "server_error", "timeout")
    if result.state is JobState.SUCCEEDED:
        return None
    if result.error is None:
        return Failure(503, f"the request ended {result.state.value}", "server_error", result.state.value)
    status, kind, code = http_error(result.error.code)
    if result.error.code not in NOT_RETRIED:
        return Failure(status, public(result.error.message), kind, code)
    # x-should-retry: the SDKs' own word for "do not retry", besides the status.
    return Failure(
        422, public(result.error.message), "invalid_request_error", code, headers={"x-should-retry": "false"}
    )


def answer(result: Result | None, timeout_s: float) -> dict[str, Any]:
    """A job's end as a ChatCompletion, or the Failure that says why there is none."""
    if (why := failure(result, timeout_s)) is not None:
        raise why
    assert result is not None
    return chat_completion(result)
