"""Any OpenAI-compatible `/v1/chat/completions` server (vllm serve, lmdeploy serve
api_server, GPUStack, llama-box with GGUF Qwen2-VL, ...).

Images go as base64 data URLs (the worker already fetched and resized them, so the server
never reaches into your storage). Concurrency is bounded (`max_concurrency`), 429 and 5xx
are retried with backoff, and abort cancels the HTTP request. Options: `base_url`,
`api_key`, `max_concurrency`, `timeout_s`, `retries`, `served_model` (the server's model
name, default the worker's model).
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from vlmq.schemas.errors import ErrorCode, VlmqError
from vlmq.schemas.job import ChoiceFormat, JsonSchemaFormat, RegexFormat
from vlmq.worker.engines.base import EngineOutput, EngineRequest
from vlmq.worker.engines.mapping import openai_messages


class _Retryable(Exception):
    pass


class OpenAIEngine:
    name = "openai"

    def __init__(self, model: str, *, base_url: str = "http://127.0.0.1:8000/v1", api_key: str = "",
                 max_concurrency: int = 64, timeout_s: float = 600.0, retries: int = 4,
                 served_model: str | None = None, image_factor: int = 28) -> None:
        self.model = model
        self.served_model = served_model or model
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.retries = retries
        self.image_factor = image_factor
        self._slots = asyncio.Semaphore(max_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[str, asyncio.Task[EngineOutput]] = {}

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._session = aiohttp.ClientSession(headers=headers, timeout=self.timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def healthy(self) -> bool:
        return self._session is not None and not self._session.closed

    def stats(self) -> dict[str, Any]:
        return {"running": len(self._tasks)}

    def body(self, request: EngineRequest) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.served_model,
            "messages": openai_messages(request.messages, [_data_url(i) for i in request.images]),
            "max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
        }
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        if s.top_k is not None:
            body["top_k"] = s.top_k
        if s.repetition_penalty != 1.0:
            body["repetition_penalty"] = s.repetition_penalty
        fmt = request.response_format
        if isinstance(fmt, JsonSchemaFormat):
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "vlmq", "schema": fmt.schema}}
        elif isinstance(fmt, ChoiceFormat):  # vLLM's extension; servers without it refuse
            body["structured_outputs"] = {"choice": list(fmt.choices)}
        elif isinstance(fmt, RegexFormat):
            body["structured_outputs"] = {"regex": fmt.pattern}
        return body

    async def generate(self, request: EngineRequest) -> EngineOutput:
        task = asyncio.ensure_future(self._call(request))
        self._tasks[request.request_id] = task
        try:
            return await task
        finally:
            self._tasks.pop(request.request_id, None)

    async def _call(self, request: EngineRequest) -> EngineOutput:
        body = self.body(request)
        async with self._slots:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(lambda e: isinstance(e, _Retryable)),
                wait=wait_exponential_jitter(initial=0.5, max=10), stop=stop_after_attempt(self.retries),
                reraise=True,
            ):
                with attempt:
                    return await self._post(body)
        raise AssertionError("unreachable")

    async def _post(self, body: dict[str, Any]) -> EngineOutput:
        assert self._session is not None, "start() first"
        t0 = time.perf_counter()
        try:
            async with self._session.post(f"{self.base_url}/chat/completions", json=body) as resp:
                if resp.status == 429 or resp.status >= 500:
                    raise _Retryable(f"HTTP {resp.status}")
                data = await resp.json(content_type=None)
                if resp.status >= 400:
                    raise _client_error(resp.status, data)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise _Retryable(repr(exc)) from None
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return EngineOutput(
            text=choice["message"].get("content") or "", finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            ttft_s=time.perf_counter() - t0,  # not streamed: the whole answer's latency
        )

    async def abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None and not task.done():
            task.cancel()  # closes the HTTP request; the server aborts the generation


def _client_error(status: int, data: Any) -> VlmqError:
    message = str(data.get("error", data) if isinstance(data, dict) else data)[:500]
    lowered = message.lower()
    if "maximum context length" in lowered or "too long" in lowered or "max_model_len" in lowered:
        return VlmqError(ErrorCode.PROMPT_TOO_LONG, message)
    if status == 404 or ("model" in lowered and "not found" in lowered):
        return VlmqError(ErrorCode.UNKNOWN_MODEL, message)
    return VlmqError(ErrorCode.ENGINE_ERROR, f"HTTP {status}: {message}")


def _data_url(image: Any) -> str:
    # JPEG cannot hold alpha; such images go as PNG, and say so.
    fmt = "PNG" if image.mode == "RGBA" else "JPEG"
    buf = io.BytesIO()
    image.save(buf, fmt, quality=95)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()
