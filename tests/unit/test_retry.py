"""The one retry/timeout helper: retries what it is told to, gives up on budget, re-raises."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    MovedError,
    NoPermissionError,
    ReadOnlyError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from vlmq.core.retry import is_transient, retry, through_outage, within


class Flaky:
    """Fails `failures` times with `exc`, then returns "ok"; counts its calls."""

    def __init__(self, failures: int, exc: type[Exception] = ConnectionError) -> None:
        self.failures, self.exc, self.calls = failures, exc, 0

    async def call(self, answer: str = "ok") -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc(f"failure {self.calls}")
        return answer


async def test_retries_the_named_errors_until_the_call_succeeds() -> None:
    flaky = Flaky(3)
    # A lambda, as callers write it: its coroutine must be awaited, not returned.
    assert (
        await retry(lambda: flaky.call("fine"), on=ConnectionError, attempts=5, initial=0.001, jitter=0.001)
        == "fine"
    )
    assert flaky.calls == 4


async def test_gives_up_after_its_attempts_with_the_last_error() -> None:
    flaky = Flaky(10)
    with pytest.raises(ConnectionError, match="failure 3"):
        await retry(flaky.call, on=ConnectionError, attempts=3, initial=0.001, jitter=0.001)
    assert flaky.calls == 3


async def test_gives_up_after_its_seconds() -> None:
    flaky = Flaky(10**6)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        await retry(flaky.call, on=ConnectionError, seconds=0.2, initial=0.01, max_wait=0.02, jitter=0.01)
    assert 0.2 <= time.monotonic() - t0 < 2 and flaky.calls > 2


async def test_other_errors_are_not_retried() -> None:
    flaky = Flaky(1, exc=ValueError)
    with pytest.raises(ValueError, match="failure 1"):
        await retry(flaky.call, on=ConnectionError, attempts=5, initial=0.001, jitter=0.001)
    assert flaky.calls == 1


async def test_through_outage_rides_out_a_redis_restart() -> None:
    flaky = Flaky(2, exc=RedisConnectionError)
    assert await through_outage(flaky.call, seconds=5) == "ok"
    assert flaky.calls == 3
    fatal = Flaky(1, exc=KeyError)
    with pytest.raises(KeyError):
        await through_outage(fatal.call, seconds=5)
    assert fatal.calls == 1


async def test_within_returns_or_raises_the_builtin_timeout_and_cancels() -> None:
    assert await within(asyncio.sleep(0, result=7), 1) == 7
    cancelled = asyncio.Event()

    async def hang() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        await within(hang(), 0.05)
    assert cancelled.is_set()


@pytest.mark.parametrize(
    "exc", [ClusterDownError, MasterDownError, TryAgainError, SlotNotCoveredError, ReadOnlyError]
)
async def test_a_redis_failover_is_ridden_out_like_a_restart(exc: type[Exception]) -> None:
    flaky = Flaky(2, exc=exc)
    assert await through_outage(flaky.call, seconds=5) == "ok"
    assert not is_transient(ResponseError("WRONGTYPE")) and not is_transient(NoPermissionError("NOPERM"))


def test_a_moved_redirect_is_not_an_outage() -> None:
    assert not is_transient(MovedError("3999 127.0.0.1:7001"))  # a wrong topology: one line instead
