"""Retrying infrastructure calls (Redis, Kafka) through outages, with tenacity."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from aiokafka.errors import KafkaError
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

T = TypeVar("T")
log = structlog.get_logger("vlmq.retry")

TRANSIENT = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, KafkaError, OSError)


def _warn(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("retrying", call=getattr(state.fn, "__qualname__", "?"),
                attempt=state.attempt_number, error=repr(exc))


async def through_outage(fn: Callable[[], Awaitable[T]], seconds: float) -> T:
    """Call `fn` until it succeeds, backing off, for up to `seconds`; then re-raise."""
    try:  # the hot path: tenacity's bookkeeping only once something failed
        return await fn()
    except TRANSIENT as exc:
        log.warning("retrying", error=repr(exc))
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT),
        wait=wait_exponential_jitter(initial=0.05, max=2.0),
        stop=stop_after_delay(seconds),
        before_sleep=_warn,
        reraise=True,
    ):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")
