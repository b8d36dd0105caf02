"""Stage: fetched bytes -> what the engine takes, off the event loop.

Decode, EXIF and resize (preprocess.load_image; for videos video.load_video; embeddings
are checked by embeds.load_embedding) run in a pool: threads of the worker (the default;
the engine then renders the images into its input), or processes, where an engine with a
renderer (vLLM) also renders there: chat template, tokenizer, HF image processor, and the
engine gets finished inputs. On an H200 with vLLM 0.26 neither pool was faster at every
photo size (docs/performance.md); processes are there for engines whose front end saturates.

Finished inputs hold tensors (Qwen-VL's pixel_values are ~24 MB per image at the default
pixel budget): they cross from the pool through shared memory (torch's multiprocessing
pickler), and `RenderBudget` bounds the bytes held between render and the engine's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import sys
from collections.abc import Mapping
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias

import msgspec
import structlog

from vlmq.schemas.errors import ErrorCode, VlmqError, describe
from vlmq.schemas.job import EmbeddingRef, Message
from vlmq.worker.embeds import Embedding, EmbedSpec, load_embedding
from vlmq.worker.preprocess import decode_bytes, load_image
from vlmq.worker.video import Video, VideoLimits, VideoSampling, load_video

if TYPE_CHECKING:
    from PIL.Image import Image

    from vlmq.worker.engines.base import Engine
    from vlmq.worker.settings import WorkerSettings

log = structlog.get_logger("vlmq.render")

# Bytes a rendered image is assumed to take until its real size is known: Qwen-VL's float32
# pixel_values (3 channels x 2 frames x 4 bytes per pixel), the heaviest common processor.
BYTES_PER_PIXEL_ESTIMATE = 24


class Renderer(Protocol):
    """An engine's own input renderer, built once in each pool process."""

    def render(self, messages: list[Message], inputs: Prepared) -> tuple[Any, int]:
        """(the engine's finished input, the bytes its tensors hold) for the decoded inputs."""
        ...


class RendererFactory(Protocol):
    """Picklable: sent to each pool process, called there once."""

    def __call__(self) -> Renderer: ...


class DecodeLimits(msgspec.Struct, frozen=True):
    factor: int
    max_image_pixels: int
    formats: tuple[str, ...]
    video: VideoLimits = VideoLimits()
    embeds: EmbedSpec | None = None  # what the engine takes as image embeddings (None: none)


# How one input of a job is prepared: an image's (min, max) pixels, a video's sampling, or
# (embeddings) the part itself, whose grid is checked against the file.
Sizing = tuple[int, int] | VideoSampling | EmbeddingRef
Decoded: TypeAlias = "Image | Video | Embedding"


class Prepared(msgspec.Struct):
    """A job's inputs as the engine takes them: decoded (checked), or a finished input."""

    images: list[Image]
    videos: list[Video] = []
    embeds: list[Embedding] = []
    rendered: Any = None
    nbytes: int = 0

    @classmethod
    def decoded(cls, media: list[Decoded]) -> Prepared:
        videos = [m for m in media if isinstance(m, Video)]
        embeds = [m for m in media if isinstance(m, Embedding)]
        images = [m for m in media if not isinstance(m, Video | Embedding)]
        nbytes = sum(i.width * i.height * 3 for i in images)  # RGB
        nbytes += sum(v.nbytes for v in videos) + sum(e.nbytes for e in embeds)
        return cls(images, videos, embeds, nbytes=nbytes)


# One per pool process, set by _init.
_RENDERER: Renderer | None = None
_LIMITS: DecodeLimits | None = None


def _init(limits: DecodeLimits, factory: RendererFactory | None) -> None:
    global _RENDERER, _LIMITS
    _LIMITS = limits
    _RENDERER = factory() if factory is not None else None
    _one_thread()


def _one_thread() -> None:
    """Parallelism here is the pool's processes. Torch (transformers' torchvision image
    processors, vLLM's renderer) would size an intra-op thread pool to the machine's cores
    in each of them, beside the engine's own processes on the same cores."""
    if "torch" in sys.modules:  # imported by the renderer; never imported just for this
        sys.modules["torch"].set_num_threads(1)


def _decode(limits: DecodeLimits, blobs: list[bytes], sizing: list[Sizing]) -> list[Decoded]:
    return [_decode_one(limits, b, how) for b, how in zip(blobs, sizing, strict=True)]


def _decode_one(limits: DecodeLimits, blob: bytes, how: Sizing) -> Decoded:
    if isinstance(how, VideoSampling):
        return load_video(blob, how, limits.video, limits.factor)
    if isinstance(how, EmbeddingRef):
        assert limits.embeds is not None, "the pipeline refuses embeddings an engine does not take"
        return load_embedding(blob, how.image_grid_thw, limits.embeds)
    lo, hi = how
    return load_image(
        blob,
        factor=limits.factor,
        min_pixels=lo,
        max_pixels=hi,
        max_image_pixels=limits.max_image_pixels,
        formats=limits.formats or None,
    )


def decode_cost(limits: DecodeLimits, blobs: list[bytes], sizing: list[Sizing]) -> int:
    """Bytes decoding a job's images holds at its peak, read from their headers: the
    largest image's full-size decode (a job's images are decoded one after another, and
    each is freed once resized). Videos and embeddings count nothing here."""
    costs = [
        decode_bytes(
            b,
            factor=limits.factor,
            min_pixels=how[0],
            max_pixels=how[1],
            max_image_pixels=limits.max_image_pixels,
            formats=limits.formats or None,
        )
        for b, how in zip(blobs, sizing, strict=True)
        if isinstance(how, tuple)
    ]
    return max(costs, default=0)


def _prepare(blobs: list[bytes], sizing: list[Sizing], messages: list[Message]) -> Prepared:
    """In a pool process. Only VlmqError leaves it: any other exception (which may not even
    pickle) becomes this job's typed failure here."""
    assert _LIMITS is not None
    decoded = Prepared.decoded(_decode(_LIMITS, blobs, sizing))
    if _RENDERER is None:
        return decoded
    try:
        rendered, nbytes = _RENDERER.render(messages, decoded)
    except VlmqError:
        raise
    except Exception as exc:
        from vlmq.worker.engines.mapping import engine_error

        raise engine_error(exc) from None
    return Prepared([], rendered=rendered, nbytes=nbytes)


def tensor_bytes(rendered: Any) -> int:
    """Bytes of the arrays in an engine's finished input, however it nests them: mappings
    (dicts, transformers' BatchFeature), lists and tuples, and vLLM's field elements, which
    hold theirs in `data`. What `RenderBudget` charges a rendered job."""
    nbytes = getattr(rendered, "nbytes", None)
    if isinstance(nbytes, int):  # a tensor or an array
        return nbytes
    if isinstance(rendered, Mapping):
        return sum(tensor_bytes(v) for v in rendered.values())
    if isinstance(rendered, list | tuple):
        return sum(tensor_bytes(v) for v in rendered)
    data = getattr(rendered, "data", None)
    return tensor_bytes(data) if data is not None else 0


class RenderBudget:
    """Bytes held at once (a weighted semaphore): prepared inputs (`max_render_bytes`; a job
    reserves an estimate before it is prepared, trues it up once its size is known, and
    gives it back when the engine has answered), or images being decoded
    (`max_decode_bytes`, `ImagePool.prepare`). One job larger than the whole budget still
    runs, alone. Giving back never waits, so a job cancelled twice cannot leak its bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiters: list[asyncio.Future[None]] = []

    async def acquire(self, n: int) -> int:
        while self.held and self.held + n > self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
        self.held += n
        return n

    def resize(self, old: int, new: int) -> int:
        self.held += new - old
        for waiter in self._waiters:  # each rechecks; those that still do not fit wait again
            if not waiter.done():
                waiter.set_result(None)
        return new

    def release(self, n: int) -> None:
        self.resize(n, 0)


def _raise_fd_limit() -> None:
    """Each tensor from the pool arrives as a file descriptor of shared memory, held until
    the engine has taken the input: hundreds in flight pass a 1024 soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ImagePool:
    """Prepares jobs' images in processes (with the engine's renderer) or threads."""

    def __init__(
        self,
        limits: DecodeLimits,
        *,
        pool: Literal["process", "thread"],
        workers: int,
        renderer: RendererFactory | None = None,
        max_decode_bytes: int | None = None,
    ) -> None:
        self.limits = limits
        self.kind = pool
        self.workers = workers
        self.renderer = renderer if pool == "process" else None
        # Images being decoded, by their full-size bytes: a pool of small files that decode
        # to 64 megapixels each would otherwise hold workers x 300+ MB at once.
        self.decoding = RenderBudget(max_decode_bytes) if max_decode_bytes else None
        self._executor = self._start(workers)
        self._generation = 0
        self._alone: Executor | None = None  # where jobs run again after their pool broke
        self._alone_lock = asyncio.Lock()

    @classmethod
    def for_engine(
        cls, engine: Engine, settings: WorkerSettings, kind: Literal["process", "thread"]
    ) -> ImagePool:
        """The pool a worker with these settings runs for this (started) engine."""
        video = VideoLimits(
            max_frames=settings.max_video_frames,
            max_seconds=settings.max_video_s,
            max_frame_pixels=settings.max_image_pixels,
            default_fps=settings.video_fps,
            formats=tuple(settings.video_formats),
        )
        formats = tuple(settings.image_formats)
        limits = DecodeLimits(engine.image_factor, settings.max_image_pixels, formats, video, engine.embeds)
        factory = engine.renderer() if kind == "process" else None
        workers = settings.pool_workers(kind)
        return cls(
            limits, pool=kind, workers=workers, renderer=factory, max_decode_bytes=settings.max_decode_bytes
        )

    @property
    def renders(self) -> bool:
        """Whether prepared jobs are finished engine inputs (else decoded images)."""
        return self.renderer is not None

    def _start(self, workers: int) -> Executor:
        if self.kind == "thread":
            return ThreadPoolExecutor(workers, thread_name_prefix="decode")
        _raise_fd_limit()
        # spawn: a fork of a process holding CUDA, an event loop and sockets is unsafe.
        ctx = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init, initargs=(self.limits, self.renderer)
        )

    def close(self) -> None:
        for executor in (self._executor, self._alone):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)

    async def warm(self) -> None:
        """Start every process now (and build its renderer), not on the first jobs."""
        if self.kind == "process":
            loop = asyncio.get_running_loop()
            pids = (loop.run_in_executor(self._executor, os.getpid) for _ in range(self.workers))
            await asyncio.gather(*pids)

    async def prepare(self, blobs: list[bytes], sizing: list[Sizing], messages: list[Message]) -> Prepared:
        """The job's inputs prepared, once the decode budget has room for its largest image."""
        cost = decode_cost(self.limits, blobs, sizing) if self.decoding is not None else 0
        if self.decoding is None or not cost:
            return await self._prepare(blobs, sizing, messages)
        held = await self.decoding.acquire(cost)
        work = asyncio.ensure_future(self._prepare(blobs, sizing, messages))
        # A job cancelled meanwhile does not stop its thread or process: the bytes stay held
        # until the decode has really ended.
        work.add_done_callback(lambda done: self._decoded(done, held))
        return await asyncio.shield(work)

    def _decoded(self, work: asyncio.Future[Prepared], held: int) -> None:
        assert self.decoding is not None
        self.decoding.release(held)
        if not work.cancelled():
            work.exception()  # retrieved: a cancelled job's failure is no one's to log

    async def _prepare(self, blobs: list[bytes], sizing: list[Sizing], messages: list[Message]) -> Prepared:
        if self.kind == "thread":
            media = await asyncio.get_running_loop().run_in_executor(
                self._executor, _decode, self.limits, blobs, sizing
            )
            return Prepared.decoded(media)
        # A process that dies (a decoder crash, the OOM killer) breaks the whole pool and
        # every job in it: the pool restarts, and each of those jobs is tried again alone, in
        # a process of its own, where dying can only be its own doing.
        generation = self._generation
        try:
            return await self._submit(self._executor, blobs, sizing, messages)
        except BrokenProcessPool:
            self._restart(generation)
        async with self._alone_lock:
            if self._alone is None:
                self._alone = self._start(1)
            try:
                return await self._submit(self._alone, blobs, sizing, messages)
            except BrokenProcessPool:
                self._alone.shutdown(wait=False, cancel_futures=True)
                self._alone = None
                raise VlmqError(
                    ErrorCode.INTERNAL,
                    "the image process died on this job, also when it ran alone "
                    "(a decoder crash or out of memory)",
                ) from None

    @staticmethod
    async def _submit(
        executor: Executor, blobs: list[bytes], sizing: list[Sizing], messages: list[Message]
    ) -> Prepared:
        try:
            return await asyncio.wrap_future(executor.submit(_prepare, blobs, sizing, messages))
        except (VlmqError, BrokenProcessPool):
            raise
        except Exception as exc:  # e.g. a result that could not be unpickled
            raise VlmqError(ErrorCode.INTERNAL, f"image process: {describe(exc)}") from None

    def _restart(self, generation: int) -> None:
        if generation != self._generation:  # another job restarted it already
            return
        log.warning("image process pool broke; restarting it", workers=self.workers)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._start(self.workers)
        self._generation += 1
