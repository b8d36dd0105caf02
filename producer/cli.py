"""The `vlmq` command. Client verbs live here; `worker` and `bulk` load their modules
only when run, so `vlmq --help` needs nothing beyond the base install."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import typer
from rich.console import Console

from vlmq.producer.errors import VlmqClientError
from vlmq.schemas.job import Result

T = TypeVar("T")
console = Console(stderr=True)
out = Console()

app = typer.Typer(
    help="vlmq: vision-language models behind a message queue (Kafka in, Redis out).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
schema_app = typer.Typer(help="The wire contract.", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: Kafka (tansu), Redis, S3 (moto).", no_args_is_help=True)
app.add_typer(schema_app, name="schema")
app.add_typer(stack_app, name="stack")

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
StackDir = Annotated[Path, typer.Option(envvar="VLMQ_STACK_DIR", help="Where the stack keeps its state.")]
DEFAULT_STACK_DIR = Path(".vlmq/stack")


def main() -> None:
    app()


def _run(coro: Awaitable[T]) -> T:
    """Run a client coroutine; turn SDK errors into one readable line and exit code 1."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except VlmqClientError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    except OSError as exc:
        console.print(f"[red]cannot connect:[/] {exc}. Is the stack up? Try `vlmq stack up`.")
        raise typer.Exit(2) from None


# -- schema ---------------------------------------------------------------------------------


@schema_app.command("export")
def schema_export(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the JSON Schema files.")] = Path(
        "docs/schema"
    ),
) -> None:
    """Write the JSON Schema of jobs, results and dead letters (for non-Python clients)."""
    from vlmq.schemas.export import export

    for path in export(out_dir):
        console.print(f"wrote {path}")


# -- stack ----------------------------------------------------------------------------------


@stack_app.command("up")
def stack_up(
    state_dir: StackDir = DEFAULT_STACK_DIR,
    partitions: Annotated[int, typer.Option(help="Partitions of the jobs topic.")] = 8,
    kafka_port: Annotated[int | None, typer.Option(help="Default: a free port.")] = None,
    redis_port: Annotated[int | None, typer.Option(help="Default: a free port.")] = None,
    s3_port: Annotated[int | None, typer.Option(help="Default: a free port.")] = None,
) -> None:
    """Start what is missing and print the settings: `eval "$(vlmq stack up)"`.

    A real service is used instead whenever VLMQ_KAFKA_BOOTSTRAP, VLMQ_REDIS_URL or
    VLMQ_S3_ENDPOINT_URL is set (Redis: when it answers)."""
    from vlmq.deploy.stack import Stack, StackError

    stack = Stack(state_dir, partitions=partitions)
    try:
        env = stack.up(
            kafka=os.environ.get("VLMQ_KAFKA_BOOTSTRAP"),
            redis_url=os.environ.get("VLMQ_REDIS_URL"),
            s3=os.environ.get("VLMQ_S3_ENDPOINT_URL"),
            ports={k: v for k, v in (("kafka", kafka_port), ("redis", redis_port), ("s3", s3_port)) if v},
        )
    except StackError as exc:
        console.print(f"[red]stack up failed:[/] {exc}")
        raise typer.Exit(1) from None
    for name, (url, ok, pid) in stack.status().items():
        console.print(
            f"{name:6} {url:32} {'up' if ok else 'DOWN'} {f'(ours, pid {pid})' if pid else '(external)'}"
        )
    for k, v in env.items():
        out.print(f"export {k}={v}", highlight=False)


@stack_app.command("down")
def stack_down(state_dir: StackDir = DEFAULT_STACK_DIR) -> None:
    """Stop the services `stack up` started (external ones are left alone)."""
    from vlmq.deploy.stack import Stack

    Stack(state_dir).down()
    console.print("stack stopped")


@stack_app.command("status")
def stack_status(state_dir: StackDir = DEFAULT_STACK_DIR) -> None:
    """Show the stack's services and whether they answer; exit 1 if one does not."""
    from vlmq.deploy.stack import Stack

    status = Stack(state_dir).status()
    if not status:
        console.print("no stack here: `vlmq stack up` starts one")
        raise typer.Exit(1)
    for name, (url, ok, pid) in status.items():
        console.print(f"{name:6} {url:32} {'up' if ok else 'DOWN'} pid={pid or '-'}")
    if not all(ok for _, ok, _ in status.values()):
        raise typer.Exit(1)


# -- worker ---------------------------------------------------------------------------------


def _register_subcommands() -> None:
    from vlmq.producer.bulk_cli import app as bulk_app
    from vlmq.producer.demo import demo
    from vlmq.worker.cli import worker

    # Unknown --flags are the engine's own (vllm serve / lmdeploy serve names).
    app.command("worker", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(worker)
    app.add_typer(bulk_app, name="bulk")
    app.command("demo")(demo)


_register_subcommands()


# -- single jobs ----------------------------------------------------------------------------


def _client_call(fn: Callable[[Any], Awaitable[T]]) -> T:
    from vlmq.producer.client import Client

    async def go() -> T:
        async with Client() as client:
            return await fn(client)

    return _run(go())


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


@app.command()
def submit(
    image: Annotated[list[str], typer.Argument(help="Image URIs: s3://bucket/key, file://, data:")],
    prompt: Annotated[str, typer.Option("--prompt", "-p")] = "Describe this image in one or two sentences.",
    labels: Annotated[
        str | None, typer.Option(help="Moderation: comma-separated labels; the answer is one of them.")
    ] = None,
    max_tokens: Annotated[int, typer.Option()] = 128,
    job_id: Annotated[str | None, typer.Option(help="Idempotency key (default: a UUIDv7).")] = None,
    wait: Annotated[
        float | None, typer.Option(help="Also wait up to this many seconds for the result.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Submit one job (a prompt about one or more images); prints its job id."""
    from vlmq.producer import builders
    from vlmq.schemas.job import ChoiceFormat, ImageRef, Job, Sampling

    job = Job(
        job_id=job_id or builders.new_job_id(),
        messages=[builders.user(*[ImageRef(u) for u in image], prompt)],
        sampling=Sampling(max_tokens=max_tokens),
        response_format=ChoiceFormat(labels.split(",")) if labels else None,
    )

    async def go(client: Any) -> Any:
        handle = await client.submit(job)
        if wait is None:
            return handle
        return await client.wait(handle.job_id, wait)

    got = _client_call(go)
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
    from vlmq.producer.errors import JobEnded

    async def go(client: Any) -> Result:
        try:
            return await client.wait(job_id, timeout)  # type: ignore[no-any-return]
        except JobEnded as exc:
            _show(exc.result, as_json)
            raise typer.Exit(1) from None

    _show(_client_call(go), as_json)


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a queued or running job."""
    done = _client_call(lambda c: c.cancel(job_id))
    out.print(f"{job_id} cancelled" if done else f"{job_id}: nothing to cancel (ended or unknown)")
    if not done:
        raise typer.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())  # type: ignore[func-returns-value]
