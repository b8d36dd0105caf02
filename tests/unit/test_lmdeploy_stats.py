"""LMDeploy's adapter counts a request as waiting from the moment the worker hands it over
until its first token, on the engine's loop in its own thread as LMDeploy's pipeline runs it,
so `engine_waiting_target` paces LMDeploy as it paces vLLM.

LMDeploy's engines need a GPU; this stands in for its pipeline (a loop in a thread, an
AsyncEngine with `preprocess` and a streaming `generate`) and for `GenerationConfig`, the one
name the adapter imports from it. The real pipeline runs in the GPU benchmark."""

from __future__ import annotations

import asyncio
import sys
import threading
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from vlmq.schemas import Message, Sampling, TextPart
from vlmq.worker.engines.base import EngineRequest
from vlmq.worker.engines.lmdeploy import LmdeployEngine


class Out(types.SimpleNamespace):
    response: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None


class StandInEngine:
    """Streams token n once the test has opened step n; a prompt saying "boom" fails before
    its first. Polls (no thread blocks: a cancelled request must leave nothing behind)."""

    def __init__(self) -> None:
        self.opened = 0

    async def preprocess(self, messages: Any, session_id: int, **kw: Any) -> Any:
        return types.SimpleNamespace(messages=messages)

    async def generate(self, prepared: Any, stream_response: bool) -> AsyncIterator[Out]:
        if "boom" in str(prepared.messages):
            raise RuntimeError("engine refused the request")
        for n in (1, 2):
            while self.opened < n:  # noqa: ASYNC110 (opened from the test's thread)
                await asyncio.sleep(0.001)
            yield Out(
                response="x",
                generate_token_len=n,
                input_token_len=5,
                finish_reason="length" if n == 2 else None,
            )


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LmdeployEngine, StandInEngine]]:
    monkeypatch.setitem(sys.modules, "lmdeploy", types.SimpleNamespace(GenerationConfig=lambda **kw: kw))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stand_in = StandInEngine()
    adapter = LmdeployEngine("model")
    adapter._pipe = types.SimpleNamespace(
        internal_thread=types.SimpleNamespace(loop=loop), async_engine=stand_in
    )
    yield adapter, stand_in
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def request(i: int, text: str = "describe") -> EngineRequest:
    messages = [Message("user", [TextPart(text)])]
    return EngineRequest(request_id=f"r{i}", messages=messages, images=[], sampling=Sampling(max_tokens=2))


async def until(cond: Any) -> None:
    async with asyncio.timeout(5):
        while not cond():  # noqa: ASYNC110 (counters of another thread's loop)
            await asyncio.sleep(0.001)


async def test_waiting_until_first_token_then_running(engine: tuple[LmdeployEngine, StandInEngine]) -> None:
    adapter, stand_in = engine
    jobs = [asyncio.create_task(adapter.generate(request(i))) for i in range(3)]
    await until(lambda: adapter.stats() == {"running": 3, "waiting": 3})
    stand_in.opened = 1  # each gets its first token
    await until(lambda: adapter.stats() == {"running": 3, "waiting": 0})
    stand_in.opened = 2
    outs = await asyncio.gather(*jobs)
    assert [o.text for o in outs] == ["xx"] * 3 and outs[0].ttft_s is not None
    assert adapter.stats() == {"running": 0, "waiting": 0}


async def test_a_failure_or_cancel_before_the_first_token_stops_counting(
    engine: tuple[LmdeployEngine, StandInEngine],
) -> None:
    adapter, _ = engine
    with pytest.raises(Exception, match="engine refused"):
        await adapter.generate(request(0, "boom"))
    stuck = asyncio.create_task(adapter.generate(request(1)))
    await until(lambda: adapter.stats()["waiting"] == 1)
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    assert adapter.stats()["waiting"] == 0
