"""Every online request of this process waits on one Redis pub/sub connection.

A request registers a future for its job id and subscribes the job's completion channel on
the process's one PubSub connection (a write, no round trip); one task reads that
connection and settles the futures. So a waiting request holds no pool connection: the
pool serves only short commands, and a thousand waiters cost a thousand futures, not a
thousand sockets. (`StateStore.wait` opens a pub/sub connection per call: right for one
SDK caller, not for a server.)

Pub/sub has no replay (a message sent while the connection was down is lost), so every
pending job is also re-read every `recheck_s`, and after every reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from redis.asyncio.client import PubSub

from vlmq.core.state import StateStore
from vlmq.core.topology import AnyRedis
from vlmq.schemas import keys
from vlmq.schemas.job import Result

log = structlog.get_logger("vlmq.api")
READ_CHUNK = 1000  # job records read per round trip


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Waiters:
    def __init__(self, redis: AnyRedis, store: StateStore, recheck_s: float = 2.0) -> None:
        self.redis, self.store, self.recheck_s = redis, store, recheck_s
        self._futures: dict[str, asyncio.Future[Result]] = {}
        self._pubsub: PubSub | None = None
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._futures)

    async def wait(self, job_id: str, timeout: float) -> Result | None:
        """The job's terminal Result, or None after `timeout` s. Call `watch` first (before
        the job is submitted, so its completion cannot be missed)."""
        fut = self._futures.get(job_id)
        if fut is None:
            raise KeyError(job_id)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            return None

    async def watch(self, job_id: str) -> None:
        """Start listening for the job's end (a subscribe written on the shared connection)."""
        self._futures[job_id] = asyncio.get_running_loop().create_future()
        pubsub = self._pubsub
        if pubsub is not None:
            with contextlib.suppress(Exception):  # the listener resubscribes all after a reconnect
                await pubsub.subscribe(keys.done_channel(job_id))

    async def forget(self, job_id: str) -> None:
        fut = self._futures.pop(job_id, None)
        if fut is not None and not fut.done():
            fut.cancel()
        pubsub = self._pubsub
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.unsubscribe(keys.done_channel(job_id))

    # -- the listener task -------------------------------------------------------------------

    async def run(self) -> None:
        """Forever: listen, settle futures; on a lost connection, reconnect and re-read."""
        while True:
            pubsub = self.redis.pubsub()
            try:
                # A first channel of our own makes the connection before anyone writes on it.
                await pubsub.subscribe(f"{keys.PREFIX}:api-waiters")
                if self._futures:
                    await pubsub.subscribe(*[keys.done_channel(j) for j in list(self._futures)])
                self._pubsub = pubsub
                await self._settle(list(self._futures))  # what ended while we were away
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarted or unreachable: try again shortly
                log.warning("online waiters lost Redis", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)
            finally:
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated

    async def _listen(self, pubsub: PubSub) -> None:
        recheck_at = time.monotonic() + self.recheck_s
        prefix = keys.done_channel("")
        while True:
            left = max(0.0, recheck_at - time.monotonic())
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
            ended: set[str] = set()
            while msg is not None:  # drain what arrived together, then read those at once
                channel = _s(msg["channel"])
                if channel.startswith(prefix):
                    ended.add(channel[len(prefix) :])
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
            if ended:
                await self._settle([j for j in ended if j in self._futures])
            if time.monotonic() >= recheck_at:
                await self._settle(list(self._futures))
                recheck_at = time.monotonic() + self.recheck_s

    async def _settle(self, job_ids: list[str]) -> None:
        for i in range(0, len(job_ids), READ_CHUNK):
            chunk = job_ids[i : i + READ_CHUNK]
            for job_id, result in zip(chunk, await self.store.get_many(chunk), strict=True):
                fut = self._futures.get(job_id)
                if result is not None and result.state.terminal and fut is not None and not fut.done():
                    fut.set_result(result)
