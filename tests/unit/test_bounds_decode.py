"""Decoding counts by its full-size pixels: the cost is read from the header alone, before
any pixel is decoded, and the image pool decodes no more at once than `max_decode_bytes`."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from typing import Any

import pytest
from PIL import Image

from vlmq.schemas import Message
from vlmq.worker import render
from vlmq.worker.preprocess import decode_bytes, load_image
from vlmq.worker.render import DecodeLimits, ImagePool
from vlmq.worker.samples import photo
from vlmq.worker.settings import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS

LIMITS = DecodeLimits(28, 64_000_000, ("JPEG", "PNG"))
PIXELS = (QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)


def cost(data: bytes, max_image_pixels: int = 64_000_000, formats: tuple[str, ...] | None = None) -> int:
    return decode_bytes(
        data,
        factor=28,
        min_pixels=QWEN_MIN_PIXELS,
        max_pixels=QWEN_MAX_PIXELS,
        max_image_pixels=max_image_pixels,
        formats=formats,
    )


def png(w: int, h: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


def test_a_small_png_of_many_pixels_costs_its_full_size() -> None:
    data = png(8000, 8000)  # the 62 KB file
    assert len(data) < 100_000
    full = cost(data)
    # Grey (1 byte a pixel) converted to RGB (4 in Pillow), with the resize's intermediate.
    assert full >= 64_000_000 * 5


def test_the_cost_comes_from_the_header_alone() -> None:
    data = png(8000, 8000)
    header = data[: data.index(b"IDAT") + 4]  # up to the first pixel chunk, none of its data
    assert cost(header) == cost(data)


def test_alpha_costs_more_and_a_jpeg_counts_its_reduced_decode() -> None:
    grey = cost(png(2000, 2000))
    rgba = cost(png(2000, 2000, "RGBA"))
    assert rgba > grey
    jpeg = photo(4000, 3000, seed=1)  # decoded at 1/2 scale at least: the target is ~1 MP
    assert cost(jpeg) <= 4000 * 3000 * 5 // 4


def test_unreadable_and_refused_headers_cost_nothing() -> None:
    assert cost(b"not an image") == 0
    assert cost(png(3000, 3000), max_image_pixels=1_000_000) == 0
    assert cost(png(100, 100), formats=("JPEG",)) == 0


class Concurrency:
    """Counts the decodes running at once in the pool's threads."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self.lock = threading.Lock()

    def wrap(self, real: Any) -> Any:
        def decode(*args: Any, **kw: Any) -> Any:
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            try:
                time.sleep(0.05)  # overlap if the pool lets them
                return real(*args, **kw)
            finally:
                with self.lock:
                    self.now -= 1

        return decode


@pytest.mark.parametrize(("budget_images", "most"), [(1.5, 1), (2.5, 2)])
async def test_the_pool_decodes_no_more_at_once_than_the_budget(
    monkeypatch: pytest.MonkeyPatch, budget_images: float, most: int
) -> None:
    data = png(3000, 3000)
    one = render.decode_cost(LIMITS, [data], [PIXELS])
    seen = Concurrency()
    monkeypatch.setattr(render, "load_image", seen.wrap(load_image))
    pool = ImagePool(LIMITS, pool="thread", workers=6, max_decode_bytes=int(one * budget_images))
    try:
        msgs = [Message(role="user", content="x")]
        await asyncio.gather(*(pool.prepare([data], [PIXELS], msgs) for _ in range(6)))
    finally:
        pool.close()
    assert seen.most == most
    assert pool.decoding is not None and pool.decoding.held == 0


async def test_a_job_larger_than_the_budget_still_runs_alone() -> None:
    pool = ImagePool(LIMITS, pool="thread", workers=2, max_decode_bytes=1000)
    try:
        prepared = await pool.prepare([png(1000, 1000)], [PIXELS], [Message(role="user", content="x")])
    finally:
        pool.close()
    assert prepared.images and pool.decoding is not None and pool.decoding.held == 0


async def test_a_cancelled_job_holds_its_bytes_until_its_decode_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow(*args: Any, **kw: Any) -> Any:
        entered.set()
        release.wait(10)
        return load_image(*args, **kw)

    monkeypatch.setattr(render, "load_image", slow)
    pool = ImagePool(LIMITS, pool="thread", workers=2, max_decode_bytes=10**9)
    assert pool.decoding is not None
    try:
        job = asyncio.create_task(
            pool.prepare([png(2000, 2000)], [PIXELS], [Message(role="user", content="x")])
        )
        assert await asyncio.to_thread(entered.wait, 10)
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        assert pool.decoding.held > 0  # its thread still decodes
        release.set()
        deadline = time.monotonic() + 10
        # Released from a callback when the thread ends: nothing to await but the budget.
        while pool.decoding.held and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        assert pool.decoding.held == 0
    finally:
        release.set()
        pool.close()
