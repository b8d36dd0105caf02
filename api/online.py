"""POST /v1/chat/completions without streaming: the request becomes one online job (engine
priority 0, ahead of every batch request), submitted and waited for. When more online
requests wait than `online_max_queued` (over all replicas), the answer is 429 with
Retry-After at once: a client backs off instead of piling onto a full queue."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import msgspec

from vlmq.api.records import Records
from vlmq.api.settings import ApiSettings
from vlmq.producer.builders import with_tenant
from vlmq.producer.bulk import OpenAIReader, chat_completion, http_error, public
from vlmq.producer.client import Client
from vlmq.schemas.job import Job, JobState

RETRY_AFTER_S = 1


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


async def complete(
    body: bytes, settings: ApiSettings, records: Records, client: Client, *, tenant: str | None = None
) -> dict[str, Any]:
    """Run one chat completion through the queue; its ChatCompletion object, or Failure.
    `tenant`: the API key's, recorded on the job (the result cache's scope)."""
    job = with_tenant(online_job(body, settings), tenant)
    give_up = time.time() + settings.online_timeout_s
    if not await records.admit_online(job.job_id, give_up, settings.online_max_queued):
        raise Failure(
            429,
            f"more than {settings.online_max_queued} requests are waiting: retry after {RETRY_AFTER_S} s",
            "rate_limit_error",
            "queue_full",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    try:
        await client.submit(job)
        result = await client.store.wait(job.job_id, settings.online_timeout_s)
    finally:
        await records.online_done(job.job_id)
    if result is None:
        await client.cancel(job.job_id)
        raise Failure(504, f"no answer within {settings.online_timeout_s} s", "server_error", "timeout")
    if result.state is JobState.SUCCEEDED:
        return chat_completion(result)
    if result.error is None:
        raise Failure(503, f"the request ended {result.state.value}", "server_error", result.state.value)
    status, kind, code = http_error(result.error.code)
    raise Failure(status, public(result.error.message), kind, code)
