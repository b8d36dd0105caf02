"""Any OpenAI-compatible `/v1/chat/completions` server (vllm serve, lmdeploy serve
api_server, GPUStack, llama-box with GGUF Qwen2-VL, ...).

Images go as base64 data URLs (the worker already fetched and resized them, so the server
never reaches into your storage). Concurrency is bounded (`max_concurrency`), 429 and 5xx
are retried with backoff, and abort cancels the HTTP request. Options: `base_url`,
`api_key`, `max_concurrency`, `timeout_s`, `retries`, `served_model` (the server's model
name, default the worker's model), `start_timeout_s` (how long start waits for the server
to answer before the worker stops with exit 3, never joining its group), `structured`
(`vllm`: choice and regex as vLLM's `structured_outputs`; `llama.cpp`: a choice as a GBNF
grammar, for llama-server and llama-box).
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from typing import Any

import aiohttp

from vlmq.core.retry import CredentialsRefused, InfrastructureError, retry
from vlmq.worker.embeds import EmbedSpec
from vlmq.worker.engines.base import EngineConfigError, EngineOutput, EngineRequest
from vlmq.worker.engines.mapping import http_error, openai_body
from vlmq.worker.video import Video, encode_mp4


class _Retryable(Exception):
    pass


class OpenAIEngine:
    name = "openai"
    embeds: EmbedSpec | None = None
    takes_video = True

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "http://127.0.0.1:8000/v1",
        api_key: str = "",
        max_concurrency: int = 64,
        timeout_s: float = 600.0,
        retries: int = 4,
        served_model: str | None = None,
        structured: str = "vllm",
        image_factor: int = 28,
        start_timeout_s: float = 30.0,
    ) -> None:
        if structured not in ("vllm", "llama.cpp"):
            raise EngineConfigError(f"structured must be vllm or llama.cpp, not {structured!r}")
        self.model = model
        self.structured = structured
        self.served_model = served_model or model
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.retries = retries
        self.image_factor = image_factor
        self.start_timeout_s = start_timeout_s
        self._slots = asyncio.Semaphore(max_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[str, asyncio.Task[EngineOutput]] = {}

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._session = aiohttp.ClientSession(headers=headers, timeout=self.timeout)
        await self._reach()

    async def _reach(self) -> None:
        """Before the worker takes partitions: a server that never answers would fail every
        job it is given. Any HTTP answer will do (some servers have no /models); a refused
        key is said as such."""
        assert self._session is not None
        url = f"{self.base_url}/models"

        async def get() -> int:
            assert self._session is not None
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return resp.status

        try:
            status = await retry(
                get,
                on=(TimeoutError, aiohttp.ClientError),
                seconds=self.start_timeout_s,
                max_wait=2.0,
                quiet=True,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            await self.close()
            why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise InfrastructureError(
                f"cannot reach the OpenAI-compatible server at base_url {self.base_url} ({why}): "
                "start it, or point the worker at it with -e base_url=http://HOST:PORT/v1"
            ) from None
        if status in (401, 403):
            await self.close()
            raise CredentialsRefused(
                f"the OpenAI-compatible server at base_url {self.base_url} refused the key "
                f"(HTTP {status}): give it with -e api_key=..."
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def renderer(self) -> None:
        return None  # takes decoded images

    def healthy(self) -> bool:
        return self._session is not None and not self._session.closed

    def stats(self) -> dict[str, Any]:
        return {"running": len(self._tasks)}

    async def body(self, request: EngineRequest) -> dict[str, Any]:
        # Encoding images (videos) costs milliseconds each: off the event loop.
        urls = await asyncio.to_thread(lambda: [_data_url(i) for i in request.images])
        videos = await asyncio.to_thread(lambda: [_video_url(v) for v in request.videos])
        return openai_body(request, urls, self.served_model, videos, self.structured)

    async def generate(self, request: EngineRequest) -> EngineOutput:
        task = asyncio.ensure_future(self._call(request))
        self._tasks[request.request_id] = task
        try:
            return await task
        finally:
            self._tasks.pop(request.request_id, None)

    async def _call(self, request: EngineRequest) -> EngineOutput:
        body = await self.body(request)
        async with self._slots:
            return await retry(
                lambda: self._post(body), on=_Retryable, attempts=self.retries, initial=0.5, max_wait=10.0
            )

    async def _post(self, body: dict[str, Any]) -> EngineOutput:
        assert self._session is not None, "start() first"
        t0 = time.perf_counter()
        try:
            async with self._session.post(f"{self.base_url}/chat/completions", json=body) as resp:
                if resp.status == 429 or resp.status >= 500:
                    raise _Retryable(f"HTTP {resp.status}")
                data = await resp.json(content_type=None)
                if resp.status >= 400:
                    raise http_error(resp.status, _message(data))
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            raise _Retryable(repr(exc)) from None
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return EngineOutput(
            text=choice["message"].get("content") or "",
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            ttft_s=time.perf_counter() - t0,  # not streamed: the whole answer's latency
        )

    async def abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None and not task.done():
            task.cancel()  # closes the HTTP request; the server aborts the generation


def _message(data: Any) -> str:
    return str(data.get("error", data) if isinstance(data, dict) else data)[:500]


def _video_url(video: Video) -> str:
    """The sampled frames, as an mp4 that plays them at the rate they were sampled: the
    server sees the frames this worker chose (and its caps held), not the whole source."""
    return "data:video/mp4;base64," + base64.b64encode(encode_mp4(video)).decode()


def _data_url(image: Any) -> str:
    # JPEG cannot hold alpha; such images go as PNG, and say so.
    fmt = "PNG" if image.mode == "RGBA" else "JPEG"
    buf = io.BytesIO()
    image.save(buf, fmt, quality=95)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()
