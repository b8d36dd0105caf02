"""The one way vlmq retries and times out: `retry`, `through_outage` and `within`.

Retries are tenacity's (exponential backoff with jitter, then the last error re-raised);
timeouts are `asyncio.timeout`'s builtin `TimeoutError` (no task per call, unlike
`wait_for`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

import structlog
from aiokafka.errors import KafkaError
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    ReadOnlyError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    stop_any,
    stop_never,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

T = TypeVar("T")
log = structlog.get_logger("vlmq.retry")


class InfrastructureError(Exception):
    """Redis or Kafka stayed unreachable through the whole outage budget. The one error
    (with a dead engine) that stops a worker: no job could be served without them."""


class CredentialsRefused(InfrastructureError):
    """Redis answered but refused the user or password: no wait will fix it (exit 5)."""


# What Redis says while it fails over: a cluster without a master for some slots, a slot
# on the move, a client still talking to the old master (now a read-only replica). Not
# MOVED/ASK: a cluster client follows those itself, and a single-Redis client that gets
# one is pointed at a cluster (core/topology.py says so).
REDIS_FAILOVER = (ClusterDownError, ClusterError, TryAgainError, SlotNotCoveredError, ReadOnlyError)


def is_transient(exc: BaseException) -> bool:
    """Infrastructure faults that pass: a Redis or Kafka restart, a dropped connection, a
    leader election, a Redis failover. Not: a script error, a refused permission, a
    message Kafka rejects."""
    if isinstance(exc, KafkaError):
        return bool(exc.retriable)
    return isinstance(
        exc, (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError, *REDIS_FAILOVER)
    )


def _warn(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "retrying",
        call=getattr(state.fn, "__qualname__", "?"),
        attempt=state.attempt_number,
        error=repr(exc),
    )


async def retry(
    fn: Callable[[], Awaitable[T]],
    *,
    on: type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool],
    seconds: float | None = None,
    attempts: int | None = None,
    initial: float = 0.05,
    max_wait: float = 2.0,
    jitter: float = 1.0,
    quiet: bool = False,
) -> T:
    """Call `fn` until it returns, retrying the exceptions `on` with backoff, for up to
    `seconds` and/or `attempts` calls; then re-raise the last error. Other exceptions
    propagate at once. The n-th wait is `initial * 2**n` capped at `max_wait`, plus up to
    `jitter` seconds at random, so a fleet does not retry in lockstep. `quiet`: no log line
    per retry (the caller says once what it waits for)."""
    stops: list[stop_base] = []
    if seconds is not None:
        stops.append(stop_after_delay(seconds))
    if attempts is not None:
        stops.append(stop_after_attempt(attempts))
    condition = retry_if_exception_type(on) if isinstance(on, (type, tuple)) else retry_if_exception(on)
    retrying = AsyncRetrying(
        retry=condition,
        wait=wait_exponential_jitter(multiplier=initial, max=max_wait, jitter=jitter),
        stop=stop_any(*stops) if stops else stop_never,
        before_sleep=None if quiet else _warn,
        reraise=True,
    )

    async def call() -> T:  # tenacity awaits only what it sees is a coroutine function
        return await fn()

    return cast(T, await retrying(call))


async def through_outage(fn: Callable[[], Awaitable[T]], seconds: float, *, quiet: bool = False) -> T:
    """Call a Redis or Kafka operation until it succeeds, for up to `seconds` of outage;
    then raise InfrastructureError. Errors that are not transient propagate at once.
    `quiet`: no log line per retry."""
    try:  # the hot path: tenacity's bookkeeping only once something failed
        return await fn()
    except Exception as exc:
        if not is_transient(exc):
            raise
        if not quiet:
            log.warning("retrying", error=repr(exc))
    try:
        return await retry(fn, on=is_transient, seconds=seconds, quiet=quiet)
    except Exception as exc:
        if is_transient(exc):
            raise InfrastructureError(f"unavailable for {seconds:.0f}s: {exc!r}") from exc
        raise


async def within(aw: Awaitable[T], seconds: float) -> T:
    """`aw`'s result, or TimeoutError after `seconds` (the awaitable is cancelled)."""
    async with asyncio.timeout(seconds):  # no extra task per call, unlike wait_for
        return await aw
