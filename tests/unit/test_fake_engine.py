"""The fake engine's pacing: a request of N tokens takes N steps of `step_ms` on the
engine's own clock, also when the worker's event loop wakes it late (a busy worker)."""

from __future__ import annotations

import asyncio
import time

from vlmq.schemas import Message, Sampling
from vlmq.worker.engines import EngineRequest
from vlmq.worker.engines.fake import FakeEngine

STEP_MS, TOKENS = 5, 40


async def _hog(stop: asyncio.Event) -> None:
    """Holds the loop 3 ms at a time, with short breaks: the engine's timers fire late."""
    while not stop.is_set():
        time.sleep(0.003)  # noqa: ASYNC251 (the point: a loop that is busy)
        await asyncio.sleep(0.0005)


async def test_steps_keep_their_own_clock_on_a_busy_loop() -> None:
    engine = FakeEngine(step_ms=STEP_MS, completion_tokens=TOKENS)
    await engine.start()
    stop = asyncio.Event()
    hog = asyncio.create_task(_hog(stop))
    try:
        request = EngineRequest(
            request_id="r", messages=[Message("user", "hi")], images=[], sampling=Sampling(max_tokens=TOKENS)
        )
        t0 = time.perf_counter()
        out = await engine.generate(request)
        took_ms = (time.perf_counter() - t0) * 1000
    finally:
        stop.set()
        await hog
        await engine.close()
    assert out.completion_tokens == TOKENS and engine.steps == TOKENS
    # Late wake-ups added up step after step would give 40 x (5 + up to 3) ms; on its own
    # clock only the last one's lateness remains.
    assert TOKENS * STEP_MS <= took_ms < TOKENS * STEP_MS + 30, took_ms
