"""The coalescer: concurrent script calls share one pipeline per loop tick, and a pipeline's
outcome reaches every caller in it. Redis is replaced by a recorder of pipelines: these
tests are about the batching, not about Lua (tests/integration/test_state.py runs the
scripts on a real redis-server)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from vlmq.core.state import _Coalescer


class Pipe:
    def __init__(self, server: Server) -> None:
        self.server, self.queued = server, list[tuple[list[str], list[Any]]]()

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.server.pipelines.append(len(self.queued))
        if self.server.down:
            raise RedisConnectionError("connection reset")
        return [self.server.reply(keys, args) for keys, args in self.queued]


class Server:
    """Answers each call with its first argument, or a ResponseError when it is "bad"."""

    def __init__(self) -> None:
        self.pipelines: list[int] = []  # calls per executed pipeline
        self.down = False

    def pipeline(self, transaction: bool = False) -> Pipe:
        assert not transaction
        return Pipe(self)

    def reply(self, keys: list[str], args: list[Any]) -> Any:
        return ResponseError("WRONGTYPE") if args[0] == "bad" else args[0]


async def _script(keys: list[str], args: list[Any], client: Pipe) -> None:
    client.queued.append((keys, args))


SCRIPT = cast(AsyncScript, _script)


def _coalescer(server: Server, max_batch: int = 1000) -> _Coalescer:
    return _Coalescer(cast(Redis, server), max_batch=max_batch)


async def test_concurrent_calls_share_one_round_trip_and_get_their_own_replies() -> None:
    server = Server()
    co = _coalescer(server)
    replies = await asyncio.gather(*(co.call(SCRIPT, [f"k{i}"], [i]) for i in range(300)))
    assert replies == list(range(300))
    assert server.pipelines == [300]


async def test_a_failed_pipeline_fails_every_caller_in_it() -> None:
    server = Server()
    server.down = True
    co = _coalescer(server)
    results = await asyncio.gather(*(co.call(SCRIPT, ["k"], [i]) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    server.down = False  # the next tick's callers are unaffected
    assert await co.call(SCRIPT, ["k"], ["after"]) == "after"


async def test_an_error_reply_fails_only_its_own_caller() -> None:
    co = _coalescer(Server())
    replies: tuple[Any, ...] = await asyncio.gather(
        co.call(SCRIPT, ["a"], [1]),
        co.call(SCRIPT, ["b"], ["bad"]),
        co.call(SCRIPT, ["c"], [3]),
        return_exceptions=True,
    )
    good, bad, also_good = replies
    assert (good, also_good) == (1, 3)
    assert isinstance(bad, ResponseError)


async def test_pipelines_are_bounded_by_max_batch() -> None:
    server = Server()
    co = _coalescer(server, max_batch=100)
    assert len(await asyncio.gather(*(co.call(SCRIPT, ["k"], [i]) for i in range(250)))) == 250
    assert server.pipelines == [100, 100, 50]


async def test_a_cancelled_caller_does_not_break_the_others() -> None:
    co = _coalescer(Server())
    first = asyncio.ensure_future(co.call(SCRIPT, ["a"], [1]))
    second = asyncio.ensure_future(co.call(SCRIPT, ["b"], [2]))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == 2
    with pytest.raises(asyncio.CancelledError):
        await first
