"""The `vlmq` command: one root that merges each room's commands.

`vlmq submit|status|wait|cancel|bulk` come from the SDK (`vlmq.producer.cli`), `vlmq
worker` from the worker (`vlmq.worker.cli`), `vlmq stack` from `vlmq.deploy.cli`, and
`vlmq demo` from here. Each room's command module imports only light things at the top
(typer, rich, settings), so `vlmq --help` works with the base install; the worker's
Pillow, aiobotocore and engines load when `vlmq worker` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from vlmq.cli.demo import demo
from vlmq.deploy.cli import app as stack_app
from vlmq.producer.cli import app as client_app
from vlmq.worker.cli import app as worker_app

console = Console(stderr=True)

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
app.add_typer(schema_app, name="schema")
app.command("demo")(demo)


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


def main() -> None:
    app()
