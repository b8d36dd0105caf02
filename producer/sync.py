"""A blocking wrapper of `Client` for scripts and synchronous services.

It owns a private event loop; do not use it from inside a running asyncio loop (use
`Client` there).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from typing import Any, TypeVar

from vlmq.core.state import BatchCounts
from vlmq.producer.client import Client, Handle, SubmitReport
from vlmq.schemas.job import Job, Result

T = TypeVar("T")


class SyncClient:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = self._run(self._make(*args, **kwargs))

    async def _make(self, *args: Any, **kwargs: Any) -> Client:
        return Client(*args, **kwargs)  # built inside the loop it will run on

    def _run(self, coro: Awaitable[T]) -> T:
        return self._loop.run_until_complete(coro)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._client.close())
            self._loop.close()

    def submit(self, job: Job) -> Handle:
        return self._run(self._client.submit(job))

    def submit_many(self, jobs: Iterable[Job], *, chunk: int = 2000) -> SubmitReport:
        return self._run(self._client.submit_many(jobs, chunk=chunk))

    def status(self, job_id: str) -> Result:
        return self._run(self._client.status(job_id))

    def result(self, job_id: str) -> Result:
        return self._run(self._client.result(job_id))

    def wait(self, job_id: str, timeout: float | None = None) -> Result:
        return self._run(self._client.wait(job_id, timeout))

    def wait_many(self, job_ids: Iterable[str], timeout: float | None = None) -> list[Result]:
        return self._run(self._client.wait_many(job_ids, timeout))

    def as_completed(self, job_ids: Iterable[str], *, timeout: float | None = None) -> Iterator[Result]:
        return self._iterate(self._client.as_completed(job_ids, timeout=timeout))

    def cancel(self, job_id: str) -> bool:
        return self._run(self._client.cancel(job_id))

    def batch(self, batch_id: str) -> BatchCounts:
        return self._run(self._client.batch(batch_id))

    def iter_results(self, batch_id: str) -> Iterator[Result]:
        return self._iterate(self._client.iter_results(batch_id))

    def _iterate(self, agen: AsyncIterator[Result]) -> Iterator[Result]:
        """An async iterator of the client, consumed item by item on the client's loop."""
        while True:
            try:
                yield self._run(agen.__anext__())
            except StopAsyncIteration:
                return
