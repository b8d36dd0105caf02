"""The Redis half of the contract: job records, their state machine, waiting, batches.

Every transition runs one Lua script (core/lua/), so it is atomic and idempotent and the
first terminal write wins. Shared by the SDK (enqueue, cancel, wait) and the worker (claim,
finish). Completion is announced on a pub/sub channel per job; waiters subscribe first and
then read the state, and re-read it every `recheck_s` in case a message was missed (a Redis
restart drops subscriptions), so nobody polls in a tight loop and nobody waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from importlib import resources
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from vlmq.core.settings import LEASE_S, RESULT_TTL_S
from vlmq.schemas import keys
from vlmq.schemas.codec import decode_result, encode_result
from vlmq.schemas.job import Error, JobState, Result, Timings


def _lua(name: str) -> str:
    return resources.files("vlmq.core.lua").joinpath(f"{name}.lua").read_text()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Claim(msgspec.Struct, frozen=True):
    """A claim's answer: `running` with this attempt's number; the job's terminal state; a
    lease another worker holds (`leased_until`: ask again then); or a conflict (the message
    names another batch than the record written at enqueue)."""

    state: JobState | None
    attempt: int = 0
    recorded_batch: str | None = None  # set on a conflict
    leased_until: float | None = None  # set while another worker's lease holds

    @property
    def granted(self) -> bool:
        return self.state is JobState.RUNNING and self.leased_until is None

    @property
    def conflict(self) -> bool:
        return self.state is None


class Enqueued(msgspec.Struct, frozen=True):
    state: JobState
    sent: bool  # Kafka acknowledged it before
    new: bool = False

    @property
    def must_send(self) -> bool:
        """Send unless it was acknowledged before or has started: re-submits never duplicate."""
        return self.state is JobState.QUEUED and not self.sent


class BatchCounts(msgspec.Struct):
    total: int = 0
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.cancelled + self.expired


class _Coalescer:
    """Sends the script calls of all concurrent callers as one pipeline per loop tick.

    A worker holds hundreds of jobs; each claims and finishes through a Lua script. One
    round trip (and one pooled connection) each would cap throughput at the pool and the
    network; batched, a tick's worth of calls costs one round trip. A failed pipeline fails
    every caller in it, and each caller retries on its own.
    """

    def __init__(self, redis: Redis, max_batch: int = 1000) -> None:
        self.redis = redis
        self.max_batch = max_batch
        self._pending: list[tuple[AsyncScript, list[str], list[Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def call(self, script: AsyncScript, keys_: list[str], args: list[Any]) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((script, keys_, args, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let every task runnable this tick add its call
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            pipe = self.redis.pipeline(transaction=False)
            for script, keys_, args, _ in batch:
                await script(keys_, args, client=pipe)
            try:
                replies = await pipe.execute(raise_on_error=False)
            except Exception as exc:  # the connection failed: every caller sees it
                replies = [exc] * len(batch)
            for (*_, fut), reply in zip(batch, replies, strict=True):
                if fut.done():
                    continue
                if isinstance(reply, BaseException):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)


class StateStore:
    """Job state in Redis. Keys expire after `ttl_s` (a results store without TTLs fills up).

    `coalesce=True` (the worker) batches concurrent claim/finish calls into pipelines.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        ttl_s: int = RESULT_TTL_S,
        recheck_s: float = 5.0,
        outage_s: float = 60.0,
        coalesce: bool = False,
    ):
        self.redis = redis
        self.ttl_s = ttl_s
        self.recheck_s = recheck_s
        self.outage_s = outage_s  # how long waiters ride out a Redis restart
        self._enqueue = redis.register_script(_lua("enqueue"))
        self._claim = redis.register_script(_lua("claim"))
        self._finish = redis.register_script(_lua("finish"))
        self._sent = redis.register_script(_lua("sent"))
        self._unqueue = redis.register_script(_lua("unqueue"))
        self._lease = redis.register_script(_lua("lease"))
        self._batch = _Coalescer(redis) if coalesce else None

    async def _script(self, script: AsyncScript, keys_: list[str], args: list[Any]) -> Any:
        if self._batch is not None:
            return await self._batch.call(script, keys_, args)
        return await script(keys_, args)

    @staticmethod
    def _batch_keys(batch_id: str | None) -> list[str]:
        if not batch_id:  # a key under the prefix (ACLs), never touched: the scripts check the id
            return [keys.NO_BATCH, keys.NO_BATCH]
        return [keys.batch_key(batch_id), keys.batch_done_key(batch_id)]

    async def enqueue(self, job_id: str, batch_id: str | None, submitted_at: float) -> Enqueued:
        """Record a job as queued, once. Says whether it is new or how far it already got."""
        return (await self.enqueue_many([(job_id, batch_id, submitted_at)]))[0]

    async def enqueue_many(self, items: Sequence[tuple[str, str | None, float]]) -> list[Enqueued]:
        """`enqueue` for many jobs in one script call (one round trip, one command)."""
        keys_: list[str] = []
        args: list[Any] = [self.ttl_s]
        for job_id, batch_id, at in items:
            keys_ += [keys.job_key(job_id), self._batch_keys(batch_id)[0]]
            args += [batch_id or "", at]
        replies = await self._enqueue(keys_, args) if items else []
        return [_enqueued(_s(r)) for r in replies]

    async def mark_sent(self, job_ids: Sequence[str]) -> None:
        """Note that Kafka acknowledged these jobs (one script call)."""
        if job_ids:
            await self._sent([keys.job_key(j) for j in job_ids])

    async def unqueue(self, items: Sequence[tuple[str, str | None]]) -> int:
        """Remove the records of (job_id, batch_id) that are queued and were never sent:
        a submit whose Kafka write failed leaves nothing behind. Returns how many."""
        if not items:
            return 0
        keys_ = [
            k for job_id, batch_id in items for k in (keys.job_key(job_id), self._batch_keys(batch_id)[0])
        ]
        return int(await self._unqueue(keys_, [batch_id or "" for _, batch_id in items]))

    async def claim(self, job_id: str, batch_id: str | None, worker: str, lease_s: float = LEASE_S) -> Claim:
        """Take the job for `lease_s` seconds (renew with `lease`), if nobody else holds it."""
        keys_ = [keys.job_key(job_id), self._batch_keys(batch_id)[0]]
        args = [batch_id or "", worker, time.time(), self.ttl_s, lease_s]
        st, detail = await self._script(self._claim, keys_, args)
        if _s(st) == "conflict":
            return Claim(None, recorded_batch=_s(detail))
        if _s(st) == "leased":
            return Claim(JobState.RUNNING, leased_until=float(detail))
        return Claim(JobState(_s(st)), int(detail))

    async def lease(self, job_ids: Sequence[str], worker: str, lease_s: float) -> int:
        """Renew this worker's leases on running jobs for `lease_s` more seconds; 0 gives
        them up, so another worker may take the jobs at once. Returns how many changed."""
        if not job_ids:
            return 0
        return int(await self._lease([keys.job_key(j) for j in job_ids], [worker, time.time(), lease_s]))

    async def finish(self, result: Result) -> bool:
        """Write the terminal state. True if this call ended the job, False if it had ended."""
        assert result.state.terminal, result.state
        keys_ = [keys.job_key(result.job_id), *self._batch_keys(result.batch_id)]
        args = [
            result.job_id,
            result.state.value,
            encode_result(result),
            self.ttl_s,
            keys.done_channel(result.job_id),
            result.batch_id or "",
        ]
        wrote, _prev = await self._script(self._finish, keys_, args)
        return bool(wrote)

    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job (running ones are aborted by their worker)."""
        ended = await self.end_recorded(job_id, JobState.CANCELLED, must_exist=True)
        if ended:
            await self.redis.publish(keys.CANCEL_CHANNEL, job_id)
        return ended

    async def end_recorded(
        self,
        job_id: str,
        state: JobState,
        *,
        error: Error | None = None,
        worker: str | None = None,
        must_exist: bool = False,
    ) -> bool:
        """End a job in `state`, in the batch its record names (never one a message claims).
        A job without a record is ended without a batch, unless `must_exist`."""
        st, batch_id = await self.redis.hmget(keys.job_key(job_id), ["state", "batch_id"])
        if st is None and must_exist:
            return False
        result = Result(
            job_id=job_id,
            state=state,
            error=error,
            worker=worker,
            batch_id=_s(batch_id) if batch_id else None,
            timings=Timings(finished_at=time.time()),
        )
        return await self.finish(result)

    async def get(self, job_id: str) -> Result | None:
        return (await self.get_many([job_id]))[0]

    async def get_many(self, job_ids: Sequence[str]) -> list[Result | None]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job_key(job_id))
        rows = await pipe.execute()
        return [_to_result(j, h) for j, h in zip(job_ids, rows, strict=True)]

    async def terminal_writes(self, job_id: str) -> int:
        """How often the terminal transition ran for a job: 1 for every ended job, always."""
        n = await self.redis.hget(keys.job_key(job_id), "terminal_writes")
        return int(n or 0)

    async def wait(self, job_id: str, timeout: float | None = None) -> Result | None:
        """The job's terminal Result, or None if it did not end within `timeout` seconds."""
        # aclosing: leaving the loop early must unsubscribe now, not when the GC runs.
        async with contextlib.aclosing(self.as_completed([job_id], timeout=timeout)) as results:
            async for result in results:
                return result
        return None

    async def as_completed(
        self, job_ids: Iterable[str], *, timeout: float | None = None
    ) -> AsyncGenerator[Result, None]:
        """Yield each job's terminal Result as it ends (already ended ones first). After the
        first read, only the jobs a completion message named are read again, and all pending
        ones once per re-check interval (a message can be missed: Redis pub/sub has no replay).

        A Redis restart or a dropped connection is ridden out for up to `outage_s`: the
        waiter reconnects, subscribes again and re-reads every pending job; after that the
        connection error is raised."""
        pending = set(job_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        job_of = {keys.done_channel(j): j for j in pending}
        down_since: float | None = None
        while pending:
            pubsub: PubSub = self.redis.pubsub()
            try:
                await _subscribe(pubsub, list(job_of))
                down_since, to_read = None, set(pending)
                while pending:
                    for result in await self._ended(to_read & pending):
                        pending.discard(result.job_id)
                        yield result
                    news = await self._await_news(pubsub, deadline) if pending else None
                    if news is None:
                        return
                    to_read = {job_of[c] for c in news if c in job_of} or pending
            except (RedisConnectionError, RedisTimeoutError):
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.outage_s:
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    return
                await asyncio.sleep(0.5)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated

    async def _ended(self, pending: set[str]) -> list[Result]:
        ids = list(pending)
        out: list[Result] = []
        for i in range(0, len(ids), 1000):
            chunk = await self.get_many(ids[i : i + 1000])
            out.extend(r for r in chunk if r is not None and r.state.terminal)
        return out

    async def _await_news(self, pubsub: PubSub, deadline: float | None) -> set[str] | None:
        """The channels of the completion messages that arrived together; an empty set when
        the re-check interval passed without one; None once timed out."""
        end = time.monotonic() + self.recheck_s
        if deadline is not None:
            if deadline <= time.monotonic():
                return None
            end = min(end, deadline)
        # Subscribe confirmations arrive as messages too: only a completion wakes us.
        while (left := end - time.monotonic()) > 0:
            msg = await pubsub.get_message(timeout=left)
            if msg is not None and msg["type"] == "message":
                news = set()
                while msg is not None:  # drain what arrived together, then read those once
                    news.add(_s(msg["channel"]))
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
                return news
        return set()

    async def batch_counts(self, batch_id: str) -> BatchCounts:
        raw = await self.redis.hgetall(keys.batch_key(batch_id))
        return msgspec.convert({_s(k): int(v) for k, v in raw.items()}, BatchCounts)

    async def iter_batch(self, batch_id: str, *, chunk: int = 1000) -> AsyncIterator[Result]:
        """Every ended job of a batch, in the order they ended; streams in chunks."""
        key = keys.batch_done_key(batch_id)
        start = 0
        while True:
            ids = [_s(x) for x in await self.redis.lrange(key, start, start + chunk - 1)]
            if not ids:
                return
            for result in await self.get_many(ids):
                if result is not None:
                    yield result
            start += len(ids)


async def _subscribe(pubsub: PubSub, channels: list[str]) -> None:
    for i in range(0, len(channels), 1000):  # bounded command size
        await pubsub.subscribe(*channels[i : i + 1000])


def _enqueued(reply: str) -> Enqueued:
    if reply == "new":
        return Enqueued(JobState.QUEUED, sent=False, new=True)
    state, _, sent = reply.rpartition(":")
    return Enqueued(JobState(state), sent=sent == "1")


def _to_result(job_id: str, h: dict[Any, Any]) -> Result | None:
    if not h:
        return None
    row = {_s(k): v for k, v in h.items()}
    if "record" in row:
        return decode_result(row["record"])
    started = row.get("started_at")
    return Result(
        job_id=job_id,
        state=JobState(_s(row["state"])),
        attempt=int(row.get("attempt", 0)),
        worker=_s(row["worker"]) if "worker" in row else None,
        batch_id=_s(row["batch_id"]) if "batch_id" in row else None,
        timings=Timings(
            submitted_at=float(row["submitted_at"]) if "submitted_at" in row else None,
            started_at=float(started) if started else None,
        ),
    )
