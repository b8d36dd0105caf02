"""Faults of one image fetch worth another try, and the retry loop every source shares:
a transient fault is retried for `seconds`, then ends the job `image_fetch_failed`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from vlmq.core.retry import retry
from vlmq.schemas.errors import ErrorCode, VlmqError


class Transient(Exception):
    """Worth another try: a throttle (429, SlowDown), a 5xx, a timeout, a dropped connection."""


async def fetch_retrying(attempt: Callable[[], Awaitable[bytes]], seconds: float, what: str) -> bytes:
    """`attempt()` until it returns, retrying Transient faults with backoff for `seconds`;
    any other error is the job's at once. `what` names the source in the error."""
    try:
        return await retry(attempt, on=Transient, seconds=seconds, initial=0.2, max_wait=5.0)
    except Transient as exc:
        raise VlmqError(
            ErrorCode.IMAGE_FETCH_FAILED, f"{what} kept failing for {seconds:.0f}s: {exc}"
        ) from None
