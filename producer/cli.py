"""`vlmq submit|status|wait|cancel` and `vlmq bulk ...`: the client's commands. The root
(`vlmq.cli`) merges this app with the worker's and the stack's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import msgspec
import typer
from rich.console import Console

from vlmq.producer.builders import DEFAULT_CAPTION_PROMPT
from vlmq.producer.bulk_cli import app as bulk_app
from vlmq.producer.client import Client
from vlmq.producer.errors import JobEnded, Timeout, ValidationError
from vlmq.schemas.job import CacheMode, JobState, Result

T = TypeVar("T")
out = Console()

app = typer.Typer()
app.add_typer(bulk_app, name="bulk")

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


# -- single jobs ----------------------------------------------------------------------------


def _client_call(fn: Callable[[Client], Awaitable[T]]) -> T:
    async def go() -> T:
        async with Client() as client:
            return await fn(client)

    # Errors reach the root's error boundary (vlmq.cli), which prints one line per kind.
    return asyncio.run(go())


def _show(result: Result, as_json: bool) -> None:
    if as_json:
        out.print_json(msgspec.json.encode(result).decode())
        return
    line = f"{result.job_id}  [bold]{result.state.value}[/]"
    if result.error:
        line += f"  {result.error.code.value}: {result.error.message}"
    out.print(line)
    if result.text is not None:
        out.print(result.text, highlight=False)


def _cache_mode(value: str) -> CacheMode:
    if value not in ("use", "refresh", "off"):
        raise ValidationError(f"--cache must be use, refresh or off, not {value!r}")
    return value  # type: ignore[return-value]  # checked just above


@app.command()
def submit(
    image: Annotated[
        list[str] | None, typer.Argument(help="Image URIs: s3://bucket/key, https://, file://, data:")
    ] = None,
    video: Annotated[
        list[str] | None, typer.Option("--video", help="A video URI (mp4, webm, mov, mkv); repeatable.")
    ] = None,
    fps: Annotated[float | None, typer.Option(help="Video frames sampled per second.")] = None,
    num_frames: Annotated[
        int | None, typer.Option(help="Video frames sampled in all (not with --fps).")
    ] = None,
    image_embeds: Annotated[
        list[str] | None,
        typer.Option(
            help="Precomputed image embeddings (a safetensors file) in place of an image; repeatable."
        ),
    ] = None,
    grid: Annotated[
        str | None, typer.Option(help="The embedded image's grid T,H,W in patches (Qwen-VL models need it).")
    ] = None,
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="The prompt, or @FILE to read it from a file.")
    ] = DEFAULT_CAPTION_PROMPT,
    labels: Annotated[
        str | None, typer.Option(help="Moderation: comma-separated labels; the answer is one of them.")
    ] = None,
    max_tokens: Annotated[int, typer.Option()] = 128,
    job_id: Annotated[str | None, typer.Option(help="Idempotency key (default: a UUIDv7).")] = None,
    wait: Annotated[
        float | None, typer.Option(min=0, help="Also wait up to this many seconds for the result.")
    ] = None,
    cache: Annotated[
        str,
        typer.Option(help="Result cache: use (an identical job's answer), refresh (run, replace it), off."),
    ] = "use",
    as_json: JsonFlag = False,
) -> None:
    """Submit one job (a prompt about images and videos); prints its job id."""
    from vlmq.producer import builders, flags
    from vlmq.schemas.job import ChoiceFormat, EmbeddingRef, ImageRef, Job, Sampling, VideoRef

    try:
        refs: list[ImageRef | VideoRef | EmbeddingRef] = [ImageRef(u) for u in image or []]
        refs += [VideoRef(u, fps=fps, num_frames=num_frames) for u in video or []]
        thw = [int(n) for n in grid.split(",")] if grid else None
        refs += [EmbeddingRef(u, image_grid_thw=thw) for u in image_embeds or []]
    except ValueError as exc:
        raise ValidationError(f"{exc}") from None
    choices = flags.labels(labels)
    job = Job(
        job_id=job_id or builders.new_job_id(),
        messages=[builders.user(*refs, flags.prompt(prompt))],
        sampling=Sampling(max_tokens=max_tokens),
        response_format=ChoiceFormat(choices) if choices else None,
        cache=_cache_mode(cache),
    )

    async def go(client: Client) -> Any:
        handle = await client.submit(job)
        if wait is None:
            return handle
        return await client.wait(handle.job_id, wait)

    got = _client_call(go)  # an Unavailable names the job it did not submit
    if isinstance(got, Result):
        _show(got, as_json)
    elif as_json:
        out.print_json(msgspec.json.encode(got).decode())
    else:
        out.print(got.job_id if got.sent else f"{got.job_id} (already {got.state.value}; not resent)")


@app.command()
def status(job_id: str, as_json: JsonFlag = False) -> None:
    """Show a job's state (and result when it has ended)."""
    _show(_client_call(lambda c: c.status(job_id)), as_json)


@app.command()
def wait(
    job_id: str,
    timeout: Annotated[float | None, typer.Option(help="Seconds; default: forever.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Wait for a job to end; exit 1 if it did not succeed."""

    async def go(client: Client) -> Result:
        try:
            return await client.wait(job_id, timeout)
        except JobEnded as exc:
            _show(exc.result, as_json)
            raise typer.Exit(1) from None

    _show(_client_call(go), as_json)


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a queued or running job; exit 1 if it had ended, 4 if there is no such job.

    A worker carries the cancel out (the one running the job aborts it; a queued job is
    ended by any worker): this waits up to 10 s to see it happen."""

    async def go(client: Client) -> tuple[bool, Result]:
        requested = await client.cancel(job_id)
        if requested:
            with contextlib.suppress(Timeout, JobEnded):
                await client.wait(job_id, timeout=10)
        return requested, await client.status(job_id)  # JobNotFound when there is no such job

    requested, now = _client_call(go)
    if now.state is JobState.CANCELLED and requested:
        out.print(f"{job_id} cancelled")
        return
    if not now.state.terminal:
        out.print(f"{job_id}: cancel requested; it stays {now.state.value} until a worker sees the request")
        return
    out.print(f"{job_id}: nothing to cancel, it had ended ({now.state.value})")
    raise typer.Exit(1)
