"""The coalescer: concurrent script calls share one pipeline per loop tick, and a pipeline's
outcome reaches every caller in it. Redis is replaced by a recorder of pipelines: these
tests are about the batching, not about Lua (tests/integration/test_state.py runs the
scripts on a real redis-server)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from vlmq.core.scripts import Call, Coalescer, Lanes


class Server:
    """Runs a pipeline of calls: each answered with its first argument, or a ResponseError
    when that is "bad"; the whole pipeline fails while `down`."""

    def __init__(self) -> None:
        self.pipelines: list[int] = []  # calls per executed pipeline
        self.down = False

    async def run(self, calls: Sequence[Call]) -> list[Any]:
        self.pipelines.append(len(calls))
        if self.down:
            raise RedisConnectionError("connection reset")
        return [ResponseError("WRONGTYPE") if c.args[0] == "bad" else c.args[0] for c in calls]


def _call(key: str, arg: Any) -> Call:
    return Call("claim", [key], [arg])


def _coalescer(server: Server, max_batch: int = 1000) -> Coalescer:
    return Coalescer(server.run, max_batch=max_batch)


async def test_concurrent_calls_share_one_round_trip_and_get_their_own_replies() -> None:
    server = Server()
    co = _coalescer(server)
    replies = await asyncio.gather(*(co.call(_call(f"k{i}", i)) for i in range(300)))
    assert replies == list(range(300))
    assert server.pipelines == [300]


async def test_a_failed_pipeline_fails_every_caller_in_it() -> None:
    server = Server()
    server.down = True
    co = _coalescer(server)
    results = await asyncio.gather(*(co.call(_call("k", i)) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    server.down = False  # the next tick's callers are unaffected
    assert await co.call(_call("k", "after")) == "after"


async def test_an_error_reply_fails_only_its_own_caller() -> None:
    co = _coalescer(Server())
    replies: tuple[Any, ...] = await asyncio.gather(
        co.call(_call("a", 1)),
        co.call(_call("b", "bad")),
        co.call(_call("c", 3)),
        return_exceptions=True,
    )
    good, bad, also_good = replies
    assert (good, also_good) == (1, 3)
    assert isinstance(bad, ResponseError)


async def test_pipelines_are_bounded_by_max_batch() -> None:
    server = Server()
    co = _coalescer(server, max_batch=100)
    assert len(await asyncio.gather(*(co.call(_call("k", i)) for i in range(250)))) == 250
    assert server.pipelines == [100, 100, 50]


async def test_a_cancelled_caller_does_not_break_the_others() -> None:
    co = _coalescer(Server())
    first = asyncio.ensure_future(co.call(_call("a", 1)))
    second = asyncio.ensure_future(co.call(_call("b", 2)))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == 2
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_calls_made_while_a_pipeline_waits_go_out_at_once_up_to_max_inflight() -> None:
    server, gate = Server(), asyncio.Event()
    plain = server.run

    waiting: list[int] = []

    async def slow(calls: Sequence[Call]) -> list[Any]:
        waiting.append(len(calls))
        await gate.wait()  # Redis (or WAIT, or a cluster's slowest node) takes its time
        return await plain(calls)

    co = Coalescer(slow, max_inflight=2)
    first = [asyncio.ensure_future(co.call(_call("a", i))) for i in range(3)]
    await asyncio.sleep(0.01)
    second = [asyncio.ensure_future(co.call(_call("b", i))) for i in range(4)]
    await asyncio.sleep(0.01)
    third = [asyncio.ensure_future(co.call(_call("c", i))) for i in range(5)]  # both busy: waits
    await asyncio.sleep(0.01)
    assert waiting == [3, 4]  # two pipelines under way at once, the third tick's calls wait
    gate.set()
    assert await asyncio.gather(*first, *second, *third) == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert sorted(server.pipelines) == [3, 4, 5]  # then go out together, in one pipeline


async def test_a_slow_node_holds_back_only_its_own_lane() -> None:
    """Issue 37: a master that lost its replica holds each pipeline in WAIT; the calls of
    the other nodes (lanes) must not queue behind its pipelines."""
    stuck = asyncio.Event()

    async def run(calls: Sequence[Call]) -> list[Any]:
        if calls[0].keys[0].startswith("slow"):
            await stuck.wait()
        return [c.args[0] for c in calls]

    lanes = Lanes(run, lambda call: call.keys[0].partition(":")[0])
    slow = [asyncio.ensure_future(lanes.call(_call("slow:k", i))) for i in range(8)]
    for _ in range(5):  # more ticks than the slow lane has pipelines: all of them stuck
        slow.append(asyncio.ensure_future(lanes.call(_call("slow:k", "x"))))
        await asyncio.sleep(0)
    assert await asyncio.wait_for(lanes.call(_call("fast:k", "now")), 1) == "now"
    stuck.set()
    assert len(await asyncio.gather(*slow)) == 13
