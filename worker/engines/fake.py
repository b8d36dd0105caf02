"""A deterministic engine that really batches: for tests and plumbing benchmarks.

It schedules like a continuously batching engine: up to `max_num_seqs` sequences run
together; each step takes `step_ms` and gives every running sequence one token; a request
waits (by priority, then arrival) while the batch is full. The answer is a pure function
of the prompt and the pixels (`answer`), so tests can check every result.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import os
import signal
import time
from typing import Any

from vlmq.schemas.errors import ErrorCode, VlmqError
from vlmq.schemas.job import ChoiceFormat, JsonSchemaFormat, Message, TextPart
from vlmq.worker.embeds import EmbedSpec
from vlmq.worker.engines.base import EngineOutput, EngineRequest


def fingerprint(messages: list[Message], images: list[Any], embeds: list[bytes] | None = None) -> str:
    """Hash of every text part, every image's size and pixels (an 8x8 thumbnail) and every
    embeddings file."""
    h = hashlib.blake2b(digest_size=8)
    for data in embeds or []:
        h.update(data)
    for m in messages:
        for p in m.parts:
            if isinstance(p, TextPart):
                h.update(p.text.encode())
    for img in images:
        h.update(f"{img.size}".encode())
        h.update(img.resize((8, 8)).tobytes())
    return h.hexdigest()


def _pictures(request: EngineRequest) -> list[Any]:
    """The images, then every video's frames: all the model would see (embeddings: below)."""
    return [*request.images, *(f for v in request.videos for f in v.frames)]


def _says(request: EngineRequest, text: str) -> bool:
    return any(text in p.text for m in request.messages for p in m.parts if isinstance(p, TextPart))


def answer(request: EngineRequest) -> str:
    """The fake engine's text for a request: what tests expect."""
    fp = fingerprint(request.messages, _pictures(request), [e.data for e in request.embeds])
    fmt = request.response_format
    if isinstance(fmt, ChoiceFormat):
        return fmt.choices[int(fp, 16) % len(fmt.choices)]
    if isinstance(fmt, JsonSchemaFormat):
        import json

        return json.dumps(_example(fmt.schema, fp))
    return f"fake:{fp}"


def _example(schema: dict[str, Any], fp: str) -> Any:
    """A value valid for simple JSON schemas (objects, enums, strings, numbers, booleans)."""
    if "enum" in schema:
        return schema["enum"][int(fp, 16) % len(schema["enum"])]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: _example(v, fp) for k, v in props.items()}
    if kind == "array":
        return [_example(schema.get("items", {}), fp)]
    return {"boolean": False, "integer": 0, "number": 0.0, "null": None}.get(str(kind), fp)


class _Seq:
    __slots__ = ("done", "left", "request", "t0", "ttft")

    def __init__(self, request: EngineRequest, tokens: int) -> None:
        self.request = request
        self.left = tokens
        self.done: asyncio.Future[EngineOutput] = asyncio.get_running_loop().create_future()
        self.t0 = time.perf_counter()
        self.ttft: float | None = None


class FakeEngine:
    name = "fake"
    embeds: EmbedSpec | None = None
    takes_video = True

    def __init__(
        self,
        model: str = "fake",
        *,
        step_ms: float = 0.0,
        max_num_seqs: int = 64,
        completion_tokens: int = 16,
        max_model_len: int = 32_768,
        image_factor: int = 28,
        fail_on: str | None = None,
        crash_on: str | None = None,
        enable_mm_embeds: bool = False,
        hidden_size: int = 64,
    ) -> None:
        self.model = model
        # vLLM's opt-in; embeddings are checked as for a Qwen-VL model of this hidden size.
        self.embeds = EmbedSpec(hidden_size, merge_size=2) if enable_mm_embeds else None
        self.step_s = step_ms / 1000
        self.max_num_seqs = max_num_seqs
        self.completion_tokens = completion_tokens
        self.max_model_len = max_model_len
        self.image_factor = image_factor
        self.fail_on = fail_on  # a prompt containing this raises ENGINE_ERROR (tests)
        self.crash_on = crash_on  # a prompt containing this kills the process, as an OOM would
        self._waiting: list[tuple[int, int, _Seq]] = []
        self._running: dict[str, _Seq] = {}
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self.max_batch_seen = 0
        self.steps = 0

    async def start(self) -> None:
        if self.step_s > 0:
            self._loop_task = asyncio.create_task(self._schedule())

    async def close(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
        for _, _, seq in self._waiting:
            seq.done.cancel()
        for seq in self._running.values():
            seq.done.cancel()

    def renderer(self) -> None:
        return None  # takes decoded images

    def healthy(self) -> bool:
        return self._loop_task is None or not self._loop_task.done()

    def stats(self) -> dict[str, Any]:
        return {
            "running": len(self._running),
            "waiting": len(self._waiting),
            "max_batch_seen": self.max_batch_seen,
            "steps": self.steps,
        }

    def _prompt_tokens(self, request: EngineRequest) -> tuple[int, int]:
        text = sum(len(p.text) for m in request.messages for p in m.parts if isinstance(p, TextPart))
        per = self.image_factor * self.image_factor
        images = sum(img.size[0] * img.size[1] // per for img in _pictures(request))
        images += sum(e.tokens for e in request.embeds)
        return text // 4 + images + 8, images

    async def generate(self, request: EngineRequest) -> EngineOutput:
        prompt, image_tokens = self._prompt_tokens(request)
        if prompt + request.sampling.max_tokens > self.max_model_len:
            raise VlmqError(
                ErrorCode.PROMPT_TOO_LONG,
                f"{prompt} prompt tokens + max_tokens {request.sampling.max_tokens}"
                f" exceed max_model_len {self.max_model_len}",
            )
        if self.fail_on and _says(request, self.fail_on):
            raise VlmqError(ErrorCode.ENGINE_ERROR, "fake engine failure (fail_on matched)")
        if self.crash_on and _says(request, self.crash_on):
            os.kill(os.getpid(), signal.SIGKILL)
        tokens = min(self.completion_tokens, request.sampling.max_tokens)
        if self._loop_task is None:  # zero latency: answer at once (plumbing benchmarks)
            return self._output(request, prompt, image_tokens, tokens, 0.0)
        seq = _Seq(request, tokens)
        heapq.heappush(self._waiting, (request.priority, next(self._order), seq))
        self._wake.set()
        try:
            out = await seq.done
        finally:
            self._drop(request.request_id)
        out.prompt_tokens, out.image_tokens = prompt, image_tokens
        return out

    def _output(
        self, request: EngineRequest, prompt: int, images: int, tokens: int, ttft: float | None
    ) -> EngineOutput:
        return EngineOutput(
            text=answer(request),
            finish_reason="length",
            prompt_tokens=prompt,
            completion_tokens=tokens,
            image_tokens=images,
            ttft_s=ttft,
        )

    async def abort(self, request_id: str) -> None:
        self._drop(request_id)

    def _drop(self, request_id: str) -> None:
        seq = self._running.pop(request_id, None)
        if seq and not seq.done.done():
            seq.done.cancel()
        kept = [w for w in self._waiting if w[2].request.request_id != request_id]
        if len(kept) != len(self._waiting):
            for w in self._waiting:
                if w[2].request.request_id == request_id and not w[2].done.done():
                    w[2].done.cancel()
            self._waiting = kept
            heapq.heapify(self._waiting)

    async def _schedule(self) -> None:
        # Steps keep to their own clock (step k ends at start + k * step_s), as a real
        # engine's do in its own process: a late wake-up of this event loop (a busy worker)
        # does not add up over a request's steps.
        step_end = time.perf_counter()
        while True:
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                step_end = time.perf_counter()  # idle until now: the next step starts now
            while self._waiting and len(self._running) < self.max_num_seqs:
                _, _, seq = heapq.heappop(self._waiting)
                if not seq.done.done():
                    self._running[seq.request.request_id] = seq
            self.max_batch_seen = max(self.max_batch_seen, len(self._running))
            step_end += self.step_s
            await asyncio.sleep(max(0.0, step_end - time.perf_counter()))
            self.steps += 1
            self._step()

    def _step(self) -> None:
        now = time.perf_counter()
        for rid, seq in list(self._running.items()):
            if seq.ttft is None:
                seq.ttft = now - seq.t0
            seq.left -= 1
            if seq.left <= 0:
                del self._running[rid]
                if not seq.done.done():
                    tokens = min(self.completion_tokens, seq.request.sampling.max_tokens)
                    seq.done.set_result(self._output(seq.request, 0, 0, tokens, seq.ttft))
