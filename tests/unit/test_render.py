"""The image stage's pool: processes and threads decode alike; a renderer runs in each
process; whatever a renderer or decoder does wrong (raise anything, kill its process) is
that job's typed failure and the pool serves on; the byte budget and the engine pacing."""

from __future__ import annotations

import asyncio
import os
import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vlmq.schemas import ErrorCode, ImageRef, Job, JobState, Message, Sampling, TextPart
from vlmq.schemas.errors import VlmqError
from vlmq.worker.engines.fake import FakeEngine
from vlmq.worker.fetch import Fetcher
from vlmq.worker.pipeline import Pipeline
from vlmq.worker.render import DecodeLimits, ImagePool, Prepared, RenderBudget, tensor_bytes
from vlmq.worker.samples import photo
from vlmq.worker.settings import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, WorkerSettings

LIMITS = DecodeLimits(28, 64_000_000, ("JPEG", "PNG"))
PIXELS = (QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)


class Unpicklable(Exception):
    """An exception a library might raise that cannot cross a process boundary."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")
        self.lock = __import__("threading").Lock()


class EchoRenderer:
    """Renders to (prompt text, image sizes); misbehaves when the prompt says so."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def render(self, messages: list[Message], inputs: Prepared) -> tuple[Any, int]:
        images = inputs.images
        text = " ".join(p.text for m in messages for p in m.parts if isinstance(p, TextPart))
        if "die" in text:
            os._exit(9)  # a decoder segfault, the OOM killer
        if "odd" in text:
            raise Unpicklable(1, 2)
        if "long" in text:
            raise ValueError(
                "The decoder prompt (length 9000) is longer than the maximum model length of 4096"
            )
        return {"text": text, "sizes": [i.size for i in images], "pid": self.pid}, 1234


class EchoFactory:
    def __call__(self) -> EchoRenderer:
        return EchoRenderer()


class FailingFactory:
    def __call__(self) -> EchoRenderer:
        raise RuntimeError("no tokenizer here")


class ThreadsRenderer:
    def render(self, messages: list[Message], inputs: Prepared) -> tuple[Any, int]:
        return {"threads": sys.modules["torch"].threads}, 0


class TorchLikeFactory:
    """A renderer that imports torch, as vLLM's does (here a stand-in that records threads)."""

    def __call__(self) -> ThreadsRenderer:
        torch = types.ModuleType("torch")
        torch.threads = os.cpu_count()  # type: ignore[attr-defined]
        torch.set_num_threads = lambda n: setattr(torch, "threads", n)  # type: ignore[attr-defined]
        sys.modules["torch"] = torch
        return ThreadsRenderer()


def _msgs(text: str) -> list[Message]:
    return [Message("user", [ImageRef("s3://b/k"), TextPart(text)])]


@pytest.fixture
async def rendering() -> AsyncIterator[ImagePool]:
    pool = ImagePool(LIMITS, pool="process", workers=2, renderer=EchoFactory())
    await pool.warm()
    yield pool
    pool.close()


async def test_processes_and_threads_decode_alike() -> None:
    blobs = [photo(1600, 1200, seed=1), photo(300, 200, seed=2)]
    got = []
    for kind in ("process", "thread"):
        pool = ImagePool(LIMITS, pool=kind, workers=1)
        try:
            prepared = await pool.prepare(blobs, [PIXELS, PIXELS], _msgs("x"))
        finally:
            pool.close()
        assert prepared.rendered is None and not pool.renders
        assert prepared.nbytes == sum(i.width * i.height * 3 for i in prepared.images)
        got.append([(i.size, i.tobytes()) for i in prepared.images])
    assert got[0] == got[1]


async def test_a_renderer_runs_in_each_process_and_its_output_comes_back(rendering: ImagePool) -> None:
    prepared = await rendering.prepare([photo(640, 480, seed=3)], [PIXELS], _msgs("caption"))
    assert rendering.renders and prepared.images == []
    assert prepared.rendered["text"] == "caption" and prepared.nbytes == 1234
    assert prepared.rendered["sizes"] == [(644, 476)]  # resized in the process first
    assert prepared.rendered["pid"] != os.getpid()


async def test_each_render_process_runs_torch_on_one_thread() -> None:
    """The pool's processes are the parallelism: a torch per process with a thread per core
    would oversubscribe the machine the engine runs on."""
    pool = ImagePool(LIMITS, pool="process", workers=1, renderer=TorchLikeFactory())
    try:
        prepared = await pool.prepare([photo(64, 48, seed=4)], [PIXELS], _msgs("x"))
    finally:
        pool.close()
    assert prepared.rendered == {"threads": 1}


async def test_every_failure_is_the_jobs_typed_error_and_the_pool_serves_on(rendering: ImagePool) -> None:
    good = photo(320, 240, seed=4)
    with pytest.raises(VlmqError) as corrupt:
        await rendering.prepare([b"\xff\xd8 not a jpeg"], [PIXELS], _msgs("x"))
    assert corrupt.value.code is ErrorCode.IMAGE_CORRUPT
    with pytest.raises(VlmqError) as odd:
        await rendering.prepare([good], [PIXELS], _msgs("odd"))
    assert odd.value.code is ErrorCode.ENGINE_ERROR and "Unpicklable: 1/2" in odd.value.message
    with pytest.raises(VlmqError) as long:
        await rendering.prepare([good], [PIXELS], _msgs("long"))
    assert long.value.code is ErrorCode.PROMPT_TOO_LONG
    # A job whose process dies: tried again alone, where it dies again: failed. The jobs its
    # death took down with it succeed on their second try, and the pool serves on.
    others = [rendering.prepare([good], [PIXELS], _msgs(f"ok {i}")) for i in range(6)]
    outcome = await asyncio.gather(
        rendering.prepare([good], [PIXELS], _msgs("die")), *others, return_exceptions=True
    )
    assert isinstance(outcome[0], VlmqError) and outcome[0].code is ErrorCode.INTERNAL
    assert "also when it ran alone" in outcome[0].message
    assert [o.rendered["text"] for o in outcome[1:]] == [f"ok {i}" for i in range(6)]  # type: ignore[union-attr]
    assert (await rendering.prepare([good], [PIXELS], _msgs("after"))).rendered["text"] == "after"


async def test_a_renderer_that_cannot_start_stops_the_worker_at_start(tmp_path: Path) -> None:
    class NoRenderer(FakeEngine):
        def renderer(self) -> Any:
            return FailingFactory()

    settings = WorkerSettings(image_pool="process", image_workers=1)
    async with Fetcher(settings) as fetcher:
        pipeline = Pipeline(settings, fetcher, NoRenderer())
        assert pipeline.images.renders
        try:
            with pytest.raises(Exception, match="image processes could not start"):
                await pipeline.start()
        finally:
            pipeline.close()


class _Array:  # what the budget reads of a tensor or an array
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


class _Elem:  # vLLM's field elements hold their tensor in `data`
    def __init__(self, data: object) -> None:
        self.data = data


def test_tensor_bytes_counts_every_array_however_an_engine_nests_it() -> None:
    vllm_like = {"image": [{"pixel_values": _Elem(_Array(1000)), "grid": _Elem(_Array(24))}, None]}
    lmdeploy_like = [{"pixel_values": _Array(500), "offset": 54, "image_size": (448, 336)}]
    assert tensor_bytes(vllm_like) == 1024
    assert tensor_bytes(lmdeploy_like) == 500
    assert tensor_bytes({"nested": _Elem([_Array(3), (_Array(4),)])}) == 7
    assert tensor_bytes(None) == 0 and tensor_bytes("text") == 0


async def test_the_budget_holds_bytes_and_lets_one_oversized_job_run_alone() -> None:
    budget = RenderBudget(100)
    a = await budget.acquire(60)
    blocked = asyncio.ensure_future(budget.acquire(60))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    a = budget.resize(a, 30)  # the real size turned out smaller
    assert await asyncio.wait_for(blocked, 1) == 60 and budget.held == 90
    budget.release(a)
    budget.release(60)
    assert await asyncio.wait_for(budget.acquire(500), 1) == 500  # alone: runs
    assert budget.held == 500
    gone = asyncio.ensure_future(budget.acquire(10))  # a job cancelled while it waits
    await asyncio.sleep(0.01)
    gone.cancel()
    budget.release(500)
    assert budget.held == 0 and await asyncio.wait_for(budget.acquire(100), 1) == 100


async def test_images_are_prepared_no_further_ahead_than_the_engines_queue(tmp_path: Path) -> None:
    """With the engine's waiting queue at the target, no job is prepared until it drains."""

    class Busy(FakeEngine):
        waiting = 5

        def stats(self) -> dict[str, Any]:
            return {"running": 0, "waiting": self.waiting}

    (tmp_path / "a.jpg").write_bytes(photo(64, 64, seed=5))
    settings = WorkerSettings(allowed_file_roots=[str(tmp_path)], engine_waiting_target=4)
    engine = Busy(step_ms=1)
    await engine.start()
    async with Fetcher(settings) as fetcher:
        pipeline = Pipeline(settings, fetcher, engine)
        try:
            job = Job(
                job_id="j",
                messages=[Message("user", [ImageRef(f"file://{tmp_path}/a.jpg"), TextPart("x")])],
                sampling=Sampling(max_tokens=2),
            )
            run = asyncio.ensure_future(pipeline.run(job, 1))
            await asyncio.sleep(0.1)
            assert not run.done()
            engine.waiting = 0
            assert (await asyncio.wait_for(run, 5)).state is JobState.SUCCEEDED
        finally:
            pipeline.close()
            await engine.close()
