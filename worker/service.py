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
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import ConsumerRecord
from redis.exceptions import AuthenticationError, RedisError

from vlmq.core import tracing, workers
from vlmq.core.retry import (
    CredentialsRefused,
    InfrastructureError,
    is_transient,
    retry,
    through_outage,
    within,
)
from vlmq.core.settings import redact_url, refused, unreachable
from vlmq.core.state import Claim, Refused, StateStore, follow
from vlmq.core.topology import (
    AnyRedis,
    Durability,
    TopologyError,
    check_topology,
    connect_redis,
    wait_replicas,
)
from vlmq.schemas import keys
from vlmq.schemas.codec import (
    content_type_of,
    decode_job,
    encode_dead_letter,
    encode_result_msg,
    header_text,
    invalid_job_id,
    is_job_id,
    message_digest,
    peek_job_id,
)
from vlmq.schemas.errors import ErrorCode, VlmqError, describe
from vlmq.schemas.job import (
    MAX_DEAD_LETTER_PAYLOAD,
    DeadLetter,
    Error,
    Job,
    JobState,
    Result,
)
from vlmq.worker import metrics
from vlmq.worker.cache import ResultCache
from vlmq.worker.engines import Engine, EngineDead, make_engine
from vlmq.worker.fetch import Fetcher
from vlmq.worker.ledger import OffsetLedger
from vlmq.worker.pipeline import Pipeline
from vlmq.worker.settings import WorkerSettings

log = structlog.get_logger("vlmq.worker")
T = TypeVar("T")
# What stops a worker: nothing could be served without Redis, Kafka or the engine.
FATAL = (InfrastructureError, EngineDead)
PROBE_S = 5.0  # how often readiness checks Redis
# A job whose Redis call takes longer parks (gives up its in-flight slot): a master that
# lost its replica holds terminal writes 5 s in WAIT, and such jobs filled every slot.
PARK_AFTER_S = 0.5
OUTAGE_S = 300.0  # how long a Redis or Kafka outage is ridden out before the worker gives up
MAX_CANCELLING = 1000  # cancel requests for queued jobs handled at once; more wait for the claim
# After the drain, how long closing the clients, the engine and the pool may take in all: a
# broker or Redis that is gone must not hold a stopping worker (aiokafka retries forever).
CLOSE_S = 5.0
ENGINE_CLOSE_S = 30.0  # the engine is local (a vLLM engine core process to end): its own budget


def make_redis(settings: WorkerSettings) -> AnyRedis:
    """The worker's Redis client: short socket timeouts, retried by `through_outage`."""
    return connect_redis(settings, socket_timeout=10, socket_connect_timeout=5, health_check_interval=15)


def _may_pass(exc: BaseException) -> bool:
    """A fault worth waiting out at start; a refused password is not one (it answered)."""
    return is_transient(exc) and not isinstance(exc, AuthenticationError)


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
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        **settings.kafka_options(),
    )


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka has no type hints: an Any base
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.worker.assigned(set(assigned))
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
        redis: Callable[[WorkerSettings], AnyRedis] = make_redis,
        producer: Callable[[WorkerSettings], AIOKafkaProducer] = make_producer,
        consumer: Callable[[WorkerSettings], AIOKafkaConsumer] = make_consumer,
    ) -> None:
        self.settings = settings
        self._make_redis, self._make_producer, self._make_consumer = redis, producer, consumer
        self.engine = engine or make_engine(settings.engine, settings.model, settings.engine_args)
        self.ledger = OffsetLedger()
        self._tasks: dict[asyncio.Task[None], TopicPartition] = {}
        self._jobs: dict[str, asyncio.Future[Result]] = {}  # job_id -> its pipeline run
        self.ended = 0  # jobs this worker ended (its heartbeat's jobs/s)
        # job_id -> None while one delivery of it is served here; a future once another waits
        self._serving: dict[str, asyncio.Future[None] | None] = {}
        self._batch_of: dict[str, str] = {}  # job_id -> batch_id, of the runs in _jobs
        self._user_cancelled: set[str] = set()
        self._cancelling: set[asyncio.Task[None]] = set()  # ending queued jobs on request
        self._slot_freed = asyncio.Event()
        # Tasks whose Redis calls are being retried (their shard's master is down or has lost
        # its replica): they keep their offsets but not an in-flight slot, so the other
        # shards' jobs keep flowing; at most `max_parked` of them.
        self._parked: set[asyncio.Task[None]] = set()
        # Partitions revoked by a rebalance under way: their jobs keep running until the
        # new assignment says which stay here.
        self._revoked: set[TopicPartition] = set()
        self._releasing: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._now = asyncio.Event()  # a second signal: no more waiting for in-flight jobs
        self._close_by = 0.0  # loop time by which closing must be done (set when it starts)
        self._fatal: BaseException | None = None
        self._started = False
        self._paused = False  # an operator's pause (core/workers.py): no new messages
        self._control = asyncio.Event()  # set when an operator's command may have changed
        self._down: set[str] = set()  # helpers (and services) not working right now
        self.max_in_flight_seen = 0
        self.assignments = 0  # 1 for a worker that never saw a rebalance

    # -- lifecycle ------------------------------------------------------------------------

    def stop(self, *, now: bool = False) -> None:
        """Begin a graceful drain (what SIGTERM does); `now`: hand in-flight jobs back at
        once instead (a second SIGTERM or SIGINT)."""
        self._stop.set()
        if now:
            self._now.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def serving(self) -> bool:
        return self._started

    def not_ready(self) -> list[str]:
        """Why the worker is not serving; empty when it is: started, not draining, engine
        alive, every helper running, Kafka fetches and the latest Redis PING answered."""
        reasons = sorted(self._down)
        if not self.engine.healthy():
            reasons.append("engine")
        if not self._started or self._stop.is_set():
            reasons.append("not serving")
        return reasons

    async def run(self) -> int:
        """Serve until stopped; returns the process exit code (0 after a clean drain)."""
        s = self.settings
        log.info("worker starting", **s.redacted())
        redis = self._make_redis(s)
        self.store = StateStore(redis, ttl_s=s.result_ttl_s, coalesce=True)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self._bounded, "redis", redis.aclose)
            # Redis and the producer first: a wrong address fails in seconds, not after the
            # engine loaded for minutes. The consumer last: joining the group starts the clock.
            await self._reach_redis()
            self.producer = self._make_producer(s)
            # also when start() fails: no leaked sockets
            stack.push_async_callback(self._bounded, "kafka producer", self.producer.stop)
            await self._reach_kafka(self.producer.start)
            await self.engine.start()
            stack.push_async_callback(self._bounded, "engine", self.engine.close, ENGINE_CLOSE_S)
            self.fetcher = await stack.enter_async_context(Fetcher(s))
            cache = ResultCache(redis, s, self.engine) if s.cache else None
            self.pipeline = Pipeline(s, self.fetcher, self.engine, cache)
            stack.callback(self.pipeline.close)
            await self.pipeline.start()
            self.consumer = self._make_consumer(s)
            self.consumer.subscribe([s.jobs_topic], listener=_Rebalance(self))
            stack.push_async_callback(self._bounded, "kafka consumer", self.consumer.stop)
            await self._reach_kafka(self.consumer.start)
            if s.metrics_port:
                runner = await metrics.serve(
                    s.metrics_host, s.metrics_port, self.engine.healthy, self.not_ready
                )
                stack.push_async_callback(self._bounded, "metrics", runner.cleanup)
            return await self._serve()

    async def _bounded(
        self, what: str, close: Callable[[], Awaitable[None]], seconds: float | None = None
    ) -> None:
        """Close one thing within what is left of CLOSE_S, in a task of its own: a client
        whose server is gone may retry forever, or re-raise its own tasks' CancelledError
        (aiokafka's fetcher), and neither may hold the stop or print a traceback."""
        loop = asyncio.get_running_loop()
        if not self._close_by:
            self._close_by = loop.time() + CLOSE_S
        task = asyncio.ensure_future(close())
        left = seconds if seconds is not None else max(self._close_by - loop.time(), 0.1)
        await asyncio.wait([task], timeout=left)
        if not task.done():
            task.cancel()
            log.warning("gave up closing; its server does not answer", what=what)
        elif not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("closing failed", what=what, error=describe(exc))

    async def _reach_redis(self) -> None:
        """Fail at start, in one line, when Redis is not there (rather than 300 s later)."""
        try:
            await retry(
                self.store.redis.ping,
                on=_may_pass,
                seconds=self.settings.start_wait_s,
                max_wait=1.0,
                jitter=0.1,
            )
            await check_topology(self.store.redis, self.settings)
            replicas = await wait_replicas(self.store.redis, self.settings)
            self.durability = Durability(self.store.redis, self.settings, replicas)
            await self._check_durability()
        except TopologyError as exc:
            raise InfrastructureError(str(exc)) from exc
        except AuthenticationError as exc:
            url = redact_url(self.settings.redis_url)
            raise CredentialsRefused(refused("Redis", url, exc)) from exc
        except Exception as exc:
            url = redact_url(self.settings.redis_url)
            raise InfrastructureError(unreachable("Redis", url, exc)) from exc

    async def _reach_kafka(self, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await start()
        except KafkaError as exc:
            where = self.settings.kafka_bootstrap
            raise InfrastructureError(unreachable("Kafka", where, exc)) from exc

    async def _serve(self) -> int:
        helpers = [
            asyncio.create_task(self._supervised("commits", self._commit_loop)),
            asyncio.create_task(self._supervised("cancel listener", self._cancels)),
            asyncio.create_task(self._supervised("redis probe", self._probe_redis)),
            asyncio.create_task(self._supervised("leases", self._renew_leases)),
            asyncio.create_task(self._supervised("heartbeats", self._heartbeats)),
            asyncio.create_task(self._supervised("durability", self._watch_durability)),
            asyncio.create_task(self._supervised("control", self._controls)),
        ]
        self._started = True
        log.info("worker ready", engine=self.engine.name, model=self.engine.model)
        try:
            await self._intake()
        finally:
            await self._drain()
            for t in helpers:
                t.cancel()
            await asyncio.wait(helpers, timeout=CLOSE_S)
            await self._bounded(
                "worker record", lambda: workers.gone(self.store.redis, self.settings.worker_id)
            )
            await self._bounded("last commit", lambda: self._commit(None))
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
            free = self._free_slots()
            if self._paused:
                # An operator's pause: no new messages, in-flight ones go on; the consumer
                # keeps polling (no records: every partition paused), so the group keeps it.
                consumer.pause(*consumer.assignment())
                self._control.clear()
                with contextlib.suppress(TimeoutError):
                    await within(self._control.wait(), 0.5)
                # A partition assigned since the pause() above may have fetched: served, never
                # dropped (its offsets must not move past unhandled messages).
                self._start(await consumer.getmany(timeout_ms=0, max_records=1))
                continue
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
                self._down.add("kafka")
                await asyncio.sleep(0.5)
                continue
            self._down.discard("kafka")
            self._start(batch)

    def _start(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        assigned = self.consumer.assignment()
        for tp, records in batch.items():
            for msg in records:
                if tp not in assigned:
                    break  # revoked meanwhile: its new owner reads it
                if self._free_slots() <= 0:
                    self.consumer.seek(tp, msg.offset)  # hand the rest back, unread
                    break
                self.ledger.track(tp, msg.offset)
                task = asyncio.create_task(self._handle(tp, msg))
                self._tasks[task] = tp
                task.add_done_callback(self._task_done)
        self.max_in_flight_seen = max(self.max_in_flight_seen, len(self._tasks))
        metrics.IN_FLIGHT.set(len(self._tasks))

    def _free_slots(self) -> int:
        working = len(self._tasks) - len(self._parked)
        parked_room = self.settings.max_in_flight + self.settings.max_parked - len(self._tasks)
        return min(self.settings.max_in_flight - working, parked_room)

    async def _redis(self, call: Callable[[], Awaitable[T]]) -> T:
        """A Redis call of this job's, ridden through an outage of its shard; while it is
        retried, or slower than PARK_AFTER_S, the job's task is parked (see `_parked`). One
        log line per failing job (the error names the node), not one per retry: hundreds
        wait at once in a failover."""
        first = asyncio.ensure_future(call())
        try:
            return await asyncio.wait_for(asyncio.shield(first), PARK_AFTER_S)
        except TimeoutError:
            pass  # slow (its node holds WAIT for a replica it lost): wait for it parked
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("waiting for the job's Redis shard", error=describe(exc))
        except BaseException:
            first.cancel()
            raise
        with self._parking():
            if not first.done() or not first.exception():
                try:
                    return await first
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    log.warning("waiting for the job's Redis shard", error=describe(exc))
            return await through_outage(call, OUTAGE_S, quiet=True)

    @contextlib.contextmanager
    def _parking(self) -> Iterator[None]:
        """The current job's task gives up its in-flight slot meanwhile."""
        task = asyncio.current_task()
        parked = task in self._tasks
        if parked:
            self._parked.add(task)  # type: ignore[arg-type]  # a task of _tasks is a Task[None]
            metrics.PARKED.set(len(self._parked))
            self._slot_freed.set()
        try:
            yield
        finally:
            if parked:
                self._parked.discard(task)
                metrics.PARKED.set(len(self._parked))

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._parked.discard(task)
        metrics.PARKED.set(len(self._parked))
        metrics.IN_FLIGHT.set(len(self._tasks))
        self._slot_freed.set()

    # -- one message ----------------------------------------------------------------------

    async def _handle(self, tp: TopicPartition, msg: ConsumerRecord) -> None:
        """One message in its trace's span (tracing.consumed; nothing when tracing is off)."""
        with tracing.consumed(
            msg.topic, tp.partition, msg.offset, msg.headers, msg.timestamp, self.settings.group_id
        ):
            await self._handle_message(tp, msg)

    async def _handle_message(self, tp: TopicPartition, msg: ConsumerRecord) -> None:
        structlog.contextvars.bind_contextvars(partition=tp.partition, offset=msg.offset)
        try:
            await self._process(msg)
        except asyncio.CancelledError:
            return  # shutdown or revocation: not done, the offset stays uncommitted
        except FATAL as exc:  # Redis/Kafka gone past the outage budget, or the engine died
            log.exception("infrastructure lost; stopping the worker")
            self._fatal = exc
            self._stop.set()
            return
        except Exception:  # not even its dead letter could be written: logged, then skipped
            log.exception("message dropped: its failure could not be recorded")
        self.ledger.done(tp, msg.offset)
        tracing.awaiting_commit(msg.topic, tp.partition, msg.offset)

    async def _process(self, msg: ConsumerRecord) -> None:
        """Serve one message. Whatever goes wrong with it ends as its job's failure or a dead
        letter; only FATAL errors (infrastructure, a dead engine) escape."""
        try:
            job = decode_job(msg.value, content_type_of(msg.headers))
        except VlmqError as exc:
            await self._contained(self._reject(msg, Error(exc.code, exc.message, exc.retryable)), msg, None)
            return
        structlog.contextvars.bind_contextvars(job_id=job.job_id)
        if tracing.ON:
            tracing.annotate(
                {"messaging.message.id": job.job_id, "vlmq.job_id": job.job_id, "vlmq.batch_id": job.batch_id}
            )
        await self._contained(self._serve_job(job, msg), msg, job)

    async def _contained(self, step: Coroutine[Any, Any, None], msg: ConsumerRecord, job: Job | None) -> None:
        """Run one message's work; an unexpected error fails its job as `internal`."""
        try:
            await step
        except (asyncio.CancelledError, *FATAL):
            raise
        except Exception as exc:  # a bug, or a library's surprise: this job's failure, not ours
            log.exception("job failed unexpectedly")
            error = Error(ErrorCode.INTERNAL, describe(exc), True)
            await self._fail_recorded(msg, error, job.job_id if job else invalid_job_id(msg.value, msg.key))

    async def _serve_job(self, job: Job, msg: ConsumerRecord) -> None:
        # Two deliveries of one job here (a resend, a retry sent twice) take turns: claimed
        # together in one tick, both would be granted, as this worker's own lease is.
        # Nothing is allocated unless a second delivery comes: then it leaves a future to wake it.
        while job.job_id in self._serving:
            waiting = self._serving[job.job_id] or asyncio.get_running_loop().create_future()
            self._serving[job.job_id] = waiting
            await asyncio.wait([waiting])  # not `await waiting`: a cancelled waiter must not cancel it
        self._serving[job.job_id] = None
        try:
            await self._serve_claimed(job, msg)
        finally:
            self.pipeline.forget(job.job_id)  # a result-cache lead not settled is dropped
            if (woken := self._serving.pop(job.job_id)) is not None and not woken.done():
                woken.set_result(None)

    async def _serve_claimed(self, job: Job, msg: ConsumerRecord) -> None:
        delivery = f"{self.settings.worker_id}:{msg.topic}:{msg.partition}:{msg.offset}"
        claim = await self._claim(job, message_digest(msg.value, content_type_of(msg.headers)), delivery)
        if claim.refused is not None:
            await self._dead_letter(msg, refusal(claim.refused, job.job_id), None)
            return
        if claim.conflict:  # the message is not trusted: no state, no note on the job's record
            error = Error(ErrorCode.FORGED, f"batch_id {job.batch_id!r} is not job {job.job_id}'s batch")
            await self._dead_letter(msg, error, None)
            return
        if not claim.granted:
            metrics.SKIPPED.inc()
            log.debug("skipped: already ended", state=claim.state.value if claim.state else None)
            return
        if claim.cancel_requested:
            result = self.pipeline.result(job, JobState.CANCELLED, claim.attempt)
        else:
            result = self._refused(job, claim) or await self._run_cancellable(job, claim.attempt)
        await self._publish(job, result, msg)

    async def _claim(self, job: Job, digest: str, delivery: str) -> Claim:
        """Claim the job; while someone runs it (here, or a worker whose lease holds), wait:
        it ends (the claim then says so and the job is skipped) or its lease runs out."""
        s = self.settings
        while True:
            claim = await self._redis(
                lambda: self.store.claim(
                    job.job_id,
                    job.batch_id,
                    s.worker_id,
                    s.lease_s,
                    digest=digest,
                    strict=s.require_submit_record,
                    delivery=delivery,
                )
            )
            if claim.leased_until is None:
                return claim
            log.debug("running elsewhere; waiting for its end or its lease", until=claim.leased_until)
            await asyncio.sleep(min(max(claim.leased_until - time.time(), 0.05), s.lease_s) + random.random())

    def _refused(self, job: Job, claim: Claim) -> Result | None:
        """The job's end when it must not run: delivered too often (since its last retry),
        or past its deadline."""
        attempt = claim.attempt
        if attempt - claim.retry_base > self.settings.max_attempts:
            times = attempt - claim.retry_base
            message = f"delivered {times} times without ending (max_attempts {self.settings.max_attempts})"
            return self.pipeline.result(job, JobState.FAILED, attempt, error=Error(ErrorCode.POISON, message))
        if job.deadline is not None and time.time() > job.deadline:
            error = Error(ErrorCode.TIMEOUT, "deadline passed before the job started")
            return self.pipeline.result(job, JobState.EXPIRED, attempt, error=error)
        return None

    async def _run_cancellable(self, job: Job, attempt: int) -> Result:
        run = asyncio.ensure_future(self.pipeline.run(job, attempt))
        self._jobs[job.job_id] = run
        if job.batch_id:
            self._batch_of[job.job_id] = job.batch_id
        try:
            return await run
        except asyncio.CancelledError:
            if run.cancelled() and job.job_id in self._user_cancelled:
                return self.pipeline.result(job, JobState.CANCELLED, attempt)
            run.cancel()
            await self._give_up_lease(job.job_id)  # handed back: its next owner need not wait
            raise
        finally:
            self._jobs.pop(job.job_id, None)
            self._batch_of.pop(job.job_id, None)
            self._user_cancelled.discard(job.job_id)

    async def _publish(self, job: Job, result: Result, msg: ConsumerRecord) -> None:
        """Terminal state to Redis; then result topic and dead letter, before the commit."""
        if tracing.ON:
            tracing.annotate({"vlmq.job.state": result.state.value, "vlmq.job.attempt": result.attempt})
        wrote = await self._redis(lambda: self.store.finish(result))
        await self.pipeline.settle(result, wrote)  # the answer into the result cache, after the write
        if not wrote:
            metrics.SKIPPED.inc()
            return
        metrics.JOBS.labels(result.state.value).inc()
        self.ended += 1
        log.info(
            "job ended", state=result.state.value, error=result.error.code.value if result.error else None
        )
        if job.result_topic and self.pipeline.result_topic_allowed(job.result_topic):
            value, headers = encode_result_msg(result)
            with tracing.producing(job.result_topic, job.job_id, job.batch_id):
                headers = tracing.inject(headers)  # a result consumer may go on with the trace
                await through_outage(
                    lambda: self.producer.send_and_wait(
                        job.result_topic, value, key=job.job_id.encode(), headers=headers
                    ),
                    OUTAGE_S,
                )
        if result.state is JobState.FAILED and result.error:
            await self._dead_letter(msg, result.error, job.job_id, note=True)

    async def _reject(self, msg: ConsumerRecord, error: Error) -> None:
        """A message that is not a valid Job. Its job fails only when the message says for
        certain which job it is (see `invalid_job_id`); otherwise it is a dead letter only."""
        log.warning("invalid message", code=error.code.value, error=error.message)
        await self._fail_recorded(msg, error, invalid_job_id(msg.value, msg.key))

    async def _fail_recorded(self, msg: ConsumerRecord, error: Error, job_id: str | None) -> None:
        """Fail `job_id` (in the batch its record names) if given and this message is the one
        submitted, and dead-letter the message. If even the failure cannot be written, the
        dead letter still is; a message that is not the job as submitted writes nothing."""
        wrote = False
        if job_id is not None:
            try:
                wrote = await self._redis(
                    lambda: self.store.end_recorded(
                        job_id,
                        JobState.FAILED,
                        error=error,
                        worker=self.settings.worker_id,
                        digest=message_digest(msg.value, content_type_of(msg.headers)),
                        strict=self.settings.require_submit_record,
                    )
                )
                if not wrote:
                    return  # it had ended already: its dead letter, if any, exists
                metrics.JOBS.labels("failed").inc()
            except Refused as refused:
                await self._dead_letter(msg, refusal(refused.reason, job_id, error), None)
                return
            except FATAL:
                raise
            except Exception:
                log.exception("could not write the job's failure; dead letter only")
        await self._dead_letter(msg, error, job_id or peek_job_id(msg.value, msg.key), note=wrote)

    async def _dead_letter(
        self, msg: ConsumerRecord, error: Error, job_id: str | None, *, note: bool = False
    ) -> None:
        """Send the message to the dead-letter topic, keyed by the job it names (`job_id`:
        what it says, not proof). `note`: this message's failure was written on that job
        (it is the message submitted), so its record points here: the job's page and a
        retry read the original back. Nothing else may point a job's record at a message."""
        payload = msg.value or b""
        dead = DeadLetter(
            error=error,
            topic=msg.topic,
            partition=msg.partition,
            offset=msg.offset,
            payload=payload[:MAX_DEAD_LETTER_PAYLOAD],
            payload_size=len(payload),
            content_type=header_text(content_type_of(msg.headers)),
            job_id=job_id,
            worker=self.settings.worker_id,
            at=time.time(),
        )
        value, headers = encode_dead_letter(dead)
        metrics.ERRORS.labels(error.code.value).inc()  # every failure has exactly one dead letter
        tracing.fail(error.code.value, error.message)  # the message's span: it ended in the DLQ
        key = job_id.encode() if job_id else None
        with tracing.producing(self.settings.dlq_topic, job_id or "", None):
            sent = await through_outage(
                lambda: self.producer.send_and_wait(self.settings.dlq_topic, value, key=key, headers=headers),
                OUTAGE_S,
            )
        metrics.DEAD_LETTERS.inc()
        if note and job_id is not None:
            await self._redis(lambda: self.store.note_dead_letter(job_id, sent.partition, sent.offset))

    # -- cancel, commit, revoke, drain ---------------------------------------------------

    async def _heartbeats(self) -> None:
        """Say who this worker is and how busy, for the dashboard (core/workers.py)."""
        every, started, last = self.settings.heartbeat_s, time.time(), self.ended
        while True:
            stats = self.engine.stats()
            b = workers.Beat(
                worker=self.settings.worker_id,
                pid=os.getpid(),
                engine=self.engine.name,
                model=self.engine.model,
                started_at=started,
                at=time.time(),
                interval_s=every,
                in_flight=len(self._tasks),
                engine_running=int(stats.get("running", 0)),
                engine_waiting=int(stats.get("waiting", 0)),
                jobs_per_s=round((self.ended - last) / every, 2),
                ended=self.ended,
                gpu_busy=await asyncio.to_thread(workers.gpu_busy),
                partitions=sorted(tp.partition for tp in self.consumer.assignment()),
                control="draining" if self._stop.is_set() else "paused" if self._paused else "",
            )
            last = self.ended
            with contextlib.suppress(RedisError, OSError):  # a missed beat is not an outage
                await workers.beat(self.store.redis, b)
            await asyncio.sleep(every)

    async def _controls(self) -> None:
        """Carry out an operator's pause, resume and drain (core/workers.py): read the
        command at start, on every message naming this worker, and at least every beat."""
        me = self.settings.worker_id
        woken = asyncio.Event()
        listener = asyncio.create_task(
            follow(
                self.store.redis,
                keys.WORKER_CONTROL_CHANNEL,
                lambda w: woken.set() if w == me else None,
                "control listener",
            )
        )
        try:
            while True:
                woken.clear()
                self._obey(await workers.commanded(self.store.redis, me))
                if self._stop.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await within(woken.wait(), self.settings.heartbeat_s)
        finally:
            listener.cancel()

    def _obey(self, command: str) -> None:
        paused = command == "pause"
        if paused != self._paused:
            log.info("paused by an operator" if paused else "resumed by an operator")
            self._paused = paused
            self._control.set()
        if command == "drain" and not self._stop.is_set():
            log.info("draining on an operator's request", jobs=len(self._tasks))
            self.stop()
            self._control.set()
            task = asyncio.create_task(workers.take_drain(self.store.redis, self.settings.worker_id))
            self._cancelling.add(task)  # held, so it is not collected mid-flight
            task.add_done_callback(self._cancelling.discard)

    async def _supervised(self, name: str, helper: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Keep a helper running: a crash is logged and counted, readiness says so, and the
        helper starts again a second later."""
        while True:
            try:
                await helper()
                return
            except Exception as exc:
                if is_transient(exc):  # its server is down: one line, not a traceback a second
                    log.warning("helper waiting for its server", helper=name, error=describe(exc))
                else:
                    log.exception("helper crashed; restarting", helper=name)
                metrics.HELPER_RESTARTS.labels(name).inc()
                self._down.add(name)
                await asyncio.sleep(1)
                self._down.discard(name)

    async def _renew_leases(self) -> None:
        """Keep the leases of the jobs running here alive (a lapsed one lets another worker
        take the job, whose second terminal write would then be refused)."""
        s = self.settings
        while True:
            await asyncio.sleep(s.lease_s / 3)
            try:
                await self.store.lease(list(self._jobs), s.worker_id, s.lease_s)
            except (OSError, RedisError) as exc:
                log.warning("lease renewal failed; retrying", error=repr(exc))

    async def _give_up_lease(self, job_id: str) -> None:
        # Best effort (the lease runs out anyway), bounded by the client's socket timeout.
        with contextlib.suppress(Exception):
            await asyncio.shield(self.store.lease([job_id], self.settings.worker_id, 0))

    async def _watch_durability(self) -> None:
        while True:
            await asyncio.sleep(self.settings.durability_check_s)
            await self._check_durability()

    async def _check_durability(self) -> None:
        """Follow the topology: how many replicas terminal writes wait for, and which masters
        have fewer now (their shards' jobs wait; the rest flow). One log line per change."""
        for change in await self.durability.refresh():
            log.warning("durability", change=change, wait_replicas=self.durability.required)
        self.store.scripts.replicas = self.durability.required
        metrics.WAIT_REPLICAS.set(self.durability.required)
        metrics.MASTERS_SHORT.set(len(self.durability.short))
        self._down.discard("durability")
        if self.durability.short:
            self._down.add("durability")

    async def _probe_redis(self) -> None:
        """Readiness follows Redis: a PING every few seconds."""
        while True:
            try:
                await within(self.store.redis.ping(), 2.0)
                self._down.discard("redis")
            except (TimeoutError, OSError, RedisError):
                self._down.add("redis")
            await asyncio.sleep(PROBE_S)

    async def _cancels(self) -> None:
        """Carry out cancel requests: abort the job if it runs here, else end it if it is
        still queued (every worker hears each request; the first write wins)."""
        # Anyone may publish there: a payload that is not a job id finds no job.
        await follow(self.store.redis, keys.CANCEL_CHANNEL, self._cancel, "cancel listener")

    def _cancel(self, job_id: str) -> None:
        kind, _, batch_id = job_id.partition(" ")
        if kind == "batch" and batch_id:  # a whole batch: abort what runs here (see keys)
            for running in [j for j, b in self._batch_of.items() if b == batch_id]:
                self._cancel(running)
            return
        run = self._jobs.get(job_id)
        if run is not None and not run.done():
            log.info("aborting cancelled job", job_id=job_id)
            self._user_cancelled.add(job_id)
            run.cancel()
        elif len(self._cancelling) < MAX_CANCELLING:  # a flood of requests cannot pile up tasks
            task = asyncio.create_task(self._end_queued(job_id))
            self._cancelling.add(task)
            task.add_done_callback(self._cancelling.discard)

    async def _end_queued(self, job_id: str) -> None:
        """End a queued job whose cancel was requested (no-op for any other job)."""
        if not is_job_id(job_id):
            return  # anyone may publish on the channel: not a job id, no job
        try:
            wrote = await through_outage(
                lambda: self.store.end_recorded(
                    job_id, JobState.CANCELLED, worker=self.settings.worker_id, requested=True
                ),
                OUTAGE_S,
            )
        except Exception:  # the request stays: the job's claim will honour it
            log.exception("could not end a cancelled queued job", job_id=job_id)
            return
        if wrote:
            metrics.JOBS.labels("cancelled").inc()
            log.info("job ended", job_id=job_id, state="cancelled", error=None)

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
        tracing.committed(offsets, self.settings.group_id)

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

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        """A rebalance begins: commit what finished, and keep every job running. The group
        waits for this callback, and all partitions stop meanwhile (aiokafka's rebalances
        are eager), so waiting here for in-flight jobs (or a parked job's Redis shard) held
        up every shard; most partitions come back to this worker anyway."""
        await self._commit(revoked)
        self._revoked |= revoked

    def assigned(self, assigned: set[TopicPartition]) -> None:
        """The rebalance ended. A partition that stayed here reads on where this worker was
        (not from the last commit: its in-flight jobs are not delivered twice); one that
        moved away is released."""
        for tp in self._revoked & assigned:
            position = self.ledger.position(tp)
            if position is not None:
                self.consumer.seek(tp, position)
        gone, self._revoked = self._revoked - assigned, set()
        if gone:
            task = asyncio.create_task(self._release(gone))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    async def _release(self, gone: set[TopicPartition]) -> None:
        """Partitions now another worker's: their jobs get `revoke_grace_s` to finish (the
        new owner's claim waits on their leases, then skips what ended), the rest are
        cancelled (their leases given up: the new owner runs them). Nothing of them is
        committed here any more: their ledgers go at once."""
        self.ledger.drop(gone)
        tracing.forget(gone)
        mine = [t for t, tp in self._tasks.items() if tp in gone]
        if not mine:
            return
        log.info("partitions moved to another worker; finishing their jobs", jobs=len(mine))
        _, late = await asyncio.wait(mine, timeout=self.settings.revoke_grace_s)
        for t in late:
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def _drain(self) -> None:
        """Give in-flight jobs up to drain_timeout_s (none after a second signal), then hand
        the rest back: uncommitted, another worker takes them. A cancelled job that is
        stuck in a client call gets CLOSE_S more, not forever."""
        if not self._tasks:
            return
        log.info("draining", jobs=len(self._tasks), timeout_s=self.settings.drain_timeout_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout_s
        now = asyncio.ensure_future(self._now.wait())
        try:
            while self._tasks and not now.done() and (left := deadline - loop.time()) > 0:
                await asyncio.wait([*self._tasks, now], timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            now.cancel()
        late = list(self._tasks)
        if late:
            log.warning("handing unfinished jobs back", jobs=len(late))
        for t in late:
            t.cancel()
        if late:
            await asyncio.wait(late, timeout=CLOSE_S)


def refusal(reason: str, job_id: str, cause: Error | None = None) -> Error:
    """The dead letter's error for a message that is not job `job_id` as submitted: it
    changes nothing of that job (nor of any other), whatever else was wrong with it."""
    if reason == "forged":
        what = f"not the message submitted as job {job_id} (its digest differs)"
        code = ErrorCode.FORGED
    else:
        what = f"job {job_id} has no submit record (submit through the SDK, the API or the enqueue step)"
        code = ErrorCode.NOT_SUBMITTED
    return Error(code, f"{what}; {cause.code.value}: {cause.message}" if cause else what)


async def serve(settings: WorkerSettings) -> int:
    """Run a worker until SIGTERM/SIGINT, then drain. Returns the exit code: 0 after a
    drain, or after a signal that came while it was still starting (a requested stop:
    nothing was taken, nothing is left to hand back); 1 when it stopped on an error."""
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None  # serve() runs as asyncio.run's task

    def on_signal(sig: signal.Signals) -> None:
        if not worker.stopping:
            log.info(
                "stopping: finishing in-flight jobs; signal again to stop at once",
                signal=sig.name,
                timeout_s=settings.drain_timeout_s,
            )
            worker.stop()
        else:
            log.warning("stopping at once: in-flight jobs go back to the queue", signal=sig.name)
            worker.stop(now=True)
        if not worker.serving:
            main.cancel()  # still starting (an engine loading, a server not there): nothing to drain

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await worker.run()
    except asyncio.CancelledError:
        log.info("worker stopped before it served")
        return 0
