"""The worker: consume -> claim -> (pipeline) -> publish -> commit, and its lifecycle.

Delivery is at-least-once and the outcome exactly-once: offsets are committed only over
finished work (ledger.py), and the Redis claim/finish scripts make a redelivered job a
no-op once it has ended. Intake is bounded: when `max_in_flight` jobs are held, the
partitions are paused but the consumer keeps polling, so a slow GPU never looks like a
dead consumer to the group (the failure mode of aiokafka#848).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import ConsumerRecord
from redis.asyncio import Redis
from redis.exceptions import RedisError

from vlmq.core.retry import through_outage, within
from vlmq.core.state import StateStore
from vlmq.schemas import keys
from vlmq.schemas.codec import (
    content_type_of,
    decode_job,
    encode_dead_letter,
    encode_result_msg,
    peek_job_id,
)
from vlmq.schemas.errors import ErrorCode, VlmqError
from vlmq.schemas.job import (
    MAX_DEAD_LETTER_PAYLOAD,
    DeadLetter,
    Error,
    Job,
    JobState,
    Result,
    Timings,
)
from vlmq.worker import metrics
from vlmq.worker.engines import Engine, make_engine
from vlmq.worker.fetch import Fetcher
from vlmq.worker.ledger import OffsetLedger
from vlmq.worker.pipeline import Pipeline
from vlmq.worker.settings import WorkerSettings

log = structlog.get_logger("vlmq.worker")
OUTAGE_S = 300.0  # how long a Redis or Kafka outage is ridden out before the worker gives up


def make_redis(settings: WorkerSettings) -> Redis:
    """The worker's Redis client: short socket timeouts, retried by `through_outage`."""
    return Redis.from_url(
        settings.redis_url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=15
    )


def make_producer(settings: WorkerSettings) -> AIOKafkaProducer:
    """Results and dead letters: acks=all. No idempotence: tansu's memory storage refuses
    it, and the job id de-duplicates downstream anyway."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=False,
        **settings.kafka_options(),
    )


def make_consumer(settings: WorkerSettings) -> AIOKafkaConsumer:
    """Manual commits only (the ledger decides what is done); the group heartbeats at a
    quarter of the session timeout."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.group_id,
        client_id=settings.worker_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.session_timeout_ms // 4,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        **settings.kafka_options(),
    )


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka has no type hints: an Any base
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker.hand_back(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.worker.assignments += 1
        log.info(
            "partitions assigned",
            partitions=sorted(tp.partition for tp in assigned),
            generation=self.worker.assignments,
        )


class Worker:
    """One worker process's loop. The engine and the three clients can be handed in (tests,
    benchmarks, a shared engine); by default they are built from the settings."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: Engine | None = None,
        *,
        redis: Callable[[WorkerSettings], Redis] = make_redis,
        producer: Callable[[WorkerSettings], AIOKafkaProducer] = make_producer,
        consumer: Callable[[WorkerSettings], AIOKafkaConsumer] = make_consumer,
    ) -> None:
        self.settings = settings
        self._make_redis, self._make_producer, self._make_consumer = redis, producer, consumer
        self.engine = engine or make_engine(settings.engine, settings.model, settings.engine_args)
        self.ledger = OffsetLedger()
        self._tasks: dict[asyncio.Task[None], TopicPartition] = {}
        self._jobs: dict[str, asyncio.Future[Result]] = {}  # job_id -> its pipeline run
        self._user_cancelled: set[str] = set()
        self._slot_freed = asyncio.Event()
        self._stop = asyncio.Event()
        self._fatal: BaseException | None = None
        self._started = False
        self.max_in_flight_seen = 0
        self.assignments = 0  # 1 for a worker that never saw a rebalance

    # -- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful drain (what SIGTERM does)."""
        self._stop.set()

    @property
    def ready(self) -> bool:
        return self._started and not self._stop.is_set() and self.engine.healthy()

    async def run(self) -> int:
        """Serve until stopped; returns the process exit code (0 after a clean drain)."""
        s = self.settings
        log.info("worker starting", **s.redacted())
        redis = self._make_redis(s)
        self.store = StateStore(redis, ttl_s=s.result_ttl_s, coalesce=True)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(redis.aclose)
            await self.engine.start()
            stack.push_async_callback(self.engine.close)
            self.fetcher = await stack.enter_async_context(Fetcher(s))
            self.pipeline = Pipeline(s, self.fetcher, self.engine)
            stack.callback(self.pipeline.close)
            self.producer = self._make_producer(s)
            await self.producer.start()
            stack.push_async_callback(self.producer.stop)
            self.consumer = self._make_consumer(s)
            self.consumer.subscribe([s.jobs_topic], listener=_Rebalance(self))
            await self.consumer.start()
            stack.push_async_callback(self.consumer.stop)
            if s.metrics_port:
                runner = await metrics.serve(s.metrics_port, self.engine.healthy, lambda: self.ready)
                stack.push_async_callback(runner.cleanup)
            return await self._serve()

    async def _serve(self) -> int:
        helpers = [asyncio.create_task(self._commit_loop()), asyncio.create_task(self._cancels())]
        self._started = True
        log.info("worker ready", engine=self.engine.name, model=self.engine.model)
        try:
            await self._intake()
        finally:
            await self._drain()
            for t in helpers:
                t.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self._commit(None)
        if self._fatal is not None:
            log.error("worker stopped on an unrecoverable error", error=repr(self._fatal))
            return 1
        log.info(
            "worker drained and stopped",
            max_in_flight_seen=self.max_in_flight_seen,
            assignments=self.assignments,
        )
        return 0

    # -- intake ---------------------------------------------------------------------------

    async def _intake(self) -> None:
        consumer = self.consumer
        while not self._stop.is_set():
            free = self.settings.max_in_flight - len(self._tasks)
            if free <= 0:
                # Full: stop fetching but keep polling, so the group sees us alive.
                consumer.pause(*consumer.assignment())
                metrics.PAUSED.set(1)
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    await within(self._slot_freed.wait(), 0.5)
                self._start(await consumer.getmany(timeout_ms=0, max_records=1))
                continue
            if consumer.paused():
                consumer.resume(*consumer.paused())
                metrics.PAUSED.set(0)
            try:
                batch = await consumer.getmany(timeout_ms=200, max_records=free)
            except KafkaError as exc:
                log.warning("fetch failed; retrying", error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            self._start(batch)

    def _start(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        assigned = self.consumer.assignment()
        for tp, records in batch.items():
            for msg in records:
                if tp not in assigned:
                    break  # revoked meanwhile: its new owner reads it
                if len(self._tasks) >= self.settings.max_in_flight:
                    self.consumer.seek(tp, msg.offset)  # hand the rest back, unread
                    break
                self.ledger.track(tp, msg.offset)
                task = asyncio.create_task(self._handle(tp, msg))
                self._tasks[task] = tp
                task.add_done_callback(self._task_done)
        self.max_in_flight_seen = max(self.max_in_flight_seen, len(self._tasks))
        metrics.IN_FLIGHT.set(len(self._tasks))

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        metrics.IN_FLIGHT.set(len(self._tasks))
        self._slot_freed.set()

    # -- one message ----------------------------------------------------------------------

    async def _handle(self, tp: TopicPartition, msg: ConsumerRecord) -> None:
        structlog.contextvars.bind_contextvars(partition=tp.partition, offset=msg.offset)
        try:
            await self._process(msg)
        except asyncio.CancelledError:
            return  # shutdown or revocation: not done, the offset stays uncommitted
        except Exception as exc:  # infrastructure gave out past the outage budget
            log.exception("job handling failed; stopping the worker")
            self._fatal = exc
            self._stop.set()
            return
        self.ledger.done(tp, msg.offset)

    async def _process(self, msg: ConsumerRecord) -> None:
        try:
            job = decode_job(msg.value, content_type_of(msg.headers))
        except VlmqError as exc:
            await self._undecodable(msg, exc)
            return
        structlog.contextvars.bind_contextvars(job_id=job.job_id)
        claim = await through_outage(
            lambda: self.store.claim(job.job_id, job.batch_id, self.settings.worker_id), OUTAGE_S
        )
        if not claim.granted:
            metrics.SKIPPED.inc()
            log.debug("skipped: already ended", state=claim.state.value)
            return
        result: Result | None
        if job.deadline is not None and time.time() > job.deadline:
            result = self.pipeline.result(
                job,
                JobState.EXPIRED,
                claim.attempt,
                error=Error(ErrorCode.TIMEOUT, "deadline passed before the job started"),
            )
        else:
            result = await self._run_cancellable(job, claim.attempt)
            if result is None:
                return  # cancelled by the user: the cancel already wrote the terminal state
        await self._publish(job, result, msg)

    async def _run_cancellable(self, job: Job, attempt: int) -> Result | None:
        run = asyncio.ensure_future(self.pipeline.run(job, attempt))
        self._jobs[job.job_id] = run
        try:
            return await run
        except asyncio.CancelledError:
            if run.cancelled() and job.job_id in self._user_cancelled:
                return None
            run.cancel()
            raise
        finally:
            self._jobs.pop(job.job_id, None)
            self._user_cancelled.discard(job.job_id)

    async def _publish(self, job: Job, result: Result, msg: ConsumerRecord) -> None:
        """Terminal state to Redis; then result topic and dead letter, before the commit."""
        wrote = await through_outage(lambda: self.store.finish(result), OUTAGE_S)
        if not wrote:
            metrics.SKIPPED.inc()
            return
        metrics.JOBS.labels(result.state.value).inc()
        if result.state is JobState.FAILED and result.error:
            # Here, where every job's failure is written (invalid JSON output included).
            metrics.ERRORS.labels(result.error.code.value).inc()
        log.info(
            "job ended", state=result.state.value, error=result.error.code.value if result.error else None
        )
        if job.result_topic:
            value, headers = encode_result_msg(result)
            await through_outage(
                lambda: self.producer.send_and_wait(
                    job.result_topic, value, key=job.job_id.encode(), headers=headers
                ),
                OUTAGE_S,
            )
        if result.state is JobState.FAILED and result.error:
            await self._dead_letter(msg, result.error, job.job_id)

    async def _undecodable(self, msg: ConsumerRecord, exc: VlmqError) -> None:
        job_id = peek_job_id(msg.value, msg.key)
        log.warning("undecodable message", code=exc.code.value, error=exc.message, job_id=job_id)
        error = Error(exc.code, exc.message, exc.retryable)
        metrics.ERRORS.labels(exc.code.value).inc()
        if job_id and len(job_id) <= 160:
            result = Result(
                job_id=job_id,
                state=JobState.FAILED,
                error=error,
                worker=self.settings.worker_id,
                timings=Timings(finished_at=time.time()),
            )
            wrote = await through_outage(lambda: self.store.finish(result), OUTAGE_S)
            if not wrote:
                return
            metrics.JOBS.labels("failed").inc()
        await self._dead_letter(msg, error, job_id)

    async def _dead_letter(self, msg: ConsumerRecord, error: Error, job_id: str | None) -> None:
        payload = msg.value or b""
        dead = DeadLetter(
            error=error,
            topic=msg.topic,
            partition=msg.partition,
            offset=msg.offset,
            payload=payload[:MAX_DEAD_LETTER_PAYLOAD],
            payload_size=len(payload),
            job_id=job_id,
            worker=self.settings.worker_id,
            at=time.time(),
        )
        value, headers = encode_dead_letter(dead)
        key = job_id.encode() if job_id else None
        await through_outage(
            lambda: self.producer.send_and_wait(self.settings.dlq_topic, value, key=key, headers=headers),
            OUTAGE_S,
        )
        metrics.DEAD_LETTERS.inc()

    # -- cancel, commit, revoke, drain ---------------------------------------------------

    async def _cancels(self) -> None:
        """Abort in-flight jobs cancelled by a client (the cancel wrote `cancelled` already)."""
        while True:
            try:
                pubsub = self.store.redis.pubsub()
                await pubsub.subscribe(keys.CANCEL_CHANNEL)
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        self._cancel(message["data"].decode())
            except (OSError, RedisError) as exc:
                log.warning("cancel listener reconnecting", error=repr(exc))
                await asyncio.sleep(1)

    def _cancel(self, job_id: str) -> None:
        run = self._jobs.get(job_id)
        if run is not None and not run.done():
            log.info("aborting cancelled job", job_id=job_id)
            self._user_cancelled.add(job_id)
            run.cancel()

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.commit_interval_s)
            await self._commit(None)
            self._report_lag()
            self._report_engine()

    async def _commit(self, tps: set[TopicPartition] | None) -> None:
        offsets = self.ledger.to_commit(tps if tps is not None else self.consumer.assignment())
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            log.warning("commit failed; will retry", error=repr(exc))
            return
        self.ledger.committed(offsets)
        metrics.COMMITS.inc()

    def _report_engine(self) -> None:
        # Engine counters are best effort: a failing stats() must never stop the commits.
        try:
            metrics.ENGINE_RUNNING.set(self.engine.stats().get("running", 0))
        except Exception as exc:
            log.debug("engine stats failed", error=repr(exc))

    def _report_lag(self) -> None:
        for tp in self.consumer.assignment():
            end = self.consumer.highwater(tp)
            pos = self.ledger.partitions.get(tp)
            if end is not None and pos is not None and pos.committable is not None:
                metrics.LAG.labels(str(tp.partition)).set(max(0, end - pos.committable))

    async def hand_back(self, revoked: set[TopicPartition]) -> None:
        """On revocation: give in-flight work of those partitions a grace period, commit
        what finished, abandon the rest (the new owner re-runs it; the claim dedups)."""
        mine = [t for t, tp in self._tasks.items() if tp in revoked]
        if mine:
            log.info("partitions revoked; finishing in-flight work", jobs=len(mine))
            _, late = await asyncio.wait(mine, timeout=self.settings.revoke_grace_s)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._commit(revoked)
        self.ledger.drop(revoked)

    async def _drain(self) -> None:
        if self._tasks:
            log.info("draining", jobs=len(self._tasks), timeout_s=self.settings.drain_timeout_s)
            _, late = await asyncio.wait(list(self._tasks), timeout=self.settings.drain_timeout_s)
            for t in late:  # handed back: uncommitted, another worker takes them
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)


async def serve(settings: WorkerSettings) -> int:
    """Run a worker until SIGTERM/SIGINT, then drain. Returns the exit code."""
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    return await worker.run()
