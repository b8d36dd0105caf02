"""`vlmq stack up|down|status`: the local Kafka (tansu), Redis and S3 (moto) without Docker."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)
out = Console()

app = typer.Typer(help="The local stack: Kafka (tansu), Redis, S3 (moto).", no_args_is_help=True)
StackDir = Annotated[Path, typer.Option(envvar="VLMQ_STACK_DIR", help="Where the stack keeps its state.")]
DEFAULT_STACK_DIR = Path(".vlmq/stack")


@app.command("up")
def stack_up(
    state_dir: StackDir = DEFAULT_STACK_DIR,
    partitions: Annotated[int, typer.Option(help="Partitions of the jobs topic.")] = 8,
    kafka_port: Annotated[int | None, typer.Option(help="Default: a free port.")] = None,
    redis_port: Annotated[int | None, typer.Option(help="Default: a free port.")] = None,
    s3_port: Annotated[int | None, typer.Option(help="Default: a free port.")] = None,
    redis_cluster: Annotated[
        bool, typer.Option(help="A Redis Cluster (3 masters + 3 replicas) instead of one Redis.")
    ] = False,
) -> None:
    """Start what is missing and print the settings: `eval "$(vlmq stack up)"`.

    A real service is used instead whenever VLMQ_KAFKA_BOOTSTRAP, VLMQ_REDIS_URL or
    VLMQ_S3_ENDPOINT_URL is set (Redis: when it answers). One stack per folder: a second
    `stack up` there waits for the first and prints the same settings."""
    from vlmq.deploy.stack import Stack

    def waiting() -> None:
        console.print(f"another `vlmq stack up` is starting the stack in {state_dir}: waiting to use it")

    stack = Stack(state_dir, partitions=partitions, on_wait=waiting)
    ports = {k: v for k, v in (("kafka", kafka_port), ("redis", redis_port), ("s3", s3_port)) if v}
    # A StackError (no tansu, a port taken, the folder held too long) is the CLI's one line, exit 3.
    env = stack.up(
        kafka=os.environ.get("VLMQ_KAFKA_BOOTSTRAP"),
        redis_url=os.environ.get("VLMQ_REDIS_URL"),
        s3=os.environ.get("VLMQ_S3_ENDPOINT_URL"),
        ports=ports,
        redis_cluster=redis_cluster,
    )
    for name, (url, ok, pid) in stack.status().items():
        owner = f"(ours, pid {pid})" if pid else "(external)"
        console.print(f"{name:6} {url:32} {'up' if ok else 'DOWN'} {owner}")
    for k, v in env.items():
        out.print(f"export {k}={v}", highlight=False)


@app.command("down")
def stack_down(state_dir: StackDir = DEFAULT_STACK_DIR) -> None:
    """Stop the services `stack up` started (external ones are left alone)."""
    from vlmq.deploy.stack import Stack

    Stack(state_dir).down()
    console.print("stack stopped")


@app.command("status")
def stack_status(state_dir: StackDir = DEFAULT_STACK_DIR) -> None:
    """Show the stack's services and whether they answer; exit 1 if one does not."""
    from vlmq.deploy.stack import Stack

    stack = Stack(state_dir)
    if stack.stale():  # a reboot or a kill -9 ended every server: the file is all that is left
        stack.down()
        console.print(
            f"the stack in {state_dir} had stopped (its servers are gone): `vlmq stack up` starts it again"
        )
        raise typer.Exit(1)
    status = stack.status()
    if not status:
        console.print("no stack here: `vlmq stack up` starts one")
        raise typer.Exit(1)
    for name, (url, ok, pid) in status.items():
        console.print(f"{name:6} {url:32} {'up' if ok else 'DOWN'} pid={pid or '-'}")
    if not all(ok for _, ok, _ in status.values()):
        raise typer.Exit(1)
