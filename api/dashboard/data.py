"""What the dashboard shows, read from where it already lives: batch counters and job
records in Redis (core/state.py), worker heartbeats (core/workers.py), dead letters in
Kafka. The only state the dashboard adds is a short time series per batch, sampled by
whichever API replica holds the sampler's lease (so the rate, the ETA and the chart are
the same on every replica, and nothing is lost when one restarts).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from vlmq.api.driver import live_counts
from vlmq.api.objects import TERMINAL, Batch, RequestCounts
from vlmq.api.records import P, Records, Tenant
from vlmq.core import joblist, workers
from vlmq.core.state import BatchCounts, StateStore
from vlmq.producer.client import Client
from vlmq.schemas import keys
from vlmq.schemas.codec import decode_dead_letter, decode_job
from vlmq.schemas.errors import VlmqError
from vlmq.schemas.job import DeadLetter, Job, JobState, Result

SERIES_LEN = 720  # samples kept per batch: an hour at the default 5 s
RATE_WINDOW_S = 60.0
KEEP_S = 7 * 24 * 3600  # a batch's series and summary outlive it this long
LISTED = 500  # the newest batches a list shows (sorted and filtered among these)
SUMMARIES = f"{P}:summary"  # hash: batch_id -> its Summary, as the sampler last saw it


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Sample(msgspec.Struct, array_like=True):
    at: float
    finished: int
    failed: int


class BatchRow(msgspec.Struct, kw_only=True):
    id: str
    created_at: float
    counts: BatchCounts
    ended_at: float | None = None
    rate: float = 0.0  # jobs ended per second over the last minute
    eta_s: float | None = None
    status: str = "running"  # queued, running, completed, cancelled; an OpenAI batch's own status
    openai: bool = False
    cancelled: bool = False
    api_counts: RequestCounts | None = None  # an OpenAI batch's request_counts, as GET /v1/batches says

    @property
    def ended(self) -> bool:
        """Nothing more will change: the page stops asking (a retry reopens it)."""
        if self.openai:
            return self.status in TERMINAL
        return self.status in ("completed", "cancelled")

    @property
    def done_pct(self) -> float:
        return 100.0 * self.counts.finished / self.counts.total if self.counts.total else 0.0


class Summary(msgspec.Struct, kw_only=True):
    """A batch as the sampler last saw it: what the list shows."""

    counts: BatchCounts
    rate: float = 0.0
    cancelled: bool = False
    ended_at: float | None = None
    ended: bool = False  # the sampler takes no more points (a retry reopens it)


def _summary(counts: BatchCounts, samples: Sequence[Sample], cancelled: bool) -> Summary:
    ended = None
    if counts.total and counts.finished >= counts.total and samples:
        ended = next((s.at for s in samples if s.finished >= counts.total), samples[-1].at)
    return Summary(counts=counts, rate=_rate(samples), cancelled=cancelled, ended_at=ended)


def _row(batch_id: str, created_at: float, s: Summary, b: Batch | None, lines: int = 0) -> BatchRow:
    """A list or page row: an OpenAI batch shows its own status and the API's counts, a
    bulk one its counts'."""
    c = s.counts
    left = c.total - c.finished
    openai_status = b.status if b is not None else None
    return BatchRow(
        id=batch_id,
        created_at=created_at,
        counts=c,
        ended_at=s.ended_at,
        rate=s.rate,
        eta_s=left / s.rate if s.rate > 0 and left > 0 else None,
        status=openai_status or _status(c, s.cancelled),
        openai=openai_status is not None,
        cancelled=s.cancelled,
        api_counts=None if b is None else _api_counts(b, lines, c),
    )


def _api_counts(b: Batch, lines: int, c: BatchCounts) -> RequestCounts:
    """What GET /v1/batches/{id} answers: the final counts once it ended, else live ones
    over every line of its file (not only the window submitted so far)."""
    if b.status in TERMINAL or b.status == "validating":
        return b.request_counts
    return live_counts(lines, c)


def over_lines(c: BatchCounts, lines: int) -> BatchCounts:
    """An OpenAI batch's counts over all its lines: the driver submits a window at a time,
    so the jobs' own counters know only the lines sent so far."""
    total = max(lines, c.total)
    return msgspec.structs.replace(c, total=total, queued=total - c.finished - c.running)


def series_key(batch_id: str) -> str:
    return f"{P}:series:{batch_id}"


def _rate(samples: Sequence[Sample]) -> float:
    """Jobs ended per second over the last minute of samples."""
    if len(samples) < 2:
        return 0.0
    last = samples[-1]
    first = next((s for s in samples if s.at >= last.at - RATE_WINDOW_S), samples[0])
    span = last.at - first.at
    return (last.finished - first.finished) / span if span > 0 else 0.0


class Board:
    """Reads for the pages, and the few writes they may ask for (cancel, retry)."""

    def __init__(self, client: Client, records: Records, dlq_topic: str) -> None:
        self.client, self.records = client, records
        self.store: StateStore = client.store
        self.letters = DeadLetters(client.settings.kafka_bootstrap, dlq_topic)

    async def close(self) -> None:
        await self.letters.close()

    # -- batches --------------------------------------------------------------------------

    async def batch_ids(self, t: Tenant) -> list[tuple[str, float]]:
        """(id, created) of the batches `t` may see: all of them for an admin key, else
        the tenant's own OpenAI batches."""
        if t.admin:
            return await self.store.batches()
        ids = await self.records.redis.zrevrange(f"{P}:batches:{t.name}", 0, -1, withscores=True)
        return [(_s(row[0]), float(row[1])) for row in ids]

    async def visible(self, t: Tenant, batch_id: str) -> bool:
        if t.admin:
            return True
        return await self.records.batch(batch_id, t.name) is not None

    async def counts(self, batch_id: str) -> tuple[BatchCounts, Batch | None, int]:
        """The batch's counts, its OpenAI record (None: a bulk batch) and its lines."""
        counts = await self.store.batch_counts(batch_id)
        found = await self.records.batch(batch_id)
        if found is None:
            return counts, None, 0
        lines = (await self.records.progress(batch_id)).get("lines", 0)
        return over_lines(counts, lines), found[1], lines

    async def row(self, batch_id: str, created_at: float) -> BatchRow:
        """One batch, read live (the batch page)."""
        counts, b, lines = await self.counts(batch_id)
        samples = await self.samples(batch_id)
        cancelled = await self.store.batch_cancelled(batch_id)
        return _row(batch_id, created_at, _summary(counts, samples, cancelled), b, lines)

    async def rows(self, t: Tenant, limit: int = LISTED) -> list[BatchRow]:
        """The newest `limit` batches `t` may see, from the sampler's summaries (a list of
        many batches costs one read each, not one per shard each); a batch not sampled
        yet is read live."""
        ids = (await self.batch_ids(t))[:limit]
        if not ids:
            return []
        redis = self.records.redis
        pipe = redis.pipeline(transaction=False)
        pipe.hmget(SUMMARIES, [b for b, _ in ids])
        for b, _ in ids:
            pipe.hget(f"{P}:batch:{b}", "obj")
        summaries, *objs = await pipe.execute()
        out = []
        for (b, at), raw, obj in zip(ids, summaries, objs, strict=True):
            if raw is None:
                out.append(await self.row(b, at))
            else:
                summary = msgspec.json.decode(raw, type=Summary)
                batch = msgspec.json.decode(obj, type=Batch) if obj else None
                out.append(_row(b, at, summary, batch, summary.counts.total))
        return out

    async def samples(self, batch_id: str) -> list[Sample]:
        raw = await self.records.redis.lrange(series_key(batch_id), 0, -1)
        return [msgspec.json.decode(r, type=Sample) for r in raw]

    async def sample(self, batch_id: str, created_at: float) -> Summary:
        """One more point of the batch's series and its summary for the list (the
        sampler's, under its lease); the first point comes after a zero at the batch's
        start, so even a short batch has a line."""
        c, b, _ = await self.counts(batch_id)
        redis = self.records.redis
        key = series_key(batch_id)
        pipe = redis.pipeline(transaction=False)
        if not await redis.exists(key):
            pipe.rpush(key, msgspec.json.encode(Sample(created_at, 0, 0)))
        pipe.rpush(key, msgspec.json.encode(Sample(time.time(), c.finished, c.failed)))
        pipe.ltrim(key, -SERIES_LEN, -1)
        pipe.expire(key, KEEP_S)
        await pipe.execute()
        summary = _summary(c, await self.samples(batch_id), await self.store.batch_cancelled(batch_id))
        if b is not None:  # an OpenAI batch ends when its own status says so
            ended = b.completed_at or b.expired_at or b.cancelled_at or b.failed_at
            summary.ended_at = float(ended) if b.status in TERMINAL and ended else None
            summary.ended = b.status in TERMINAL
        else:
            summary.ended = bool(c.total and c.finished >= c.total)
        await redis.hset(SUMMARIES, batch_id, msgspec.json.encode(summary))
        return summary

    # -- failures, jobs -------------------------------------------------------------------

    def failures(self, counts: BatchCounts) -> list[FailureGroup]:
        """Failed jobs per error code, from the batch's counters (finish.lua keeps them):
        no job is read. The jobs themselves are a page of the job list away."""
        return [FailureGroup(code, n) for code, n in sorted(counts.by_code.items(), key=lambda kv: -kv[1])]

    async def job(self, job_id: str) -> JobView | None:
        result = await self.store.get(job_id)
        if result is None:
            return None
        raw = await self.records.redis.hgetall(keys.job_key(job_id))
        fields = {_s(k): _s(v) for k, v in raw.items() if _s(k) != "record"}
        dead = await self.dead_letter(fields.get("dead_letter"))
        job = _job_of(dead)
        if job is not None and job.job_id != job_id:  # never show another message as this job's
            dead, job = None, None
        return JobView(result=result, fields=fields, dead=dead, job=job)

    async def dead_letter(self, position: str | None) -> DeadLetter | None:
        if not position or ":" not in position:
            return None
        p, _, o = position.partition(":")
        return await self.letters.get(int(p), int(o))

    # -- actions --------------------------------------------------------------------------

    async def retry(
        self,
        batch_id: str,
        code: str | None = None,
        progress: Callable[[RetryReport], Awaitable[None]] | None = None,
    ) -> RetryReport:
        """Run a batch's failed jobs (all, or those of one error code) once more: their
        messages, read back from the dead letters, are sent again. A claim takes each
        retry mark once, so a double click, two operators or a resend after a crash still
        give each job one more attempt, and one more terminal write. The failed jobs come
        from the batch's failed (or error code) index, a chunk at a time: O(failed)."""
        report = RetryReport()
        group, bucket = keys.index_group(batch_id, None), f"e.{code}" if code else "failed"
        w = joblist.Window()
        while True:
            entries, nxt = await joblist.page(self.store.redis, group, bucket, w, 500)
            got = await self.store.get_many([j for _, j in entries])
            await self.retry_jobs([r for r in got if r is not None and r.state is JobState.FAILED], report)
            if progress is not None:
                await progress(report)
            if nxt is None:
                return report
            w = joblist.Window(cursor=nxt)

    async def retry_jobs(self, failed: Sequence[Result], report: RetryReport) -> None:
        """Retry these failed jobs (see `retry`), 500 to a round trip."""
        for i in range(0, len(failed), 500):
            originals = await self._originals(failed[i : i + 500], report)
            marked = set(await self.store.retry([m[0] for m in originals]))
            again = [m for m in originals if m[0] in marked]
            report.skipped += len(originals) - len(again)
            await self.client.resend(again)
            report.resent += len(again)

    async def _originals(
        self, failed: Sequence[Result], report: RetryReport
    ) -> list[tuple[str, bytes, bytes | None]]:
        """(job id, message) as submitted, from their dead letters: the very bytes, whose
        digest the submit record holds. The ones that cannot be read back (a dead letter gone
        with the topic's retention, cut at 256 KiB, or not this job's) are counted."""
        pipe = self.records.redis.pipeline(transaction=False)
        for r in failed:
            pipe.hget(keys.job_key(r.job_id), "dead_letter")
        out = []
        for r, pos in zip(failed, await pipe.execute(), strict=True):
            dead = await self.dead_letter(_s(pos) if pos else None)
            job = _job_of(dead)
            if dead is None or job is None or job.job_id != r.job_id:
                report.unreadable += 1
            else:
                ct = dead.content_type.encode("latin-1") if dead.content_type is not None else None
                out.append((r.job_id, dead.payload, ct))
        return out

    async def cancel(self, batch_id: str) -> None:
        await self.store.cancel_batch(batch_id)

    # -- workers --------------------------------------------------------------------------

    async def workers(self) -> list[workers.Beat]:
        return await workers.alive(self.records.redis)

    async def lag(self, group: str, topic: str) -> list[PartitionLag]:
        return await lag(self.client.settings.kafka_bootstrap, group, topic)


class FailureGroup(msgspec.Struct):
    code: str
    count: int = 0


class JobView(msgspec.Struct):
    result: Result
    fields: dict[str, str]
    dead: DeadLetter | None
    job: Job | None


class RetryReport(msgspec.Struct):
    resent: int = 0
    skipped: int = 0  # no longer failed (retried already, or cancelled meanwhile)
    unreadable: int = 0


class PartitionLag(msgspec.Struct):
    partition: int
    committed: int | None
    end: int

    @property
    def lag(self) -> int:
        return self.end - (self.committed or 0)


def _status(c: BatchCounts, cancelled: bool) -> str:
    if c.total and c.finished >= c.total:
        return "cancelled" if cancelled and c.cancelled else "completed"
    if cancelled:
        return "cancelling"
    return "queued" if c.finished == 0 and c.running == 0 else "running"


def _job_of(dead: DeadLetter | None) -> Job | None:
    if dead is None or (dead.payload_size or 0) > len(dead.payload):
        return None
    try:
        return decode_job(dead.payload)
    except VlmqError:  # the message was never a job (that is why it is a dead letter)
        return None


class DeadLetters:
    """Reads dead letters back by position: one consumer, no group, assigned by hand;
    dead letters never change, so the last few hundred are kept in memory."""

    def __init__(self, bootstrap: str, topic: str, cache: int = 512) -> None:
        self.bootstrap, self.topic, self.size = bootstrap, topic, cache
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self._cache: OrderedDict[tuple[int, int], DeadLetter | None] = OrderedDict()

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def get(self, partition: int, offset: int) -> DeadLetter | None:
        if (partition, offset) in self._cache:
            return self._cache[(partition, offset)]
        async with self._lock:
            consumer = await self._started()
            tp = TopicPartition(self.topic, partition)
            consumer.assign([tp])
            consumer.seek(tp, offset)
            got = await consumer.getmany(tp, timeout_ms=2000, max_records=1)
        records = [m for m in got.get(tp, []) if m.offset == offset]
        dead = decode_dead_letter(records[0].value) if records and records[0].value else None
        self._cache[(partition, offset)] = dead
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return dead

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


async def lag(bootstrap: str, group: str, topic: str) -> list[PartitionLag]:
    """Per partition of `topic`: the group's committed offset and the end offset, read by
    a consumer of that group that never joins it (assigned by hand: the members are not
    disturbed). The end is the high watermark of a fetch at the committed offset, with
    ListOffsets as the floor: tansu's ListOffsets counts record batches, not records."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()  # with no topic of its own, its metadata has every topic
    try:
        parts = consumer.partitions_for_topic(topic) or await _partitions(consumer, topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        committed = {tp: await consumer.committed(tp) for tp in tps}
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        for tp in tps:  # one record back: a fetch that returns none may carry no watermark
            consumer.seek(tp, max((committed[tp] or 0) - 1, 0))
        await consumer.getmany(*tps, timeout_ms=500, max_records=len(tps))
        return [
            PartitionLag(tp.partition, committed[tp], max(ends.get(tp, 0), consumer.highwater(tp) or 0))
            for tp in tps
        ]
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()  # aiokafka: no public refresh
    return consumer.partitions_for_topic(topic) or set()
