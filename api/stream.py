"""`stream: true` for POST /v1/chat/completions: OpenAI's server-sent events
(`chat.completion.chunk` objects, then `data: [DONE]`).

The job runs as any online job and its text is sent as chunks once it ended: the workers
keep no token stream to forward yet, so the first token comes with the last. What
streaming gives a client now: the SDK's streaming code works unchanged, a comment line
every `KEEPALIVE_S` keeps proxies from closing an idle connection, and a client that
disconnects cancels its job. A failure after the stream began is an `error` event (the
SDK raises it as APIError).
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from vlmq.api.online import Online, Streaming, failure
from vlmq.producer.bulk import chat_completion
from vlmq.schemas.job import Job, Result

KEEPALIVE_S = 10.0
_PIECES = re.compile(r"\S*\s*")  # a word and the space after it: one chunk each


def sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


class EventStream(StreamingResponse):
    """The stream of one submitted job. However the response ends (sent, failed, or never
    started because the client left), the job's slot and this replica's place are given
    back; a client gone before the answer cancels the job (nobody would read it)."""

    def __init__(self, online: Online, job: Job, how: Streaming) -> None:
        self.online, self.job, self.how = online, job, how
        self.answered = False
        super().__init__(self.events(), media_type="text/event-stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # runs even while being cancelled
                try:
                    await self.online.finish(self.job.job_id, cancel=not self.answered)
                finally:
                    self.online.leave()

    async def events(self) -> AsyncIterator[bytes]:
        result: Result | None = None
        deadline = time.monotonic() + self.online.s.online_timeout_s
        while result is None and (left := deadline - time.monotonic()) > 0:
            result = await self.online.wait(self.job.job_id, min(KEEPALIVE_S, left))
            if result is None:
                yield b": keepalive\n\n"  # a comment line: clients skip it
        self.answered = result is not None
        if (why := failure(result, self.online.s.online_timeout_s)) is not None:
            error = {"message": why.message, "type": why.kind, "param": why.param, "code": why.code}
            yield sse({"error": error})
        else:
            assert result is not None
            for chunk in chunks(result, self.how.include_usage):
                yield sse(chunk)
        yield b"data: [DONE]\n\n"


def chunks(result: Result, include_usage: bool) -> list[dict[str, Any]]:
    """The ChatCompletion of a succeeded job as chunks: the role, the text a word at a
    time, the finish reason; then the usage when asked (OpenAI's include_usage)."""
    whole = chat_completion(result)
    head = {k: whole[k] for k in ("id", "created", "model", "system_fingerprint")}
    head["object"] = "chat.completion.chunk"
    extra = {"usage": None} if include_usage else {}

    def one(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice], **extra}

    out = [one({"role": "assistant", "content": ""})]
    out += [one({"content": piece}) for piece in _PIECES.findall(result.text or "") if piece]
    out.append(one({}, whole["choices"][0]["finish_reason"]))
    if include_usage:
        out.append({**head, "choices": [], "usage": whole["usage"]})
    return out
