"""`vlmq bulk`: submit a backlog, watch it drain, export its results."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from vlmq.core.settings import Connection
from vlmq.core.state import BatchCounts
from vlmq.producer import bulk, flags
from vlmq.producer.builders import DEFAULT_CAPTION_PROMPT
from vlmq.producer.client import Client, SubmitReport
from vlmq.producer.errors import Interrupted, NothingToSubmit
from vlmq.schemas.job import Job

console = Console(stderr=True)
PLAIN_EVERY_S = 5.0  # progress lines when stderr is not a terminal (a log, CI)
app = typer.Typer(help="Bulk backlogs: submit, watch, cancel, export.", no_args_is_help=True)
BatchArg = Annotated[str, typer.Argument(help="Batch id: groups the jobs for progress and export.")]


def _source(
    batch_id: str,
    s3_prefix: str | None,
    manifest: Path | None,
    openai: Path | None,
    preset: bulk.Preset,
    suffixes: tuple[str, ...],
    allow_https: bool,
) -> Iterator[bulk.Item]:
    chosen = [x for x in (s3_prefix, manifest, openai) if x]
    if len(chosen) != 1:
        console.print("[red]error:[/] give exactly one of --s3, --manifest, --openai")
        raise typer.Exit(2)
    if s3_prefix:
        import boto3

        if not s3_prefix.startswith("s3://") or not s3_prefix[5:].split("/", 1)[0]:
            raise typer.BadParameter(f"takes s3://bucket/prefix, not {s3_prefix!r}", param_hint="--s3")

        s3 = boto3.client("s3", endpoint_url=_s3_endpoint())
        return bulk.from_s3_prefix(s3, s3_prefix, batch_id, preset, suffixes)
    if manifest:
        return bulk.from_manifest(bulk.read_lines(manifest), batch_id, preset)
    assert openai is not None
    return bulk.from_openai_batch(bulk.read_lines(openai), batch_id, allow_https=allow_https)


def _s3_endpoint() -> str | None:
    return Connection.load().s3_endpoint_url


@app.command()
def submit(
    batch_id: BatchArg,
    s3_prefix: Annotated[
        str | None, typer.Option("--s3", help="s3://bucket/prefix: one job per image.")
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="JSONL: {key, image[, prompt, labels]} or {key, messages...}."
        ),
    ] = None,
    openai: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="OpenAI Batch API input file (chat completions)."),
    ] = None,
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="Prompt for --s3 and short manifest lines, or @FILE.")
    ] = DEFAULT_CAPTION_PROMPT,
    labels: Annotated[str | None, typer.Option(help="Moderation preset: comma-separated labels.")] = None,
    suffix: Annotated[
        list[str] | None, typer.Option(help="Object name endings to take (repeatable).")
    ] = None,
    allow_https: Annotated[
        bool, typer.Option(help="Accept https:// image URLs in --openai files (workers check each one).")
    ] = True,
    chunk: Annotated[int, typer.Option(help="Jobs per produce round trip.")] = 2000,
    rejected: Annotated[Path | None, typer.Option(help="Write rejected lines here (JSONL).")] = None,
) -> None:
    """Submit a backlog. Safe to re-run after an interruption: no job runs twice."""
    preset = bulk.Preset(prompt=flags.prompt(prompt), labels=flags.labels(labels))
    suffixes = tuple(s.lower() for s in suffix) if suffix else bulk.IMAGE_SUFFIXES
    items = _source(batch_id, s3_prefix, manifest, openai, preset, suffixes, allow_https)
    done = SubmitReport()
    try:
        sent, skipped, bad = asyncio.run(submit_items(items, chunk, done, _count_lines(manifest or openai)))
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: {done.sent + done.skipped} jobs of batch {batch_id} were acknowledged; "
            "run the same command again to resume (acknowledged jobs are skipped, none runs twice)"
        ) from None
    if bad:
        _report_bad(bad, rejected)
    if sent + skipped == 0:
        where = s3_prefix or manifest or openai
        kinds = f" ending in {', '.join(suffixes)}" if s3_prefix else ""
        raise NothingToSubmit(f"no jobs in {where}{kinds}: nothing was submitted")
    console.print(f"batch [bold]{batch_id}[/]: {sent} sent, {skipped} already sent, {len(bad)} rejected")


async def submit_items(
    items: Iterator[bulk.Item], chunk: int, done: SubmitReport | None = None, total: int | None = None
) -> tuple[int, int, list[bulk.BadLine]]:
    """Submit jobs with a progress bar; returns (sent, already sent, rejected lines), and
    keeps `done` at the acknowledged counts as they come (what an interrupted run had). One
    `submit_many` over the whole stream, so each chunk's acks overlap the next chunk.
    `total`: the number of source lines when known (a file), for the bar's ETA."""
    bad: list[bulk.BadLine] = []
    ctrl_c = _CtrlC()

    def jobs() -> Iterator[Job]:
        for item in items:
            if ctrl_c.pressed:
                return  # what is in flight is acknowledged and recorded, then the command stops
            if isinstance(item, bulk.BadLine):
                bad.append(item)
            else:
                yield item

    columns = (
        TextColumn("submitting"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    rate, said = _Rate(), time.monotonic()
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("submit", total=total, rate="")
        async with Client() as client:

            def show(r: SubmitReport) -> None:
                nonlocal said
                if done is not None:
                    done.sent, done.skipped = r.sent, r.skipped
                n = r.sent + r.skipped
                progress.update(task, completed=n, rate=rate.add(n))
                if not console.is_terminal and time.monotonic() - said >= PLAIN_EVERY_S:
                    said = time.monotonic()  # a log file gets a line now and then, not silence
                    console.print(
                        f"submitting: {n}{f' of {total}' if total else ''} acknowledged, {rate.add(n)}"
                    )

            with ctrl_c:
                report = await client.submit_many(jobs(), chunk=chunk, progress=show)
    if ctrl_c.pressed:
        raise KeyboardInterrupt
    return report.sent, report.skipped, bad


class _CtrlC:
    """The first Ctrl-C stops taking new jobs: the chunks in flight are acknowledged and
    recorded, so the counts are exact and a re-run resumes after them (the SDK's calls are
    not all safe to cancel in the middle). A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.pressed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def _press(self) -> None:
        self.pressed = True
        console.print("stopping after the jobs in flight (Ctrl-C again: at once)")
        self.__exit__()

    def __enter__(self) -> None:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            return  # ignored by whoever started us (nohup): stays so
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(signal.SIGINT, self._press)
            self._loop = loop

    def __exit__(self, *_: object) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGINT)  # back to KeyboardInterrupt
            self._loop = None


def _count_lines(path: Path | None) -> int | None:
    """The lines of a source file (blank ones too: an estimate the bar can end below),
    counted in 1 MiB reads: a 100,000-line manifest takes milliseconds."""
    if path is None:
        return None
    n = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
    return n or None


def _report_bad(bad: list[bulk.BadLine], rejected: Path | None) -> None:
    table = Table("line", "key", "reason", title=f"{len(bad)} lines rejected", title_justify="left")
    for b in bad[:20]:
        table.add_row(str(b.line), b.key or "", b.reason)
    console.print(table)
    if len(bad) > 20:
        console.print(f"... and {len(bad) - 20} more")
    if rejected:
        with rejected.open("w") as f:
            for b in bad:
                f.write(json.dumps({"line": b.line, "key": b.key, "reason": b.reason}) + "\n")
        console.print(f"all rejected lines: {rejected}")


def _describe(c: BatchCounts) -> str:
    return f"[green]{c.succeeded} ok[/] [red]{c.failed} failed[/] {c.running} running {c.queued} queued" + (
        f" {c.cancelled + c.expired} cancelled/expired" if c.cancelled + c.expired else ""
    )


@app.command()
def status(batch_id: BatchArg, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Counts per state of a batch."""
    counts = asyncio.run(_counts(batch_id))
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "batch_id": batch_id,
                    "total": counts.total,
                    "finished": counts.finished,
                    **{
                        s: getattr(counts, s)
                        for s in ("queued", "running", "succeeded", "failed", "cancelled", "expired")
                    },
                }
            )
        )
    else:
        console.print(f"{batch_id}: {counts.finished}/{counts.total} finished; {_describe(counts)}")


async def _counts(batch_id: str) -> BatchCounts:
    async with Client() as client:
        return await client.batch(batch_id)


@app.command()
def watch(
    batch_id: BatchArg,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
) -> None:
    """A live progress bar until every job of the batch has ended (rate and ETA included)."""
    ok = asyncio.run(watch_batch(batch_id, timeout))
    raise typer.Exit(0 if ok else 1)


async def watch_batch(batch_id: str, timeout: float | None = None, total: int | None = None) -> bool:
    """Show progress until done; True when every job ended within `timeout`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    columns = (
        TextColumn("[bold]{task.fields[batch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
    )
    async with Client() as client:
        rate = _Rate()
        await client.batch(batch_id)  # BatchNotFound before any progress bar is drawn
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("", total=total, batch=batch_id)
            while True:
                c = await client.batch(batch_id)
                progress.update(
                    task,
                    completed=c.finished,
                    total=max(c.total, total or 0) or None,
                    description=f"{rate.add(c.finished)} {_describe(c)}",
                )
                if c.total and c.finished >= max(c.total, total or 0):
                    return True
                if deadline is not None and time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.25)


class _Rate:
    """Jobs ended per second over the last `window_s` seconds."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, finished: int) -> str:
        now = time.monotonic()
        self.samples.append((now, finished))
        while now - self.samples[0][0] > self.window_s:
            self.samples.popleft()
        (t0, f0), (t1, f1) = self.samples[0], self.samples[-1]
        return f"{(f1 - f0) / (t1 - t0):.1f} jobs/s" if t1 > t0 else "- jobs/s"


@app.command()
def cancel(
    batch_id: BatchArg,
    wait: Annotated[
        float, typer.Option(min=0, help="Seconds to watch the jobs end before returning.")
    ] = 10.0,
) -> None:
    """Cancel every unfinished job of a batch; exit 1 if all had ended, 4 if no such batch.

    Running jobs are aborted; queued ones end cancelled as a worker reaches them (they stay
    queued while no worker runs). Ended jobs stay as they are."""
    before, after = asyncio.run(_cancel(batch_id, wait))
    if before.finished >= before.total:
        console.print(f"{batch_id}: nothing to cancel, all {before.total} jobs had ended; {_describe(after)}")
        raise typer.Exit(1)
    left = after.total - after.finished
    console.print(
        f"{batch_id}: cancel requested for {before.total - before.finished} unfinished jobs; {_describe(after)}"
        + (f" ({left} end cancelled as workers reach them)" if left else "")
    )


async def _cancel(batch_id: str, wait: float) -> tuple[BatchCounts, BatchCounts]:
    async with Client() as client:
        before = await client.cancel_batch(batch_id)
        deadline = time.monotonic() + wait
        after = await client.batch(batch_id)
        while after.finished < after.total and time.monotonic() < deadline and before.finished < before.total:
            await asyncio.sleep(0.25)
            after = await client.batch(batch_id)
        return before, after


@app.command("export")
def export_cmd(
    batch_id: BatchArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (JSONL).")],
    fmt: Annotated[
        str, typer.Option("--format", help="jsonl (vlmq Results) or openai (Batch API output).")
    ] = "jsonl",
    errors: Annotated[Path | None, typer.Option(help="openai format: failures go here instead.")] = None,
) -> None:
    """Stream a batch's ended jobs to a file (shard by shard, in end order within each)."""
    if fmt not in ("jsonl", "openai"):
        console.print("[red]error:[/] --format is jsonl or openai")
        raise typer.Exit(2)
    n_out, n_err = asyncio.run(_export(batch_id, out, fmt == "openai", errors))
    console.print(f"wrote {n_out} rows to {out}" + (f", {n_err} to {errors}" if errors else ""))


async def _export(batch_id: str, out: Path, openai: bool, errors: Path | None) -> tuple[int, int]:
    async with Client() as client:
        await client.batch(batch_id)  # BatchNotFound before any file is written
        with out.open("wb") as f_out:
            if errors is None:
                return await bulk.export(client.iter_results(batch_id), f_out, openai=openai)
            with errors.open("wb") as f_err:
                return await bulk.export(client.iter_results(batch_id), f_out, openai=openai, errors=f_err)
