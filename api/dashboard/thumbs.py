"""Thumbnails of jobs' input images, fetched by the worker's own fetcher under the workers'
own fetch policy (the same `VLMQ_*` settings: allowed buckets and file roots, URL schemes,
hosts and networks, size caps and timeouts), so the dashboard reaches nothing a worker
would not."""

from __future__ import annotations

import asyncio
import contextlib
import io
from typing import Any

import msgspec
import structlog
from PIL import Image

from vlmq.api.settings import ApiSettings
from vlmq.schemas.errors import redact
from vlmq.schemas.job import ImageRef
from vlmq.worker.fetch import Budget, Fetcher
from vlmq.worker.settings import WorkerSettings

log = structlog.get_logger("vlmq.dashboard")
SIZE = (160, 160)
# Shown for an image that cannot be fetched or decoded: a page never shows a broken image
# (nor logs a failed load in the browser's console).
PLACEHOLDER = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="160" height="120"><rect width="160" height="120"'
    b' fill="#eee"/><text x="80" y="64" font-family="sans-serif" font-size="12" text-anchor="middle"'
    b' fill="#666">no image</text></svg>'
)


class Thumbs:
    def __init__(self, settings: ApiSettings) -> None:
        policy = WorkerSettings.load({"s3_endpoint_url": settings.s3_endpoint_url})
        cap = min(policy.max_image_bytes, settings.thumb_max_bytes)
        self.settings = msgspec.structs.replace(policy, max_image_bytes=cap)
        self._fetcher: Fetcher | None = None
        self._lock = asyncio.Lock()

    async def _started(self) -> Fetcher:
        async with self._lock:
            if self._fetcher is None:
                self._fetcher = await Fetcher(self.settings).__aenter__()
            return self._fetcher

    async def get(self, ref: ImageRef | None) -> tuple[bytes, str]:
        """(body, media type): a JPEG thumbnail, or the placeholder SVG."""
        if ref is None:
            return PLACEHOLDER, "image/svg+xml"
        try:
            data = await (await self._started()).fetch(ref, Budget(self.settings.max_image_bytes))
            return await asyncio.to_thread(_thumb, data, self.settings.max_image_pixels), "image/jpeg"
        except Exception as exc:  # missing, refused, corrupt: the job's page says why
            log.info(
                "no thumbnail", uri=redact(ref.uri[:200]), error=redact(f"{type(exc).__name__}: {exc}"[:300])
            )
            return PLACEHOLDER, "image/svg+xml"

    async def close(self) -> None:
        if self._fetcher is not None:
            with contextlib.suppress(Exception):
                await self._fetcher.__aexit__(None, None, None)


def _thumb(data: bytes, max_pixels: int = 64_000_000) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        if img.size[0] * img.size[1] > max_pixels:  # from the header: a bomb is never decoded
            raise ValueError(f"{img.size[0]}x{img.size[1]} is over {max_pixels} pixels")
        img.draft("RGB", SIZE)  # JPEG: decode at a fraction of the size
        small: Any = img.convert("RGB")
        small.thumbnail(SIZE)
        out = io.BytesIO()
        small.save(out, "JPEG", quality=80)
        return out.getvalue()
