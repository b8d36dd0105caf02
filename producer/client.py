"""The producer SDK: submit jobs to Kafka, follow them in Redis.

    async with Client() as client:            # VLMQ_KAFKA_BOOTSTRAP, VLMQ_REDIS_URL
        handle = await client.submit(caption("s3://photos/cat.jpg"))
        result = await client.wait(handle.job_id, timeout=60)

Submitting is idempotent: the job id is the key. A job whose record says it is running or
ended is not sent again, and a worker never runs an ended job, so re-submitting after a
crash or a timeout is always safe. Kafka writes use acks=all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NoBrokersAvailable,
    RequestTimedOutError,
)
from redis.exceptions import AuthenticationError, RedisClusterException, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from vlmq.core import tracing
from vlmq.core.retry import REDIS_FAILOVER
from vlmq.core.settings import Connection, redact_url
from vlmq.core.state import BatchCounts, StateStore
from vlmq.core.topology import connect_redis, wrong_topology
from vlmq.producer.builders import with_tenant
from vlmq.producer.errors import (
    BatchNotFound,
    Denied,
    JobCancelled,
    JobExpired,
    JobFailed,
    JobNotFound,
    Timeout,
    Unavailable,
    ValidationError,
)
from vlmq.schemas import keys
from vlmq.schemas.codec import MSGPACK, decode_job, encode_job, message_digest
from vlmq.schemas.errors import VlmqError
from vlmq.schemas.job import Job, JobState, Result


class Handle(msgspec.Struct, frozen=True):
    job_id: str
    sent: bool  # False: the job was already running or ended, nothing was sent again
    state: JobState


class _Sent(msgspec.Struct):
    """A chunk handed to the producer, its acknowledgements not yet awaited."""

    jobs: list[Job] = msgspec.field(default_factory=list)
    acks: list[asyncio.Future[Any]] = msgspec.field(default_factory=list)
    ids: list[str] = msgspec.field(default_factory=list)
    new: list[str] = msgspec.field(default_factory=list)  # records this chunk created


class SubmitReport(msgspec.Struct):
    sent: int = 0
    skipped: int = 0  # already running or ended (a resumed bulk submit skips these)


def validated(job: Job, content_type: bytes = MSGPACK) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Encode a job, and prove it decodes: a Struct built in Python skips the constraints."""
    value, headers = encode_job(job, content_type=content_type)
    try:
        decode_job(value, content_type)
    except VlmqError as exc:
        raise ValidationError(f"job {job.job_id}: {exc.message}") from None
    return value, headers


class Client:
    def __init__(
        self,
        kafka_bootstrap: str | None = None,
        redis_url: str | None = None,
        *,
        topic: str | None = None,
        settings: Connection | None = None,
        content_type: bytes = MSGPACK,
        ttl_s: int | None = None,
        kafka_options: dict[str, Any] | None = None,
        redis_options: dict[str, Any] | None = None,
    ) -> None:
        """Arguments left out come from `settings`, else from `VLMQ_*` env vars (the same
        `Connection` the worker loads). `kafka_options` go to AIOKafkaProducer on top of the
        settings' TLS/SASL; `redis_options` to `Redis.from_url` (e.g. socket_timeout:
        redis-py's default gives up on a command after 5 s and 3 retries, too soon for a
        machine that is starved of CPU)."""
        overrides = {
            "kafka_bootstrap": kafka_bootstrap,
            "redis_url": redis_url,
            "jobs_topic": topic,
            "result_ttl_s": ttl_s,
        }
        self.settings = msgspec.structs.replace(
            settings or Connection.load(), **{k: v for k, v in overrides.items() if v is not None}
        )
        self.content_type = content_type
        self._kafka_options = kafka_options or {}
        tracing.use_host_provider()  # an application's own OpenTelemetry setup, if it made one
        self._producer: AIOKafkaProducer | None = None
        self._producer_lock = asyncio.Lock()  # concurrent first submits start one producer
        self.redis = connect_redis(self.settings, **(redis_options or {}))
        self.store = StateStore(self.redis, ttl_s=self.settings.result_ttl_s)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        await self.redis.aclose()

    @contextlib.contextmanager
    def _reaching_redis(self) -> Iterator[None]:
        """Redis connection failures as `Unavailable`, naming the address (no password)."""
        try:
            yield
        except AuthenticationError as exc:  # it answered: not "is it up?"
            raise Denied("Redis", redact_url(self.settings.redis_url), exc) from exc
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise Unavailable("Redis", redact_url(self.settings.redis_url), exc) from exc
        except REDIS_FAILOVER as exc:
            hint = "a Redis failover is under way: try again in a few seconds"
            raise Unavailable("Redis", redact_url(self.settings.redis_url), exc, hint) from exc
        except (ResponseError, RedisClusterException) as exc:
            raise wrong_topology(exc, self.settings) or exc from exc

    @contextlib.contextmanager
    def _reaching_kafka(self) -> Iterator[None]:
        """Kafka not answering as `Unavailable`, naming the bootstrap address: refused or
        dropped connections, and a broker that stalls (its requests time out). Errors
        aiokafka calls retriable are the cluster not serving either, once its own retries
        are spent."""
        try:
            yield
        except KafkaError as exc:
            stalled = isinstance(exc, KafkaConnectionError | KafkaTimeoutError | RequestTimedOutError)
            if not (stalled or isinstance(exc, NoBrokersAvailable) or exc.retriable):
                raise
            raise Unavailable("Kafka", self.settings.kafka_bootstrap, exc) from exc

    async def _kafka(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        async with self._producer_lock:
            return await self._start_producer()

    async def _start_producer(self) -> AIOKafkaProducer:
        if self._producer is None:  # another caller may have started it while this one waited
            # No idempotent producer: tansu's memory storage rejects it, and the job id
            # de-duplicates downstream anyway.
            # linger_ms and max_batch_size are defaults (an online service may want
            # linger_ms=0); acks=all is not negotiable: a submitted job is a stored job.
            options: dict[str, Any] = {"linger_ms": 5, "max_batch_size": 1 << 20}
            options |= self.settings.kafka_options() | self._kafka_options
            options |= {"acks": "all", "enable_idempotence": False}
            producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, **options)
            try:
                with self._reaching_kafka():
                    await producer.start()
            except BaseException:
                await producer.stop()  # a half-started producer leaks its connections
                raise
            self._producer = producer
        return self._producer

    # -- submit -----------------------------------------------------------------------

    async def submit(self, job: Job) -> Handle:
        """Send one job (waits for the broker's ack). Safe to repeat with the same job id.
        Raises Unavailable when Redis or Kafka does not answer; a job whose record was made
        but that Kafka did not take has its record removed again."""
        job = msgspec.structs.replace(job, submitted_at=job.submitted_at or time.time())
        job = with_tenant(job, self.settings.tenant)
        value, headers = validated(job, self.content_type)
        with tracing.producing(self.settings.jobs_topic, job.job_id, job.batch_id):
            return await self._submit(job, value, tracing.inject(headers))

    async def _submit(self, job: Job, value: bytes, headers: list[tuple[str, bytes]]) -> Handle:
        try:
            producer = await self._kafka()  # Kafka first: an unreachable broker leaves no record
        except Unavailable as exc:
            raise exc.not_submitted(job.job_id) from exc.cause
        with self._reaching_redis():
            got = await self.store.enqueue(
                job.job_id,
                job.batch_id,
                job.submitted_at or 0,
                job.metadata,
                message_digest(value, self.content_type),
            )
        if not got.must_send:
            return Handle(job.job_id, False, got.state)
        try:
            with self._reaching_kafka():
                await producer.send_and_wait(
                    self.settings.jobs_topic, value, key=job.job_id.encode(), headers=headers
                )
        except BaseException as exc:
            if got.new:
                await self._unqueue([job], [job.job_id])
            if isinstance(exc, Unavailable):
                raise exc.not_submitted(job.job_id) from exc.cause
            raise
        with self._reaching_redis():
            await self.store.mark_sent([job.job_id])
        return Handle(job.job_id, True, JobState.QUEUED)

    @tracing.traced("vlmq.submit_many")  # each job's trace links to this span (tracing.created)
    async def submit_many(
        self,
        jobs: Iterable[Job],
        *,
        chunk: int = 2000,
        progress: Callable[[SubmitReport], None] | None = None,
    ) -> SubmitReport:
        """Send many jobs: per chunk one Redis call and one batched produce. A chunk's
        acknowledgements are awaited while the next chunk is prepared, so memory stays
        bounded by two chunks whatever the number of jobs. `progress` is called with the
        running totals after each chunk is acknowledged."""
        report = SubmitReport()
        in_flight: _Sent | None = None
        for buf in _chunks(jobs, chunk):
            sending = await self._send_chunk(buf, report)
            await self._settle(in_flight, report, progress)
            in_flight = sending
        await self._settle(in_flight, report, progress)
        return report

    async def resend(self, messages: Sequence[tuple[str, bytes, bytes | None]]) -> None:
        """Send (job id, message, content type) again for jobs whose records exist (a retry:
        see StateStore.retry), without a new submit record; returns once Kafka acknowledged
        every one. Each must be the message as submitted, header too (a dead letter's
        payload and content_type): a worker runs only the one whose digest is recorded."""
        producer = await self._kafka()
        acks = []
        for job_id, value, content_type in messages:
            headers = [("content-type", content_type)] if content_type is not None else []
            with self._reaching_kafka():
                acks.append(
                    await producer.send(self.settings.jobs_topic, value, key=job_id.encode(), headers=headers)
                )
        with self._reaching_kafka():
            await asyncio.gather(*acks)

    async def _send_chunk(self, jobs: Sequence[Job], report: SubmitReport) -> _Sent:
        """Validate, enqueue in Redis, hand to the producer; acks are awaited by `_settle`."""
        now = time.time()
        jobs = [msgspec.structs.replace(j, submitted_at=j.submitted_at or now) for j in jobs]
        jobs = [with_tenant(j, self.settings.tenant) for j in jobs]
        encoded = [validated(j, self.content_type) for j in jobs]
        producer = await self._kafka()
        with self._reaching_redis():
            states = await self.store.enqueue_many(
                [
                    (j.job_id, j.batch_id, now, j.metadata, message_digest(value, self.content_type))
                    for j, (value, _) in zip(jobs, encoded, strict=True)
                ]
            )
            await self.store.index_batches({j.batch_id for j in jobs if j.batch_id}, now)
        sent = _Sent(jobs=list(jobs))
        for job, (value, headers), got in zip(jobs, encoded, states, strict=True):
            if not got.must_send:
                report.skipped += 1
                continue
            with self._reaching_kafka(), tracing.created(self.settings.jobs_topic, job.job_id, job.batch_id):
                sent.acks.append(
                    await producer.send(
                        self.settings.jobs_topic,
                        value,
                        key=job.job_id.encode(),
                        headers=tracing.inject(headers),
                    )
                )
            sent.ids.append(job.job_id)
            if got.new:
                sent.new.append(job.job_id)
        return sent

    async def _settle(
        self, sent: _Sent | None, report: SubmitReport, progress: Callable[[SubmitReport], None] | None
    ) -> None:
        if sent is None:
            return
        acked = await asyncio.gather(*sent.acks, return_exceptions=True)
        failed = {j for j, a in zip(sent.ids, acked, strict=True) if isinstance(a, BaseException)}
        with self._reaching_redis():
            await self.store.mark_sent([j for j in sent.ids if j not in failed])
        report.sent += len(sent.ids) - len(failed)
        if failed:  # what Kafka did not take must not look queued: its new records go again
            await self._unqueue(sent.jobs, [j for j in sent.new if j in failed])
            error = next(a for a in acked if isinstance(a, BaseException))
            with self._reaching_kafka():
                raise error
        if progress is not None:
            progress(report)

    async def _unqueue(self, jobs: Sequence[Job], job_ids: Sequence[str]) -> None:
        of = {j.job_id: j for j in jobs}
        with self._reaching_redis():
            await self.store.unqueue(
                [(j, of[j].batch_id, of[j].metadata.get(keys.CACHE_SCOPE_FIELD)) for j in job_ids]
            )

    # -- follow -----------------------------------------------------------------------

    async def status(self, job_id: str) -> Result:
        """The job's record now (any state). Raises JobNotFound."""
        with self._reaching_redis():
            result = await self.store.get(job_id)
        if result is None:
            raise JobNotFound(job_id)
        return result

    async def result(self, job_id: str) -> Result:
        """The terminal Result of a succeeded job; raises if it failed, was cancelled, expired,
        or has not ended (Timeout with timeout 0)."""
        result = await self.status(job_id)
        if not result.state.terminal:
            raise Timeout(job_id, 0, result.state.value)
        return _raise_for_state(result)

    async def wait(self, job_id: str, timeout: float | None = None) -> Result:
        """Block until the job ends (pub/sub, no polling storm). Raises Timeout, JobFailed,
        JobCancelled, JobExpired, JobNotFound, Unavailable."""
        with self._reaching_redis():
            if not await self.store.exists(job_id):
                raise JobNotFound(job_id)
            result = await self.store.wait(job_id, timeout)
            if result is None:
                now = await self.store.get(job_id)
                raise Timeout(job_id, timeout, now.state.value if now else None)
        return _raise_for_state(result)

    async def as_completed(
        self, job_ids: Iterable[str], *, timeout: float | None = None
    ) -> AsyncIterator[Result]:
        """Each job's terminal Result as it ends, whatever the state (no exceptions)."""
        ids = list(job_ids)
        expected, seen = len(set(ids)), 0
        with self._reaching_redis():
            async with contextlib.aclosing(self.store.as_completed(ids, timeout=timeout)) as results:
                async for result in results:
                    seen += 1
                    yield result
        if seen < expected:
            raise Timeout(f"{expected - seen} of {expected} jobs", timeout)

    async def wait_many(self, job_ids: Iterable[str], timeout: float | None = None) -> list[Result]:
        """Terminal Results in the order of `job_ids` (states not raised: check each)."""
        ids = list(job_ids)
        got = {r.job_id: r async for r in self.as_completed(ids, timeout=timeout)}
        return [got[i] for i in ids]

    async def cancel(self, job_id: str) -> bool:
        """Ask for a queued or running job to be cancelled: a worker aborts it, or ends it
        if none has taken it yet (`wait` then says JobCancelled). False when it had already
        ended or is unknown (`status` tells which)."""
        with self._reaching_redis():
            return (await self.store.cancel(job_id)).requested

    async def cancel_batch(self, batch_id: str) -> BatchCounts:
        """Cancel every unfinished job of a batch: workers abort the ones they run, and
        each queued one ends `cancelled` when a worker reaches it; ended jobs stay as they
        are. Returns the counts before. Raises BatchNotFound."""
        counts = await self.batch(batch_id)
        if counts.finished < counts.total:
            with self._reaching_redis():
                await self.store.cancel_batch(batch_id)
        return counts

    async def batch(self, batch_id: str) -> BatchCounts:
        """A batch's counts per state. Raises BatchNotFound for a batch nobody submitted to."""
        with self._reaching_redis():
            counts = await self.store.batch_counts(batch_id)
        if counts.total == 0:
            raise BatchNotFound(batch_id)
        return counts

    async def iter_results(self, batch_id: str) -> AsyncIterator[Result]:
        """Every ended job of a batch, streamed shard by shard (in end order within each)."""
        with self._reaching_redis():
            async for result in self.store.iter_batch(batch_id):
                yield result


def _chunks(jobs: Iterable[Job], size: int) -> Iterator[list[Job]]:
    buf: list[Job] = []
    for job in jobs:
        buf.append(job)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def _raise_for_state(result: Result) -> Result:
    if result.state is JobState.SUCCEEDED:
        return result
    if result.state is JobState.CANCELLED:
        raise JobCancelled(result)
    if result.state is JobState.EXPIRED:
        raise JobExpired(result)
    raise JobFailed(result)
