"""`python -m vlmq.worker [flags]`: the same as `vlmq worker [flags]`."""

import typer

from vlmq.worker.cli import ENGINE_FLAGS, worker

# One command, so `python -m vlmq.worker --engine fake` needs no sub-command name.
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command(context_settings=ENGINE_FLAGS)(worker)

if __name__ == "__main__":
    app()
