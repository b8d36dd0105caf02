"""`vlmq api serve` and `vlmq api key ...`: flags override `VLMQ_*` env vars, which
override the defaults. FastAPI and uvicorn load only when the server starts (extra `api`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console

from vlmq.api.records import Records, Scope
from vlmq.api.settings import ApiSettings
from vlmq.core.logs import configure
from vlmq.core.ports import cannot_listen
from vlmq.core.topology import connect_redis

T = TypeVar("T")
Opt = typer.Option
out = Console()
app = typer.Typer(
    help="The OpenAI-compatible Files + Batches API (and queue-backed chat completions).",
    no_args_is_help=True,
)
key_app = typer.Typer(
    help="API keys: one per tenant and use; only their hashes are stored.", no_args_is_help=True
)
app.add_typer(key_app, name="key")


@app.command("serve")
def serve(
    host: Annotated[str | None, Opt(help="Address to listen on [VLMQ_HOST]")] = None,
    port: Annotated[int | None, Opt(help="Port [VLMQ_PORT]")] = None,
    models: Annotated[
        list[str] | None,
        Opt(
            "--model",
            help="A model requests may name: served-name, or alias=served-name "
            "(gpt-4o-mini=Qwen/Qwen2-VL-7B-Instruct). Repeatable [VLMQ_MODELS]",
        ),
    ] = None,
    files_bucket: Annotated[str | None, Opt(help="S3 bucket for files [VLMQ_FILES_BUCKET]")] = None,
    create_bucket: Annotated[
        bool | None,
        Opt("--create-bucket/--no-create-bucket", help="Create the bucket if missing [VLMQ_CREATE_BUCKET]"),
    ] = None,
    completion_window_s: Annotated[
        float | None, Opt(help="Seconds `24h` means (a demo may want minutes) [VLMQ_COMPLETION_WINDOW_S]")
    ] = None,
    batch_window: Annotated[
        int | None, Opt(help="Requests of one batch queued or running at once [VLMQ_BATCH_WINDOW]")
    ] = None,
    online_max_queued: Annotated[
        int | None, Opt(help="Online requests waiting before 429 [VLMQ_ONLINE_MAX_QUEUED]")
    ] = None,
    allow_https: Annotated[
        bool | None, Opt("--allow-https/--no-allow-https", help="Accept https:// images [VLMQ_ALLOW_HTTPS]")
    ] = None,
    dashboard: Annotated[
        bool | None,
        Opt("--dashboard/--no-dashboard", help="Serve the pages under /dashboard [VLMQ_DASHBOARD]"),
    ] = None,
    log_format: Annotated[str | None, Opt(help="auto | json | console [VLMQ_LOG_FORMAT]")] = None,
) -> None:
    """Serve /v1/files, /v1/batches, /v1/chat/completions, /v1/models and the dashboard
    at /dashboard (any number of replicas)."""
    flags = {k: v for k, v in locals().items() if v is not None}
    settings = ApiSettings.load(flags)
    if not settings.models:
        raise typer.BadParameter("name at least one model: --model NAME or VLMQ_MODELS", param_hint="--model")
    _run(settings)


def dashboard(
    host: Annotated[str | None, Opt(help="Address to listen on [VLMQ_HOST]")] = None,
    port: Annotated[int | None, Opt(help="Port [VLMQ_PORT]")] = None,
    log_format: Annotated[str | None, Opt(help="auto | json | console [VLMQ_LOG_FORMAT]")] = None,
) -> None:
    """Serve only the dashboard (batches, jobs, workers) at /dashboard, without the OpenAI API.
    Log in with a key from `vlmq api key create NAME --admin`."""
    flags = {k: v for k, v in locals().items() if v is not None}
    _run(ApiSettings.load({**flags, "dashboard": True, "openai_routes": False}))


def _check_bucket(settings: ApiSettings) -> None:
    """The files bucket, before uvicorn starts: a missing one is the CLI's one line, not
    a traceback from inside uvicorn's startup."""
    import asyncio

    from vlmq.api.storage import Storage
    from vlmq.producer.errors import NotFound  # the CLI's boundary: exit 4 (api may not import cli)

    async def check() -> None:
        storage = Storage(settings.files_bucket, settings.s3_endpoint_url)
        try:
            await storage.start(settings.create_bucket)
        finally:
            await storage.close()

    try:
        asyncio.run(check())
    except RuntimeError as exc:  # Storage.start's: the bucket is not there or not ours
        raise NotFound(str(exc)) from None


def _check_redis(settings: ApiSettings) -> None:
    """Redis, before uvicorn starts: a server that cannot reach it would serve only 503s
    (keys, sessions and every batch live there). The boundary says where and what to do."""
    asyncio.run(_with_records(lambda r: r.redis.ping()))


def _run(settings: ApiSettings) -> None:
    configure(settings.log_format, settings.log_level)
    try:
        import uvicorn
    except ImportError:
        # markup=False: rich would take `[api]` for a style and print `pip install 'vlmq'`
        Console(stderr=True).print(
            "error: the API server needs the api extra: pip install 'vlmq[api]'", markup=False
        )
        raise typer.Exit(2) from None

    from vlmq.api.app import create_app

    if why := cannot_listen(settings.host, settings.port):  # before uvicorn's own error lines
        Console(stderr=True).print(
            f"error: cannot serve on {settings.host}:{settings.port} ({why}): another server has "
            "the port? Give --port (VLMQ_PORT) or --host (VLMQ_HOST)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)
    _check_redis(settings)
    if settings.openai_routes:
        _check_bucket(settings)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")


@key_app.command("create")
def key_create(
    tenant: Annotated[
        str, typer.Argument(help="The tenant the key acts for (it sees only its own files and batches).")
    ],
    read_only: Annotated[
        bool, Opt("--read-only", help="May list and read, not upload, create, cancel or retry.")
    ] = False,
    admin: Annotated[
        bool, Opt("--admin", help="An operator's key: the dashboard shows it every batch and the workers.")
    ] = False,
) -> None:
    """Print a new API key (shown once: only its hash is kept)."""
    scope: Scope = "read" if read_only else "write"
    key = asyncio.run(_with_records(lambda r: r.create_key(tenant, scope, admin)))
    out.print(key, highlight=False, soft_wrap=True)


@key_app.command("revoke")
def key_revoke(key: Annotated[str, typer.Argument(help="The key to revoke.")]) -> None:
    """Revoke an API key."""
    if not asyncio.run(_with_records(lambda r: r.revoke_key(key))):
        raise typer.BadParameter("no such key", param_hint="KEY")


async def _with_records(fn: Callable[[Records], Awaitable[T]]) -> T:
    redis = connect_redis(ApiSettings.load())
    try:
        return await fn(Records(redis))
    finally:
        await redis.aclose()
