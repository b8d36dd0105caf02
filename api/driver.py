"""A batch's lifecycle, driven by whichever replica holds its lease.

    validating  -> failed (every bad line, with its number)     | in_progress
    in_progress -> finalizing -> completed                      | expired (past the window)
    cancelling  -> cancelled (once running requests ended, or after cancel_grace_s)

Each step reads its state from Redis and S3 and is safe to repeat, so a replica that dies
anywhere loses nothing: another takes the lease and repeats the step. Requests are jobs
with ids derived from (batch, custom_id): a resubmission is skipped by the queue itself.
Output and error files have ids derived from the batch: a repeated finalization rewrites
the same files, and the status moves on once (a compare-and-set on the status).

A batch has at most `batch_window` requests queued or running; the next lines are read
from the input file (from the byte offset where the last submission stopped) as earlier
ones finish. So batches share the workers in turn, and an online request waits behind at
most one window per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import msgspec
import structlog

from vlmq.api.objects import (
    Batch,
    BatchError,
    BatchUsage,
    Errors,
    FileObject,
    RequestCounts,
)
from vlmq.api.records import Records
from vlmq.api.settings import ApiSettings
from vlmq.api.storage import Storage, Writer
from vlmq.core.state import BatchCounts
from vlmq.producer.builders import with_tenant
from vlmq.producer.bulk import UNFINISHED, BadLine, OpenAIReader, openai_line, openai_output
from vlmq.producer.client import Client
from vlmq.schemas.job import Job, JobState

log = structlog.get_logger("vlmq.api")
CHUNK = 1000  # results read per Redis round trip while finalizing


def file_key(tenant: str, file_id: str) -> str:
    return f"files/{tenant}/{file_id}"


def derived_file_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


def live_counts(lines: int, c: BatchCounts) -> RequestCounts:
    return RequestCounts(total=lines, completed=c.succeeded, failed=c.failed + c.cancelled + c.expired)


class Driver:
    def __init__(self, settings: ApiSettings, records: Records, storage: Storage, client: Client) -> None:
        self.s, self.records, self.storage, self.client = settings, records, storage, client

    async def run(self) -> None:
        """Forever: one pass over the active batches and the expired files per tick. A
        pass that fails (Redis or S3 away) is logged and tried again next tick."""
        while True:
            try:
                await self.tick()
            except Exception as exc:  # infrastructure: the next tick tries again
                log.warning("batch pass failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.s.tick_s)

    async def tick(self) -> None:
        for batch_id in await self.records.active():
            if await self.records.lease(batch_id, self.s.replica_id, self.s.lease_s):
                try:
                    async with self._holding(batch_id):
                        await self.step(batch_id)
                except Exception as exc:  # S3 or Redis failed under this batch: next tick repeats it
                    log.warning("batch step failed", batch=batch_id, error=f"{type(exc).__name__}: {exc}")
        await self.sweep_files()

    @contextlib.asynccontextmanager
    async def _holding(self, batch_id: str) -> AsyncIterator[None]:
        """Renew the lease while a long step (a 50,000-line finalization) runs."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.s.lease_s / 3)
                await self.records.lease(batch_id, self.s.replica_id, self.s.lease_s)

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def step(self, batch_id: str) -> None:
        got = await self.records.batch(batch_id)
        if got is None:
            return
        tenant, b = got
        now = time.time()
        if b.status in ("validating", "in_progress") and b.expires_at and now >= b.expires_at:
            await self._stop_requests(tenant, b)
            await self.finalize(tenant, b, "expired")
        elif b.status == "validating":
            await self.validate(tenant, b)
        elif b.status == "in_progress":
            await self.advance(tenant, b)
        elif b.status == "cancelling":
            await self.wind_down(tenant, b)
        elif b.status == "finalizing":
            await self.finalize(tenant, b, "completed")

    # -- validating ------------------------------------------------------------------------

    async def validate(self, tenant: str, b: Batch) -> None:
        """Read every line; any bad one fails the batch (OpenAI's rule), with its number."""
        found = await self.records.file(tenant, b.input_file_id)
        if found is None:
            await self._fail(tenant, b, [BatchError("file_not_found", "the input file was deleted")])
            return
        obj, key = found
        errors: list[BatchError] = []
        n_bad = n_ok = 0
        served: set[str] = set()
        async for item in self._items(b.id, key, obj.bytes):
            if isinstance(item, BadLine):
                n_bad += 1
                if len(errors) < self.s.max_batch_errors:
                    errors.append(BatchError(item.code, item.reason, item.line, _param(item)))
            else:
                n_ok += 1
                served.add(item.model or "")
        if n_bad:
            if n_bad > len(errors):
                errors.append(
                    BatchError("too_many_errors", f"{n_bad} lines are invalid; the first are listed")
                )
            await self._fail(tenant, b, errors)
        elif n_ok == 0:
            await self._fail(tenant, b, [BatchError("empty_file", "the input file has no requests")])
        else:
            await self._start(tenant, b, n_ok, sorted(served))

    async def _items(
        self, batch_id: str, key: str, size: int, start: int = 0, first_line: int = 1
    ) -> AsyncGenerator[Any, None]:
        """The file's lines from byte `start` as jobs (model mapped, batch priority; their
        line number and the offset after the line in metadata) or BadLines."""
        reader = OpenAIReader(batch_id, allow_https=self.s.allow_https)
        n = first_line - 1
        async with contextlib.aclosing(self.storage.lines(key, start, size)) as lines:
            async for line, offset in lines:
                n += 1
                item = reader.line(n, line)
                if item is None:
                    continue
                if isinstance(item, Job):
                    item = self._mapped(item, n, offset)
                yield item

    def _mapped(self, job: Job, n: int, offset: int) -> Job | BadLine:
        served = self.s.served(job.model)
        if served is None:
            shown = (job.model or "")[:80]
            why = f"model {shown!s} is not served here (GET /v1/models lists the models)"
            return BadLine(n, why, job.metadata.get("custom_id"), "model_not_found")
        meta = {**job.metadata, "line": str(n), "offset": str(offset)}
        return msgspec.structs.replace(job, model=served, priority=self.s.batch_priority, metadata=meta)

    async def _fail(self, tenant: str, b: Batch, errors: list[BatchError]) -> None:
        failed = msgspec.structs.replace(
            b, status="failed", failed_at=int(time.time()), errors=Errors(errors)
        )
        await self.records.move(tenant, failed, ("validating",))
        log.info("batch failed validation", batch=b.id, errors=len(errors))

    async def _start(self, tenant: str, b: Batch, lines: int, served: list[str]) -> None:
        await self.records.set_progress(b.id, lines=lines, submitted=0, next_offset=0, next_line=1)
        started = msgspec.structs.replace(
            b,
            status="in_progress",
            in_progress_at=int(time.time()),
            request_counts=RequestCounts(total=lines),
            model=served[0] if len(served) == 1 else b.model,
        )
        moved = await self.records.move(
            tenant, started, ("validating",), queued=lines, limit=self.s.tenant_max_queued
        )
        if moved is None:  # the tenant's queue is full: this batch fails, nothing was sent
            why = f"the batch would take the tenant's queued requests past {self.s.tenant_max_queued}"
            await self._fail(tenant, b, [BatchError("request_limit_exceeded", why)])
        elif moved:
            log.info("batch validated", batch=b.id, requests=lines)

    # -- in progress -----------------------------------------------------------------------

    async def advance(self, tenant: str, b: Batch) -> None:
        """Top up the batch's window; finalize once every request has ended."""
        p = await self.records.progress(b.id)
        counts = await self.client.store.batch_counts(b.id)
        if p["submitted"] < p["lines"]:
            room = self.s.batch_window - (p["submitted"] - counts.finished)
            if room > 0:
                await self._submit(tenant, b, p, room)
        elif counts.finished >= p["lines"]:
            finalizing = msgspec.structs.replace(b, status="finalizing", finalizing_at=int(time.time()))
            if await self.records.move(tenant, finalizing, ("in_progress",)):
                await self.finalize(tenant, finalizing, "completed")

    async def _submit(self, tenant: str, b: Batch, p: dict[str, int], room: int) -> None:
        found = await self.records.file(tenant, b.input_file_id)
        if found is None:  # deleted under a running batch (the API refuses that; a TTL may not)
            await self._stop(tenant, b)
            return
        obj, key = found
        jobs: list[Job] = []
        # aclosing: leaving the loop early must close the S3 body now, not when the
        # generator is collected (each open body holds one of the client's connections).
        async with contextlib.aclosing(
            self._items(b.id, key, obj.bytes, p["next_offset"], p["next_line"])
        ) as items:
            async for item in items:
                if isinstance(item, Job):  # every line was checked while validating
                    # Past the window a worker ends it `expired` rather than starting it.
                    # The tenant is the API key's, recorded with the job: the cache's scope.
                    job = msgspec.structs.replace(item, deadline=b.expires_at)
                    jobs.append(with_tenant(job, tenant))
                    if len(jobs) >= room:
                        break
        if not jobs:
            return
        await self.client.submit_many(jobs, chunk=CHUNK)
        last = jobs[-1].metadata
        await self.records.set_progress(
            b.id,
            submitted=p["submitted"] + len(jobs),
            next_offset=int(last["offset"]),
            next_line=int(last["line"]) + 1,
        )

    # -- cancelling and expiry -------------------------------------------------------------

    async def _stop(self, tenant: str, b: Batch) -> None:
        stopped = msgspec.structs.replace(b, status="cancelling", cancelling_at=int(time.time()))
        await self.records.move(tenant, stopped, ("validating", "in_progress"))

    async def wind_down(self, tenant: str, b: Batch) -> None:
        """Ask the workers to cancel what was sent; finalize when it all ended, or after the grace."""
        p = await self.records.progress(b.id)
        if not p.get("cancel_sent"):
            await self._stop_requests(tenant, b)
            await self.records.set_progress(b.id, cancel_sent=1)
        counts = await self.client.store.batch_counts(b.id)
        waited = time.time() - (b.cancelling_at or 0)
        if counts.finished >= p.get("submitted", 0) or waited >= self.s.cancel_grace_s:
            await self.finalize(tenant, b, "cancelled")

    async def _stop_requests(self, tenant: str, b: Batch) -> None:
        """Cancel every submitted request that has not ended."""
        p = await self.records.progress(b.id)
        if not p.get("submitted"):
            return
        store = self.client.store
        async for ids in self._submitted_ids(tenant, b, p):
            for r, job_id in zip(await store.get_many(ids), ids, strict=True):
                if r is None or not r.state.terminal:
                    await store.cancel(job_id)

    async def _submitted_ids(self, tenant: str, b: Batch, p: dict[str, int]) -> AsyncIterator[list[str]]:
        found = await self.records.file(tenant, b.input_file_id)
        if found is None:
            return
        obj, key = found
        ids: list[str] = []
        async with contextlib.aclosing(self._lines(b.id, key, obj.bytes)) as lines:
            async for job_id, _custom_id, line_end in lines:
                if line_end > p.get("next_offset", 0):
                    break
                ids.append(job_id)
                if len(ids) >= CHUNK:
                    yield ids
                    ids = []
        if ids:
            yield ids

    async def _lines(self, batch_id: str, key: str, size: int) -> AsyncGenerator[tuple[str, str, int], None]:
        """(job id, custom id, offset after the line) of every request line."""
        async with contextlib.aclosing(self._items(batch_id, key, size)) as items:
            async for item in items:
                if isinstance(item, Job):
                    yield item.job_id, item.metadata["custom_id"], int(item.metadata["offset"])

    # -- finalizing ------------------------------------------------------------------------

    async def finalize(self, tenant: str, b: Batch, end: str) -> None:
        """Write the output and error files (in input order), then move to `end` once."""
        found = await self.records.file(tenant, b.input_file_id)
        p = await self.records.progress(b.id)
        out = self.storage.writer(file_key(tenant, derived_file_id(b.id, "output")))
        err = self.storage.writer(file_key(tenant, derived_file_id(b.id, "error")))
        counts, usage = RequestCounts(), BatchUsage()
        try:
            if found is not None:
                await self._write_results(b, found[1], found[0].bytes, end, out, err, counts, usage)
            out_id = await self._file(tenant, b, out, "output", p.get("output_expires_s"))
            err_id = await self._file(tenant, b, err, "error", p.get("output_expires_s"))
        except BaseException:
            await out.abort()
            await err.abort()
            raise
        now = int(time.time())
        stamp = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[end]
        ended = msgspec.structs.replace(
            b,
            status=end,
            output_file_id=out_id,
            error_file_id=err_id,
            request_counts=counts,
            usage=usage,
            **{stamp: now},
        )
        lines = p.get("lines", 0) if b.in_progress_at else 0  # what _start counted as queued
        came_from = ("in_progress", "finalizing", "cancelling", "validating")
        if await self.records.move(tenant, ended, came_from, -lines):
            log.info("batch ended", batch=b.id, status=end, completed=counts.completed, failed=counts.failed)

    async def _write_results(
        self,
        b: Batch,
        key: str,
        size: int,
        end: str,
        out: Writer,
        err: Writer,
        counts: RequestCounts,
        usage: BatchUsage,
    ) -> None:
        enc = msgspec.json.Encoder()
        unfinished = "batch_expired" if end == "expired" else "batch_cancelled"
        chunk: list[tuple[str, str]] = []

        async def flush() -> None:
            results = await self.client.store.get_many([j for j, _ in chunk])
            for (job_id, custom_id), r in zip(chunk, results, strict=True):
                counts.total += 1
                if r is not None and r.state is JobState.SUCCEEDED:
                    counts.completed += 1
                    if r.usage:
                        usage.input_tokens += r.usage.prompt_tokens
                        usage.output_tokens += r.usage.completion_tokens
                    await out.write(enc.encode(openai_output(r, custom_id)) + b"\n")
                    continue
                counts.failed += 1
                # A request the expiry itself stopped (cancelled while it ran) never ran
                # to its end because the window passed: batch_expired, as OpenAI says.
                stopped = r is not None and r.state in (JobState.CANCELLED, JobState.EXPIRED)
                if r is not None and r.state.terminal and not (stopped and end == "expired"):
                    line = openai_output(r, custom_id)
                else:
                    line = openai_line(
                        job_id, custom_id, error={"code": unfinished, "message": UNFINISHED[unfinished]}
                    )
                await err.write(enc.encode(line) + b"\n")
            chunk.clear()

        async for job_id, custom_id, _ in self._lines(b.id, key, size):
            chunk.append((job_id, custom_id))
            if len(chunk) >= CHUNK:
                await flush()
        await flush()
        usage.total_tokens = usage.input_tokens + usage.output_tokens

    async def _file(self, tenant: str, b: Batch, w: Writer, kind: str, expires_s: int | None) -> str | None:
        """Close a result file and record it; None when nothing went into it."""
        if w.size == 0:
            return None
        await w.close()
        now = int(time.time())
        expires = now + expires_s if expires_s else None
        obj = FileObject(
            id=derived_file_id(b.id, kind),
            bytes=w.size,
            created_at=now,
            filename=f"{b.id}_{kind}.jsonl",
            purpose="batch_output",
            expires_at=expires,
        )
        await self.records.put_file(tenant, obj, w.key)
        return obj.id

    # -- files past their expiry ------------------------------------------------------------

    async def sweep_files(self) -> None:
        for tenant, file_id in await self.records.expired_files(time.time()):
            if s3_key := await self.records.drop_file(tenant, file_id):
                await self.storage.delete(s3_key)


def _param(item: BadLine) -> str | None:
    return "custom_id" if item.code == "duplicate_custom_id" else None
