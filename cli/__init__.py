"""The `vlmq` command: one root that merges each room's commands.

`vlmq submit|status|wait|cancel|bulk` come from the SDK (`vlmq.producer.cli`), `vlmq
worker` from the worker (`vlmq.worker.cli`), `vlmq stack` from `vlmq.deploy.cli`, `vlmq
api` from `vlmq.api.cli`, and `vlmq demo` from here. Each room's command module imports
only light things at the top (typer, rich, settings), so `vlmq --help` works with the
base install; the worker's Pillow, aiobotocore and engines load when `vlmq worker` runs,
FastAPI when `vlmq api serve` does.
"""

# ruff: noqa: E402  (the commands' imports come after the Ctrl-C handler that covers them)
from __future__ import annotations

import os
import signal
import sys
import threading


def _interrupted_while_loading(_sig: int, _frame: object) -> None:
    # Nothing is open yet: leave at once, rather than a KeyboardInterrupt raised from
    # inside some import (40 lines, or "Exception ignored in" a lock's callback).
    os.write(2, b"interrupted\n")
    os._exit(130)


# Ctrl-C while the commands' modules load (a second or so): one word and 130. Only the
# main thread may set a handler (an import from another thread keeps Python's), and an
# ignored SIGINT (nohup, a background job) stays ignored.
_MAIN = threading.current_thread() is threading.main_thread()
_MAIN = _MAIN and signal.getsignal(signal.SIGINT) is signal.default_int_handler
_LOADING = signal.signal(signal.SIGINT, _interrupted_while_loading) if _MAIN else None

import functools
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main
from rich.console import Console
from rich.markup import escape

from vlmq.api.cli import app as api_app
from vlmq.api.cli import dashboard
from vlmq.cli.demo import demo
from vlmq.cli.errors import Exit, UserError, explain
from vlmq.core import tracing
from vlmq.deploy.cli import app as stack_app
from vlmq.producer.cli import app as client_app
from vlmq.worker.cache_cli import app as cache_app
from vlmq.worker.cli import app as worker_app

if _MAIN:
    signal.signal(signal.SIGINT, _LOADING)

console = Console(stderr=True)
DEBUG = False

app = typer.Typer(
    help="vlmq: vision-language models behind a message queue (Kafka in, Redis out).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
schema_app = typer.Typer(help="The wire contract.", no_args_is_help=True)

app.add_typer(client_app)
app.add_typer(worker_app)
app.add_typer(stack_app, name="stack")
app.add_typer(api_app, name="api")
app.add_typer(schema_app, name="schema")
app.add_typer(cache_app, name="cache")
app.command("demo")(demo)
app.command("dashboard")(dashboard)


@schema_app.command("export")
def schema_export(
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for the JSON Schema files (a checkout's docs/schema)."),
    ] = None,
) -> None:
    """Write the JSON Schema of jobs, results and dead letters (for non-Python clients)."""
    from vlmq.schemas.export import export

    if out_dir is None:
        out_dir = Path("docs/schema")
        if not out_dir.is_dir():  # outside a vlmq checkout: never litter the current folder
            raise UserError("give the folder to write to: vlmq schema export --out DIR", Exit.USAGE)

    for path in export(out_dir):
        console.print(f"wrote {path}")


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"vlmq {version('vlmq')}")
        except PackageNotFoundError:  # a checkout run without an install
            typer.echo("vlmq (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", envvar="VLMQ_DEBUG", help="Show tracebacks instead of one-line errors.")
    ] = False,
    _show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    global DEBUG
    DEBUG = debug
    if ctx.invoked_subcommand:  # traces only where OTEL_* asks (docs/operations.md "Traces")
        tracing.setup(f"vlmq-{ctx.invoked_subcommand}")
    if not debug:  # aiokafka logs its own connection errors; the boundary's one line says it all
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def _not_empty(param: Any) -> None:
    """Wrap `param` so that an empty value given to it is refused, before its type sees it
    (a path type would turn "" into the current folder)."""
    convert = param.process_value
    name = param.opts[-1] if param.param_type_name == "option" else param.name.upper()

    def process_value(ctx: Any, value: Any) -> Any:
        given = ctx.get_parameter_source(param.name).name in ("COMMANDLINE", "ENVIRONMENT")
        if given and (value == "" or (isinstance(value, list | tuple) and "" in value)):
            raise UserError(f"{name} is empty: give it a value, or leave it out")
        return convert(ctx, value)

    param.process_value = process_value


def _refuse_empty(command: Any) -> None:
    """No option or argument of any command takes an empty value (`--labels ""`, a
    `$VAR` never set): it was a caption instead of moderation, a prompt of nothing, the
    current folder for a state dir. Flags take no value."""
    for param in command.params:
        if not getattr(param, "is_flag", False):
            _not_empty(param)
    for sub in getattr(command, "commands", {}).values():
        _refuse_empty(sub)


@functools.cache
def command() -> Any:
    """The click command tree that `vlmq` runs (typer's, with empty values refused)."""
    built = typer.main.get_command(app)
    _refuse_empty(built)
    return built


def main() -> None:
    """The `vlmq` entry point: typer's app inside the one error boundary (cli/errors.py)."""
    try:
        command()()
    except Exception as exc:
        explained = explain(exc)
        if explained is None or DEBUG:
            raise
        message, code = explained
        console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(int(code))
