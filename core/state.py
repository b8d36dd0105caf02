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
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

import msgspec
import structlog
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from vlmq.core import joblist, tracing
from vlmq.core.retry import REDIS_FAILOVER
from vlmq.core.scripts import Call, Lanes, Scripts
from vlmq.core.settings import LEASE_S, RESULT_TTL_S
from vlmq.core.topology import AnyRedis
from vlmq.schemas import keys
from vlmq.schemas.codec import decode_result, encode_result
from vlmq.schemas.job import Error, JobState, Result, Timings


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Claim(msgspec.Struct, frozen=True):
    """A claim's answer: `running` with this attempt's number; the job's terminal state; a
    lease another worker holds (`leased_until`: ask again then); or a conflict (the message
    names another batch than the record written at enqueue), or a refusal (`refused`: the
    message is not the one submitted, see `Refused`)."""

    state: JobState | None
    attempt: int = 0
    recorded_batch: str | None = None  # set on a conflict
    leased_until: float | None = None  # set while another worker's lease holds
    cancel_requested: bool = False  # the caller ends it `cancelled` instead of running it
    retry_base: int = 0  # attempts before the job's last retry (max_attempts counts from it)
    refused: str | None = None  # "forged" or "unsubmitted": the message must not run

    @property
    def granted(self) -> bool:
        return (self.state is JobState.RUNNING and self.leased_until is None) or self.cancel_requested

    @property
    def conflict(self) -> bool:
        return self.state is None and self.refused is None


class Refused(Exception):
    """A message that is not the job as submitted: `forged` (its bytes are not the ones the
    submit record's digest names) or `unsubmitted` (no submit record names it). Nothing of
    any job was written; the caller dead-letters the message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CancelReply(msgspec.Struct, frozen=True):
    requested: bool  # the job was queued or running: a worker will end it `cancelled`
    ended: JobState | None  # the state it had already ended in
    found: bool  # False: no record of the job


# (job id, batch id, submitted at, metadata, digest of its message): what `enqueue_many`
# records of one job. The digest (schemas.codec.message_digest) is what a worker checks.
Queued = tuple[str, str | None, float, Mapping[str, str], str]
_META = msgspec.json.Encoder()
_META_DECODE = msgspec.json.Decoder(dict[str, str])


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
    by_code: dict[str, int] = {}  # failed jobs per error code

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.cancelled + self.expired


class StateStore:
    """Job state in Redis. Keys expire after `ttl_s` (a results store without TTLs fills up).

    `coalesce=True` (the worker) batches concurrent claim/finish calls into pipelines, and
    makes them durable: with `wait_replicas`, a call returns only once that many replicas
    have its writes (Redis WAIT), so a failover cannot take back what a worker reported.
    """

    def __init__(
        self,
        redis: AnyRedis,
        *,
        ttl_s: int = RESULT_TTL_S,
        recheck_s: float = 5.0,
        outage_s: float = 60.0,
        coalesce: bool = False,
        wait_replicas: int = 0,
    ):
        self.redis = redis
        self.ttl_s = ttl_s
        self.recheck_s = recheck_s
        self.outage_s = outage_s  # how long waiters ride out a Redis restart
        self.scripts = Scripts(redis, replicas=wait_replicas)
        self._batch = Lanes(self._durable, self.scripts.lane) if coalesce else None

    async def _durable(self, calls: Sequence[Call]) -> list[Any]:
        return await self.scripts.run(calls, durable=True)

    async def _call(self, call: Call) -> Any:
        if self._batch is not None:
            return await self._batch.call(call)
        return await self.scripts.one(call)

    async def _per_slot(
        self,
        script: str,
        jobs: Sequence[str],
        each: Callable[[int], tuple[list[str], list[Any]]],
        head: list[Any],
    ) -> list[tuple[list[int], Any]]:
        """One call of a multi-job script per slot on a cluster (one call in all on a single
        Redis): each (job indexes, reply). `each(i)` gives job i's keys and arguments."""
        groups: dict[int, list[int]] = {}
        for i, job_id in enumerate(jobs):
            groups.setdefault(keys.shard(job_id) if self.scripts.cluster else 0, []).append(i)
        calls = []
        for idx in groups.values():
            parts = [each(i) for i in idx]
            calls.append(
                Call(
                    script, [k for ks, _ in parts for k in ks], head + [a for _, args in parts for a in args]
                )
            )
        replies = await self.scripts.run(calls)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return list(zip(groups.values(), replies, strict=True))

    @tracing.redis("enqueue")
    async def enqueue(
        self,
        job_id: str,
        batch_id: str | None,
        submitted_at: float,
        metadata: Mapping[str, str] | None = None,
        digest: str = "",
    ) -> Enqueued:
        """Record a job as queued, once. Says whether it is new or how far it already got."""
        return (await self.enqueue_many([(job_id, batch_id, submitted_at, metadata or {}, digest)]))[0]

    @tracing.redis("enqueue_many")
    async def enqueue_many(self, items: Sequence[Queued]) -> list[Enqueued]:
        """`enqueue` for many jobs: one script call (per slot on a cluster), one round trip.
        The job's metadata is kept with the record: a job cancelled before any worker saw
        its message still ends with it (its export row keeps its key or custom_id)."""

        def each(i: int) -> tuple[list[str], list[Any]]:
            job_id, batch_id, at, metadata, digest = items[i]
            sub_batch = keys.batch_submitted_key(keys.shard(job_id), batch_id or "")
            meta = _META.encode(metadata) if metadata else b""
            args = [keys.job_key(job_id), batch_id or "", at, meta, digest]
            group = keys.index_group(batch_id, metadata.get(keys.CACHE_SCOPE_FIELD))
            return [keys.submitted_key(job_id), sub_batch, *self._indexes(job_id, group, "all", "open")], args

        out: list[Enqueued | None] = [None] * len(items)
        for idx, replies in await self._per_slot("enqueue", [it[0] for it in items], each, [self.ttl_s]):
            for i, reply in zip(idx, replies, strict=True):
                out[i] = _enqueued(_s(reply))
        return [e for e in out if e is not None]

    @tracing.redis("mark_sent")
    async def mark_sent(self, job_ids: Sequence[str]) -> None:
        """Note that Kafka acknowledged these jobs (one script call per slot)."""
        await self._per_slot("sent", job_ids, lambda i: ([keys.submitted_key(job_ids[i])], []), [])

    async def unqueue(self, items: Sequence[tuple[str, str | None, str | None]]) -> int:
        """Remove the records of (job_id, batch_id, tenant) that no worker took and Kafka
        never acknowledged: a submit whose Kafka write failed leaves nothing behind (not in
        its job list either). Returns how many."""

        def each(i: int) -> tuple[list[str], list[Any]]:
            job_id, batch_id, tenant = items[i]
            sub_batch = keys.batch_submitted_key(keys.shard(job_id), batch_id or "")
            group = keys.index_group(batch_id, tenant)
            return [keys.submitted_key(job_id), sub_batch, *self._indexes(job_id, group, "all", "open")], [
                keys.job_key(job_id),
                batch_id or "",
            ]

        done = await self._per_slot("unqueue", [j for j, _, _ in items], each, [])
        return sum(int(n) for _, n in done)

    @tracing.redis("claim")
    async def claim(
        self,
        job_id: str,
        batch_id: str | None,
        worker: str,
        lease_s: float = LEASE_S,
        *,
        digest: str = "",
        strict: bool = False,
        delivery: str = "",
    ) -> Claim:
        """Take the job for `lease_s` seconds (renew with `lease`), if nobody else holds it
        and the message (`digest`) is the one submitted. `strict`: a job without a submit
        record is refused instead of run. `delivery` names this delivery of the message
        (worker, topic, partition, offset): claiming it again is idempotent (same attempt)."""
        sub_batch = keys.batch_submitted_key(keys.shard(job_id), batch_id or "")
        keys_ = [*self._job_keys(job_id, batch_id), keys.cancel_key(job_id), sub_batch]
        # The job list's head, when it is not the job's own slot (claim.lua's reindex).
        shared = "" if self.scripts.cluster else keys.tag(0)
        head = [worker, time.time(), self.ttl_s, lease_s, "1" if strict else "", shared]
        args = [*head, batch_id or "", digest, delivery]
        st, detail, *base = await self._call(Call("claim", keys_, args))
        match _s(st):
            case "forged" | "unsubmitted" as why:
                return Claim(None, refused=why)
            case "conflict":
                return Claim(None, recorded_batch=_s(detail))
            case "leased":
                return Claim(JobState.RUNNING, leased_until=float(detail))
            case "cancel":
                return Claim(JobState.CANCELLED, int(detail), cancel_requested=True)
        return Claim(JobState(_s(st)), int(detail), retry_base=int(base[0]) if base else 0)

    def _indexes(self, job_id: str, group: str, *buckets: str) -> list[str]:
        """A job's entries in its job list (core/joblist.py: one zset per bucket on a single
        Redis, one per shard on a cluster, where a script writes only its job's slot)."""
        return [keys.index_key(joblist.index_shard(self.redis, job_id), group, b) for b in buckets]

    @staticmethod
    def _job_keys(job_id: str, batch_id: str | None) -> list[str]:
        """job, sub, this shard's batch counters and done list (placeholders without a batch:
        keys in the job's slot that the scripts never touch)."""
        s = keys.shard(job_id)
        return [
            keys.job_key(job_id),
            keys.submitted_key(job_id),
            keys.batch_key(s, batch_id or ""),
            keys.batch_done_key(s, batch_id or ""),
        ]

    async def lease(self, job_ids: Sequence[str], worker: str, lease_s: float) -> int:
        """Renew this worker's leases on running jobs for `lease_s` more seconds; 0 gives
        them up, so another worker may take the jobs at once. Returns how many changed."""
        head = [worker, time.time(), lease_s]
        done = await self._per_slot("lease", job_ids, lambda i: ([keys.job_key(job_ids[i])], []), head)
        return sum(int(n) for _, n in done)

    @tracing.redis("finish")
    async def finish(
        self, result: Result, *, requested: bool = False, digest: str = "", strict: bool = False
    ) -> bool:
        """Write the terminal state. True if this call ended the job (or an earlier call with
        this same record did), False if it had ended. `requested`: end it only if it is
        queued and its cancel was requested (a worker answering a cancel request). With a
        `digest` (a message that was never claimed), raises Refused unless that message is
        the one submitted (`strict`: a job without a submit record is refused too)."""
        assert result.state.terminal, result.state
        group = keys.index_group(result.batch_id, result.metadata.get(keys.CACHE_SCOPE_FIELD))
        code = result.error.code.value if result.error is not None else ""
        buckets = ("all", "open", result.state.value, f"e.{code}" if code else "all")
        keys_ = [
            *self._job_keys(result.job_id, result.batch_id),
            keys.cancel_key(result.job_id),
            *self._indexes(result.job_id, group, *buckets),
        ]
        tm = result.timings
        args: list[Any] = [
            result.job_id,
            result.state.value,
            encode_result(result),
            self.ttl_s,
            keys.done_channel(result.job_id),
            result.batch_id or "",
            "1" if requested else "",
            digest,
            "1" if strict else "",
            (tm and (tm.submitted_at or tm.finished_at)) or time.time(),  # the score if not indexed
            code,
        ]
        wrote, prev = await self._call(Call("finish", keys_, args))
        if not wrote and _s(prev) in ("forged", "unsubmitted"):
            raise Refused(_s(prev))
        return bool(wrote)

    async def cancel(self, job_id: str) -> CancelReply:
        """Ask the workers to cancel a queued or running job (one aborts it, or ends it if
        no worker has it; a producer credential may ask, only a worker writes the state)."""
        keys_ = [keys.submitted_key(job_id), keys.cancel_key(job_id)]
        args = [self.ttl_s, job_id, keys.CANCEL_CHANNEL, keys.job_key(job_id)]
        reply = _s(await self.scripts.one(Call("cancel", keys_, args)))
        return CancelReply(
            reply == "requested",
            None if reply in ("requested", "missing") else JobState(reply),
            reply != "missing",
        )

    async def index_batches(self, batch_ids: Iterable[str], now: float) -> None:
        """Note batches as submitted (first time wins), for the dashboard's list; batches
        older than the results' TTL leave the index as their jobs' keys expire."""
        scores = {b: now for b in batch_ids}
        if not scores:
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.BATCHES_KEY, scores, nx=True)
        pipe.zremrangebyscore(keys.BATCHES_KEY, "-inf", now - self.ttl_s)
        await pipe.execute()

    async def batches(self) -> list[tuple[str, float]]:
        """Every indexed batch with when it was first submitted, newest first."""
        rows: list[Any] = await self.redis.zrevrange(keys.BATCHES_KEY, 0, -1, withscores=True)
        return [(_s(row[0]), float(row[1])) for row in rows]

    async def retry(self, job_ids: Sequence[str]) -> list[str]:
        """Ask for failed jobs to run again (the caller then sends their messages again):
        the ones that were failed and are now marked. A claim takes each mark once, so
        however often a message is resent, one more attempt runs."""
        calls = [Call("retry", [keys.submitted_key(j)], [keys.job_key(j)]) for j in job_ids]
        replies = await self.scripts.run(calls)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return [j for j, r in zip(job_ids, replies, strict=True) if int(r)]

    async def cancel_batch(self, batch_id: str) -> None:
        """Cancel a whole batch: every job of it that a worker claims from now on ends
        `cancelled`, and the workers abort the ones they run. Ended jobs stay as they are."""
        pipe = self.redis.pipeline(transaction=False)
        for shard in range(keys.SHARDS):
            pipe.hset(keys.batch_submitted_key(shard, batch_id), "cancelled", "1")
            pipe.expire(keys.batch_submitted_key(shard, batch_id), self.ttl_s)
        await pipe.execute()
        await self.redis.publish(keys.CANCEL_CHANNEL, keys.batch_cancel_message(batch_id))

    async def batch_cancelled(self, batch_id: str) -> bool:
        return bool(await self.redis.hget(keys.batch_submitted_key(0, batch_id), "cancelled"))

    @tracing.redis("note_dead_letter")
    async def note_dead_letter(self, job_id: str, partition: int, offset: int) -> None:
        await self._call(Call("deadletter", [keys.job_key(job_id)], [f"{partition}:{offset}"]))

    async def _recorded(self, job_id: str) -> tuple[str | None, dict[str, str]]:
        """(batch, metadata) the job's records name: the worker's record, else the submit record."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(keys.job_key(job_id), "batch_id")
        pipe.hmget(keys.submitted_key(job_id), ["batch_id", "metadata"])
        job_batch, (sub_batch, meta) = await pipe.execute()
        found = job_batch or sub_batch
        return (_s(found) if found else None), _metadata(meta)

    @tracing.redis("end_recorded")
    async def end_recorded(
        self,
        job_id: str,
        state: JobState,
        *,
        error: Error | None = None,
        worker: str | None = None,
        requested: bool = False,
        digest: str = "",
        strict: bool = False,
    ) -> bool:
        """End a job in `state`, in the batch its record names (never one a message claims).
        A job without a record is ended without a batch. `requested`, `digest`, `strict`:
        see `finish`."""
        batch_id, metadata = await self._recorded(job_id)
        result = Result(
            job_id=job_id,
            state=state,
            error=error,
            worker=worker,
            batch_id=batch_id,
            metadata=metadata,
            timings=Timings(finished_at=time.time()),
        )
        return await self.finish(result, requested=requested, digest=digest, strict=strict)

    async def exists(self, job_id: str) -> bool:
        """Whether any record of the job exists (one EXISTS: both keys share a slot)."""
        return bool(await self.redis.exists(keys.job_key(job_id), keys.submitted_key(job_id)))

    async def get(self, job_id: str) -> Result | None:
        return (await self.get_many([job_id]))[0]

    async def get_many(self, job_ids: Sequence[str]) -> list[Result | None]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job_key(job_id))
            pipe.hgetall(keys.submitted_key(job_id))
        rows = await pipe.execute()
        return [_to_result(j, rows[2 * i], rows[2 * i + 1]) for i, j in enumerate(job_ids)]

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
            except (RedisConnectionError, RedisTimeoutError, *REDIS_FAILOVER):  # a restart, a failover
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
        """The sum of the batch's partial counters over every shard (one pipeline)."""
        pipe = self.redis.pipeline(transaction=False)
        for shard in range(keys.SHARDS):
            pipe.hget(keys.batch_submitted_key(shard, batch_id), "total")
            pipe.hgetall(keys.batch_key(shard, batch_id))
        rows = await pipe.execute()
        submitted = sum(int(n or 0) for n in rows[0::2])
        c: dict[str, int] = {}
        for row in rows[1::2]:
            for k, v in row.items():
                c[_s(k)] = c.get(_s(k), 0) + int(v)
        total = submitted + c.get("unrecorded", 0)
        fields = {f: c.get(f, 0) for f in ("running", "succeeded", "failed", "cancelled", "expired")}
        by_code = {k[2:]: n for k, n in sorted(c.items()) if k.startswith("e.") and n > 0}
        return BatchCounts(total=total, queued=total - c.get("left", 0), by_code=by_code, **fields)

    async def iter_batch(self, batch_id: str, *, chunk: int = 1000) -> AsyncIterator[Result]:
        """Every ended job of a batch, shard by shard, in the order they ended in each;
        streams in chunks."""
        for shard in range(keys.SHARDS):
            key, start = keys.batch_done_key(shard, batch_id), 0
            while ids := [_s(x) for x in await self.redis.lrange(key, start, start + chunk - 1)]:
                for result in await self.get_many(ids):
                    if result is not None:
                        yield result
                start += len(ids)


async def follow(redis: AnyRedis, channel: str, handle: Callable[[str], None], what: str) -> None:
    """Forever: each message on `channel` to `handle`, its payload as text (anyone may
    publish there: `handle` must take any text). A dropped connection or a Redis restart
    drops the subscription: one warning, then subscribe again a second later."""
    while True:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(channel)
            async for message in pubsub.listen():
                if message["type"] == "message" and isinstance(message["data"], bytes):
                    handle(message["data"].decode("utf-8", "replace"))
        except (OSError, RedisError) as exc:
            structlog.get_logger("vlmq.state").warning(f"{what} reconnecting", error=repr(exc))
            await asyncio.sleep(1)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated


async def _subscribe(pubsub: PubSub, channels: list[str]) -> None:
    for i in range(0, len(channels), 1000):  # bounded command size
        await pubsub.subscribe(*channels[i : i + 1000])


def _enqueued(reply: str) -> Enqueued:
    if reply == "new":
        return Enqueued(JobState.QUEUED, sent=False, new=True)
    state, _, sent = reply.rpartition(":")
    return Enqueued(JobState(state), sent=sent == "1")


def _to_result(job_id: str, job: dict[Any, Any], sub: dict[Any, Any]) -> Result | None:
    """A job from the worker's record (running or ended), else from the submit record
    (queued). State and result come only from the worker's: a producer cannot forge them."""
    if not job and not sub:
        return None
    w = {_s(k): v for k, v in job.items()}
    p = {_s(k): v for k, v in sub.items()}
    if "record" in w:
        return decode_result(w["record"])
    batch_id = w.get("batch_id") if w else p.get("batch_id")
    submitted, started = p.get("submitted_at"), w.get("started_at")
    return Result(
        job_id=job_id,
        state=JobState(_s(w["state"])) if "state" in w else JobState.QUEUED,
        attempt=int(w.get("attempt", 0)),
        worker=_s(w["worker"]) if "worker" in w else None,
        batch_id=_s(batch_id) if batch_id else None,
        metadata=_metadata(p.get("metadata")),
        timings=Timings(
            submitted_at=float(submitted) if submitted else None,
            started_at=float(started) if started else None,
        ),
    )


def _metadata(raw: Any) -> dict[str, str]:
    """The metadata a submit record keeps; a record that cannot be read counts as none
    (Redis is shared: a stray value must not break reading the job)."""
    if not raw:
        return {}
    try:
        return _META_DECODE.decode(raw)
    except msgspec.DecodeError:
        return {}
