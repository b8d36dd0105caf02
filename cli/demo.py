"""`vlmq demo`: the whole path on this machine, end to end.

Local stack up -> a worker (the fake engine unless told) -> sample images into S3 -> a bulk
submit with a progress bar -> a table of results. `--engine vllm --model <path>` on a GPU
box, or `--engine hf --model <path>` on the CPU, runs a real model the same way.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vlmq.core.settings import Connection

console = Console(stderr=True)
out = Console()


def _pick_engine(engine: str | None) -> str:
    if engine:
        return engine
    # A model needs its weights and torch; the demo must run on a bare machine, so: fake.
    console.print(
        "engine: [bold]fake[/] (deterministic answers, no model). A real model: "
        "`vlmq demo --engine vllm --model <path or HF id>` on a GPU, "
        "`--engine hf --model <path>` on the CPU (pip install 'vlmq\\[hf]', which brings torch)"  # \\[: not markup
    )
    return "fake"


def demo(
    images: Annotated[int, typer.Option(help="How many sample images to caption.")] = 12,
    engine: Annotated[
        str | None, typer.Option(help="fake | vllm | lmdeploy | hf | openai (default: fake).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model path or HF id (vllm, lmdeploy, hf, openai).")
    ] = None,
    state_dir: Annotated[Path, typer.Option(help="Where the demo's stack keeps its state.")] = Path(
        ".vlmq/demo"
    ),
    keep_stack: Annotated[bool, typer.Option(help="Leave Kafka, Redis and S3 running afterwards.")] = False,
) -> None:
    """Run the demo: local stack, one worker, a captioning backlog, the results."""
    from vlmq.deploy.stack import Stack, free_port, wait_until, worker_ready

    stack = Stack(state_dir, partitions=4)
    console.rule("[bold]1. local stack")
    env = stack.up(redis_url=os.environ.get("VLMQ_REDIS_URL"))
    os.environ.update(env)
    for k, v in env.items():
        console.print(f"  {k}={v}", highlight=False)
    chosen = _pick_engine(engine)
    console.rule(f"[bold]2. worker (engine: {chosen})")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vlmq.worker",
        "--engine",
        chosen,
        "--metrics-port",
        str(port),
        "--group-id",
        "vlmq-demo",
    ]
    if model:
        cmd += ["--model", model]
    if chosen == "fake":
        cmd += ["--engine-arg", "step_ms=20", "--engine-arg", "max_num_seqs=8"]
    log = (state_dir / "worker.log").open("ab")
    worker = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLMQ_LOG_FORMAT": "json"}
    )
    try:
        wait_until(lambda: worker_ready(port) or worker.poll() is not None, "worker", timeout=600)
        if worker.poll() is not None:
            console.print(f"[red]worker exited[/]; see {state_dir / 'worker.log'}")
            raise typer.Exit(1)
        console.print(f"  ready: http://127.0.0.1:{port}/metrics  (log: {state_dir / 'worker.log'})")
        console.rule("[bold]3. sample images -> S3, bulk submit, progress")
        batch = _upload(images)
        ok = asyncio.run(_submit_and_watch(batch, images))
        console.rule("[bold]4. results")
        asyncio.run(_table(batch))
    finally:
        worker.terminate()
        worker.wait(60)
        log.close()
        if not keep_stack:
            stack.down()
    raise typer.Exit(0 if ok else 1)


def _upload(n: int) -> str:
    import uuid

    import boto3

    from vlmq.worker.samples import photo

    s3 = boto3.client("s3", endpoint_url=Connection.load().s3_endpoint_url)
    bucket = "vlmq-demo"
    s3.create_bucket(Bucket=bucket)
    batch = f"demo-{uuid.uuid4().hex[:8]}"
    for i in range(n):
        s3.put_object(Bucket=bucket, Key=f"{batch}/photo-{i:03d}.jpg", Body=photo(800, 600, seed=i))
    console.print(f"  {n} photos in s3://{bucket}/{batch}/")
    return batch


async def _submit_and_watch(batch: str, n: int) -> bool:
    import boto3

    from vlmq.producer import bulk
    from vlmq.producer.bulk_cli import submit_items, watch_batch

    s3 = boto3.client("s3", endpoint_url=Connection.load().s3_endpoint_url)
    items = bulk.from_s3_prefix(s3, f"s3://vlmq-demo/{batch}/", batch, bulk.Preset())
    sent, _, _ = await submit_items(items, chunk=1000)
    console.print(f"  batch {batch}: {sent} jobs submitted")
    return await watch_batch(batch, timeout=600, total=n)


async def _table(batch: str) -> None:
    from vlmq.producer.client import Client

    table = Table("image", "state", "answer", "engine s", "tokens")
    async with Client() as client:
        results = [r async for r in client.iter_results(batch)]  # a dozen: sorted by image
    for r in sorted(results, key=lambda r: r.metadata.get("key", r.job_id)):
        # One line per image whatever the model wrote (random weights write blank lines),
        # and as plain text: a model's "[bold]" is not markup.
        line = " ".join((r.text or (r.error.message if r.error else "")).split())[:70]
        text = Text(line) if line else Text("(only whitespace)", style="dim")
        engine_s = f"{r.timings.engine_s:.2f}" if r.timings and r.timings.engine_s else "-"
        tokens = str(r.usage.completion_tokens) if r.usage else "-"
        key = r.metadata.get("key", r.job_id).rsplit("/", 1)[-1]
        table.add_row(key, r.state.value, text, engine_s, tokens)
    out.print(table)
