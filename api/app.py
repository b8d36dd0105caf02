"""The HTTP routes: OpenAI's Files, Batches, Models and chat completions.

FastAPI (on Starlette and uvicorn) because the request body is a stream we can read
ourselves (uploads go to S3 as they arrive), dependencies carry the tenant, and it is what
OpenAI-compatible servers (vLLM's among them) are built on. Bodies are msgspec Structs,
decoded and encoded by msgspec like every other vlmq object; pydantic is not involved.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import msgspec
import structlog
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.telemetry import TelemetryConfig
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmq.api.dashboard.views import Dashboard, mount, page
from vlmq.api.driver import Driver, file_key, live_counts
from vlmq.api.objects import (
    ENDPOINTS,
    TERMINAL,
    WINDOW,
    ApiError,
    Batch,
    BatchCreate,
    ErrorBody,
    FileDeleted,
    FileObject,
)
from vlmq.api.online import Failure, Online, answer
from vlmq.api.records import Records, Tenant, new_id
from vlmq.api.settings import ApiSettings
from vlmq.api.storage import Storage
from vlmq.api.stream import EventStream
from vlmq.api.upload import Refused, receive
from vlmq.core import tracing
from vlmq.core.retry import REDIS_FAILOVER
from vlmq.producer.client import Client
from vlmq.producer.errors import Unavailable

log = structlog.get_logger("vlmq.api")


class Ctx:
    """What every route needs; built at start-up, one per process."""

    def __init__(self, settings: ApiSettings) -> None:
        self.s = settings
        # Blocking on a full pool is never an outage: callers are bounded (api/online.py).
        self.client = Client(
            settings=settings,
            redis_options={"max_connections": settings.redis_max_connections},
            kafka_options={"linger_ms": settings.kafka_linger_ms},
        )
        self.records = Records(self.client.redis, settings.files_bucket)
        self.storage = Storage(settings.files_bucket, settings.s3_endpoint_url)
        self.driver = Driver(settings, self.records, self.storage, self.client)
        self.online = Online(settings, self.records, self.client)
        self.dashboard = Dashboard(settings, self.client, self.records) if settings.dashboard else None


# Multipart framing around an uploaded file: part headers and the small form fields
# (api/upload.py bounds each of those).
UPLOAD_FRAMING_BYTES = 1024 * 1024


class BodyTooLarge(HTTPException):
    """A request body over its limit. An HTTPException, so FastAPI's own body parsing
    (forms) passes it on as it is instead of turning it into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")
        self.limit = limit


class BodyLimit:
    """Every request body bounded before it is read: a declared Content-Length over the
    route's limit is answered 413 at once; the bytes of a body without one (chunked) are
    counted as they arrive and the read that passes the limit raises BodyTooLarge, so no
    route ever holds more than the limit (and one chunk)."""

    def __init__(self, app: ASGIApp, settings: ApiSettings) -> None:
        self.app = app
        self.s = settings

    def limit(self, method: str, path: str) -> int:
        if method == "POST" and path.rstrip("/") == "/v1/files":
            return self.s.max_file_bytes + UPLOAD_FRAMING_BYTES
        return self.s.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope["method"], scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(BodyTooLarge(limit), send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _refuse(exc: BodyTooLarge, send: Send) -> None:
    response = _too_large(exc)
    await send(
        {"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers}
    )
    await send({"type": "http.response.body", "body": response.body})


def _too_large(exc: BodyTooLarge) -> Response:
    body = ErrorBody(ApiError(str(exc.detail), "invalid_request_error", code="request_too_large"))
    return json_response(body, 413, {"Connection": "close"})  # the rest of the body is never read


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(obj), status, headers, media_type="application/json")


async def tenant(request: Request) -> Tenant:
    """The caller's tenant from `Authorization: Bearer <key>` (401 without a known key)."""
    records: Records = request.app.state.ctx.records
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    found = await records.tenant(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
    if found is None:
        raise Failure(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key")
    return found


async def writer(t: Annotated[Tenant, Depends(tenant)]) -> Tenant:
    if not t.may_write:
        raise Failure(403, "this API key may only read", "permission_error", "insufficient_permissions")
    return t


Reader = Annotated[Tenant, Depends(tenant)]
Writer = Annotated[Tenant, Depends(writer)]


def create_app(settings: ApiSettings) -> FastAPI:
    ctx = Ctx(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        import asyncio

        tasks = []
        if settings.openai_routes:
            await ctx.storage.start(settings.create_bucket)
            tasks.append(asyncio.create_task(ctx.driver.run()))
            tasks.append(asyncio.create_task(ctx.online.waiters.run()))
            tasks.append(asyncio.create_task(ctx.online.renew()))
        if ctx.dashboard is not None:
            tasks.append(asyncio.create_task(ctx.dashboard.run_sampler()))
        log.info("api ready", host=settings.host, port=settings.port, models=settings.aliases())
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if ctx.dashboard is not None:
                await ctx.dashboard.close()
            await ctx.client.close()
            await ctx.storage.close()

    # FastAPI's own server spans continue a caller's traceparent; vlmq's spans (the submit,
    # then the worker's) are their children. Off unless OTEL_* asked for traces (core/tracing.py).
    telemetry: TelemetryConfig = {
        "tracing": tracing.ON,
        "metrics": False,
        "logs": False,
        "operation_spans": False,
    }
    app = FastAPI(
        title="vlmq", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None, telemetry=telemetry
    )
    app.state.ctx = ctx
    app.add_middleware(BodyLimit, settings=settings)
    _errors(app)

    @app.get("/healthz")
    async def healthz() -> Response:
        await ctx.records.redis.ping()
        return json_response({"ok": True})

    if settings.openai_routes:
        _routes(app, ctx)
    if ctx.dashboard is not None:
        mount(app, ctx.dashboard)
    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, exc: BodyTooLarge) -> Response:
        return _too_large(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        # FastAPI's own 422 would not be OpenAI's shape: the first problem, as a 400 naming it.
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(x) for x in first.get("loc", ()) if x not in ("query", "path", "body")]
        param = ".".join(where) or None
        message = f"invalid {param or 'request'}: {first.get('msg', 'not valid')}"
        return json_response(
            ErrorBody(ApiError(message, "invalid_request_error", param, "invalid_value")), 400
        )

    @app.exception_handler(Failure)
    async def failure(_: Request, exc: Failure) -> Response:
        return json_response(
            ErrorBody(ApiError(exc.message, exc.kind, exc.param, exc.code)), exc.status, exc.headers
        )

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable) -> Response:
        return _unavailable(request, exc.service, str(exc))

    # Redis itself (sessions, keys, records) not answering: the same 503, never a 500.
    for redis_down in (RedisConnectionError, RedisTimeoutError, *REDIS_FAILOVER):

        @app.exception_handler(redis_down)
        async def redis_unavailable(request: Request, exc: Exception) -> Response:
            return _unavailable(request, "Redis", f"{type(exc).__name__}: {exc}")

    @app.exception_handler(HTTPException)
    async def http(_: Request, exc: HTTPException) -> Response:
        return json_response(ErrorBody(ApiError(str(exc.detail), "invalid_request_error")), exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("request failed", path=request.url.path)
        body = ErrorBody(ApiError("the server failed; its log has the details", "server_error"))
        return json_response(body, 500)


def _unavailable(request: Request, service: str, error: str) -> Response:
    """503 with Retry-After: a dashboard page says so in HTML and reloads itself; the
    API answers OpenAI's error shape. One warning line, no traceback."""
    log.warning("a backend did not answer", service=service, path=request.url.path, error=error[:300])
    headers = {"Retry-After": "1"}
    if request.url.path.startswith("/dashboard") and "text/html" in request.headers.get("accept", ""):
        return page(request, "unavailable.html", {"service": service}, 503, headers)
    body = ErrorBody(ApiError(f"{service} did not answer; retry shortly", "server_error", code="unavailable"))
    return json_response(body, 503, headers)


def _routes(app: FastAPI, ctx: Ctx) -> None:
    s, records, storage = ctx.s, ctx.records, ctx.storage

    async def owned_file(t: Tenant, file_id: str) -> tuple[FileObject, str]:
        found = await records.file(t.name, file_id)
        if found is None:
            raise Failure(404, f"No such File object: {file_id[:64]}", param="id")
        return found

    async def owned_batch(t: Tenant, batch_id: str) -> Batch:
        found = await records.batch(batch_id, t.name)
        if found is None:
            raise Failure(404, f"No such Batch object: {batch_id[:64]}", param="batch_id")
        return found[1]

    def model(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "vlmq"}

    @app.get("/v1/models")
    async def models(_: Reader) -> Response:
        return json_response({"object": "list", "data": [model(m) for m in s.aliases()]})

    @app.get("/v1/models/{model_id:path}")  # ids may hold a slash (Qwen/Qwen2-VL-7B-Instruct)
    async def get_model(model_id: str, _: Reader) -> Response:
        if model_id not in s.aliases():
            raise Failure(
                404, f"The model {json.dumps(model_id)} does not exist", param="model", code="model_not_found"
            )
        return json_response(model(model_id))

    # -- files -----------------------------------------------------------------------------

    @app.post("/v1/files")
    async def create_file(request: Request, t: Writer) -> Response:
        file_id = new_id("file-")
        out = storage.writer(file_key(t.name, file_id))
        try:
            form = await receive(
                request.stream(),
                request.headers.get("content-type", ""),
                out,
                s.max_file_bytes,
                s.max_file_lines,
            )
            if form.fields.get("purpose") != "batch":
                raise Refused("purpose must be batch (the only purpose served here)", 400, "purpose")
            expires_s = _expires_after(form.fields)
            await out.close()
        except Refused as exc:
            await out.abort()
            raise Failure(exc.status, str(exc), param=exc.param) from None
        except BaseException:
            await out.abort()
            raise
        if not await records.reserve(t.name, "file_bytes", form.size, s.tenant_max_file_bytes):
            await storage.delete(out.key)
            raise Failure(
                413, f"the tenant's files would pass {s.tenant_max_file_bytes} bytes", code="quota_exceeded"
            )
        now = int(time.time())
        obj = FileObject(
            id=file_id,
            bytes=form.size,
            created_at=now,
            filename=form.filename or "upload.jsonl",
            purpose="batch",
            expires_at=now + expires_s,
        )
        await records.put_file(t.name, obj, out.key)
        return json_response(obj)

    def _expires_after(fields: dict[str, str]) -> int:
        anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
        if anchor is None and seconds is None:
            return s.file_ttl_s
        if (
            anchor != "created_at"
            or not (seconds or "").isdigit()
            or not 3600 <= int(seconds or 0) <= 2_592_000
        ):
            raise Refused(
                "expires_after needs anchor created_at and 3600 <= seconds <= 2592000", 400, "expires_after"
            )
        return int(seconds or 0)

    @app.get("/v1/files")
    async def list_files(
        t: Reader,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
        order: str = "desc",
        purpose: str | None = None,
    ) -> Response:
        page = await records.page(FileObject, t.name, after, limit, newest_first=order != "asc")
        if purpose:
            page.data = [f for f in page.data if f.purpose == purpose]
        return json_response(page)

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str, t: Reader) -> Response:
        return json_response((await owned_file(t, file_id))[0])

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, t: Reader) -> Response:
        _, key = await owned_file(t, file_id)
        return StreamingResponse(storage.chunks(key), media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, t: Writer) -> Response:
        await owned_file(t, file_id)
        for batch_id in await records.active():
            found = await records.batch(batch_id, t.name)
            if found and found[1].input_file_id == file_id:
                raise Failure(409, f"file {file_id} is the input of batch {batch_id}, which has not ended")
        key = await records.drop_file(t.name, file_id)
        if key is not None:
            await storage.delete(key)
        return json_response(FileDeleted(file_id))

    # -- batches ---------------------------------------------------------------------------

    @app.post("/v1/batches")
    async def create_batch(request: Request, t: Writer) -> Response:
        try:
            req = msgspec.json.decode(await request.body(), type=BatchCreate)
        except msgspec.DecodeError as exc:
            raise Failure(400, f"invalid request: {exc}") from None
        except RecursionError:
            raise Failure(400, "invalid request: nested too deeply") from None
        if req.endpoint not in ENDPOINTS:
            raise Failure(400, f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint")
        if not WINDOW.match(req.completion_window):
            raise Failure(400, "completion_window must be 24h", param="completion_window")
        obj, _ = await owned_file(t, req.input_file_id)
        if obj.purpose != "batch":
            raise Failure(400, "the input file must have purpose batch", param="input_file_id")
        now = int(time.time())
        b = Batch(
            id=new_id("batch_"),
            endpoint=req.endpoint,
            input_file_id=req.input_file_id,
            completion_window=req.completion_window,
            status="validating",
            created_at=now,
            expires_at=int(now + s.completion_window_s),
            metadata=req.metadata,
        )
        if req.output_expires_after:
            await records.set_progress(b.id, output_expires_s=req.output_expires_after.seconds)
        await records.put_batch(t.name, b)
        return json_response(b)

    async def with_live_counts(b: Batch) -> Batch:
        if b.status in TERMINAL or b.status == "validating":
            return b
        lines = (await records.progress(b.id)).get("lines", 0)
        counts = await ctx.client.store.batch_counts(b.id)
        return msgspec.structs.replace(b, request_counts=live_counts(lines, counts))

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, t: Reader) -> Response:
        return json_response(await with_live_counts(await owned_batch(t, batch_id)))

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, t: Writer) -> Response:
        b = await owned_batch(t, batch_id)
        if b.status in ("validating", "in_progress"):
            cancelling = msgspec.structs.replace(b, status="cancelling", cancelling_at=int(time.time()))
            if await records.move(t.name, cancelling, ("validating", "in_progress")):
                return json_response(await with_live_counts(cancelling))
            b = await owned_batch(t, batch_id)
        if b.status in ("cancelling", "cancelled"):
            return json_response(await with_live_counts(b))
        raise Failure(409, f"Cannot cancel a batch with status {b.status}.", param="batch_id")

    @app.get("/v1/batches")
    async def list_batches(
        t: Reader, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
    ) -> Response:
        page = await records.page(Batch, t.name, after, limit)
        page.data = [await with_live_counts(b) for b in page.data]
        return json_response(page)

    # -- online ----------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        online = ctx.online
        online.enter()  # the replica's own bound first: past it, 429 before Redis is asked
        streaming_left = False
        try:
            async with online.gate:
                t = await writer(await tenant(request))
            job, streaming = await online.start(await request.body(), t.name)
            if streaming is not None:  # the stream gives the slot back when it ends
                streaming_left = True
                return EventStream(online, job, streaming)
            try:
                result = await online.wait(job.job_id, s.online_timeout_s)
            except BaseException:  # the client left: nobody reads the answer
                await online.finish(job.job_id, cancel=True)
                raise
            if result is None:
                await online.finish(job.job_id, cancel=True)
            else:
                online.release(job.job_id)  # beside the answer, not before it
            return json_response(answer(result, s.online_timeout_s))
        finally:
            if not streaming_left:
                online.leave()
