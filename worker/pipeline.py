"""Stages between claim and publish: check -> fetch -> preprocess -> generate -> Result.

One job at a time per call; many calls run concurrently (the consumer bounds how many).
Each stage raises VlmqError with a code for bad input; this module turns the stages'
outcome into a `Result` and knows nothing about Kafka or Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import structlog

from vlmq.core import tracing
from vlmq.core.retry import within
from vlmq.schemas.errors import ErrorCode, VlmqError, describe
from vlmq.schemas.job import (
    ChoiceFormat,
    EmbeddingRef,
    Error,
    ImageRef,
    Job,
    JobState,
    JsonSchemaFormat,
    MediaRef,
    Result,
    TextPart,
    Timings,
    Usage,
)
from vlmq.worker import metrics
from vlmq.worker.cache import ResultCache, cached_result
from vlmq.worker.engines.base import Engine, EngineConfigError, EngineDead, EngineOutput, EngineRequest
from vlmq.worker.fetch import Budget, Fetcher
from vlmq.worker.render import BYTES_PER_PIXEL_ESTIMATE, ImagePool, Prepared, RenderBudget, Sizing
from vlmq.worker.settings import WorkerSettings
from vlmq.worker.video import VideoSampling

log = structlog.get_logger("vlmq.pipeline")


class Pipeline:
    def __init__(
        self, settings: WorkerSettings, fetcher: Fetcher, engine: Engine, cache: ResultCache | None = None
    ) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.engine = engine
        self.cache = cache  # the result cache (worker/cache.py); None: every job runs
        self.images = ImagePool.for_engine(engine, settings, settings.image_pool)
        self.budget = RenderBudget(settings.max_render_bytes)
        self._preparing = 0
        self._gate = asyncio.Lock()  # FIFO: only the first job in line watches the engine

    async def start(self) -> None:
        """Start the image processes (each builds the engine's renderer) before any job."""
        try:
            await self.images.warm()
        except BrokenProcessPool:
            raise EngineConfigError(
                "the image processes could not start (their error is printed above); "
                "--image-pool thread runs without them"
            ) from None
        pool = self.images
        log.info("image pool ready", pool=pool.kind, workers=pool.workers, renders=pool.renders)
        if self.cache is not None:
            self.cache.start()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self.images.close()

    async def settle(self, result: Result, wrote: bool) -> None:
        """After the job's terminal write (`wrote`: this call ended it): the result cache
        takes its answer, or lets identical waiting jobs run."""
        if self.cache is not None:
            await self.cache.settle(result, wrote)

    def forget(self, job_id: str) -> None:
        """The job's handling is over (however it ended): nothing of it stays in the cache."""
        if self.cache is not None:
            self.cache.forget(job_id)

    async def run(self, job: Job, attempt: int) -> Result:
        """The job's terminal Result (succeeded or failed); cancellation propagates."""
        timings = Timings(submitted_at=job.submitted_at, started_at=time.time())
        try:
            self.check(job)
            out = await self._run(job, attempt, timings)
            if isinstance(out, dict):  # the result cache answered
                return self.result(job, JobState.SUCCEEDED, attempt, timings, **out)
        except VlmqError as exc:
            error = Error(exc.code, exc.message, exc.retryable)
            return self.result(job, JobState.FAILED, attempt, timings, error=error)
        except EngineDead:
            raise
        except Exception as exc:  # a bug or a library's surprise: this job fails, the worker serves on
            log.exception("job failed unexpectedly", job_id=job.job_id)
            error = Error(ErrorCode.INTERNAL, describe(exc), True)
            return self.result(job, JobState.FAILED, attempt, timings, error=error)
        return self._succeeded(job, out, attempt, timings)

    def check(self, job: Job) -> None:
        """Limits this worker enforces beyond the contract's own."""
        if job.model and job.model != self.engine.model:
            raise VlmqError(
                ErrorCode.UNKNOWN_MODEL, f"this worker serves {self.engine.model!r}, not {job.model!r}"
            )
        images, videos, embeds = job.counts()
        n = images + embeds  # images and embeddings alike
        if n > self.settings.max_images_per_job:
            raise VlmqError(
                ErrorCode.TOO_MANY_IMAGES,
                f"{n} images > max_images_per_job {self.settings.max_images_per_job}",
            )
        self._check_videos(videos)
        self._check_embeds(embeds, images=images)
        topic = job.result_topic
        if topic is not None and not self.result_topic_allowed(topic):
            raise VlmqError(ErrorCode.INVALID_JOB, f"result_topic {topic!r} is not allowed on this worker")
        chars = sum(len(p.text) for m in job.messages for p in m.parts if isinstance(p, TextPart))
        if chars > self.settings.max_prompt_chars:
            raise VlmqError(
                ErrorCode.PROMPT_TOO_LONG,
                f"{chars} prompt characters > max_prompt_chars {self.settings.max_prompt_chars}",
            )

    def _check_videos(self, n: int) -> None:
        if not n:
            return
        if not self.engine.takes_video:
            raise VlmqError(
                ErrorCode.UNSUPPORTED_INPUT, f"the {self.engine.name} engine takes no video input"
            )
        most = self.settings.max_videos_per_job
        if not most:
            raise VlmqError(ErrorCode.UNSUPPORTED_INPUT, "this worker takes no videos (max_videos_per_job 0)")
        if n > most:
            raise VlmqError(ErrorCode.TOO_MANY_IMAGES, f"{n} videos > max_videos_per_job {most}")

    def _check_embeds(self, n: int, images: int) -> None:
        if not n:
            return
        if self.engine.embeds is None:
            raise VlmqError(
                ErrorCode.UNSUPPORTED_INPUT,
                f"this worker takes no image embeddings (the {self.engine.name} engine, "
                "started without enable_mm_embeds)",
            )
        if images:  # vLLM takes one kind per modality in a prompt: pixels or embeddings
            raise VlmqError(
                ErrorCode.UNSUPPORTED_INPUT, "images and image embeddings in one job: send one kind"
            )

    def result_topic_allowed(self, topic: str) -> bool:
        """Whether results may go to `topic`: never into the jobs or the dead-letter topic."""
        s = self.settings
        if s.allowed_result_topics:
            return topic in s.allowed_result_topics
        return topic not in (s.jobs_topic, s.dlq_topic)  # never into the queue or the DLQ

    async def _run(self, job: Job, attempt: int, timings: Timings) -> EngineOutput | dict[str, Any]:
        """The engine's output, or the cached answer's Result fields."""
        media = job.media
        blobs = await self._fetch(media, timings) if media else []
        sizing = [self._sizing(ref) for ref in media]
        if self.cache is not None:  # after the fetch: the key is over the bytes, not the URLs
            hit = await self.cache.lookup(job, blobs, sizing)
            if hit is not None:
                return cached_result(hit, time.time())
        if not media:
            return await self._generate(job, attempt, Prepared([]), timings)
        # Bytes of prepared inputs are bounded from before they exist until the engine answers.
        held = await self.budget.acquire(BYTES_PER_PIXEL_ESTIMATE * sum(self._most_pixels(s) for s in sizing))
        try:
            await self._admit()
            t0 = time.perf_counter()
            try:
                with tracing.span("vlmq.preprocess", {"vlmq.media.count": len(blobs)}):
                    prepared = await self.images.prepare(blobs, sizing, job.messages)
            finally:
                self._preparing -= 1
            timings.preprocess_s = time.perf_counter() - t0
            metrics.STAGE.labels("preprocess").observe(timings.preprocess_s)
            del blobs
            held = self.budget.resize(held, prepared.nbytes)
            return await self._generate(job, attempt, prepared, timings)
        finally:
            self.budget.release(held)

    async def _fetch(self, media: list[MediaRef], timings: Timings) -> list[bytes]:
        t0 = time.perf_counter()
        budget = Budget(self.settings.max_job_bytes)
        if len(media) == 1:  # the common case: no task for gather to wrap it in
            blobs = [await self.fetcher.fetch(media[0], budget)]
        else:
            blobs = list(await asyncio.gather(*(self.fetcher.fetch(r, budget) for r in media)))
        timings.fetch_s = time.perf_counter() - t0
        metrics.STAGE.labels("fetch").observe(timings.fetch_s)
        metrics.IMAGE_BYTES.inc(sum(len(b) for b in blobs))
        return blobs

    def _sizing(self, ref: MediaRef) -> Sizing:
        """An image's (min, max) pixels, or a video's sampling with each frame's: a job may
        ask for fewer pixels than the worker's budget, never for more."""
        s = self.settings
        if isinstance(ref, EmbeddingRef):
            return ref
        if isinstance(ref, ImageRef):
            hi = min(ref.max_pixels or s.max_pixels, s.max_pixels)
            return min(ref.min_pixels or s.min_pixels, hi), hi
        hi = min(ref.max_pixels or s.video_max_pixels, s.video_max_pixels)
        lo = min(ref.min_pixels or s.video_min_pixels, hi)
        return VideoSampling(fps=ref.fps, num_frames=ref.num_frames, min_pixels=lo, max_pixels=hi)

    def _most_pixels(self, sizing: Sizing) -> int:
        if isinstance(sizing, VideoSampling):
            return sizing.max_pixels * self.settings.max_video_frames
        if isinstance(sizing, EmbeddingRef):  # its bytes, counted as pixels of the estimate
            return self.settings.max_embedding_bytes // BYTES_PER_PIXEL_ESTIMATE
        return sizing[1]

    @tracing.traced("vlmq.admit")  # the wait for room in the engine's queue
    async def _admit(self) -> None:
        """Render ahead of the engine by no more than its waiting queue needs: jobs being
        prepared plus those waiting in the engine stay under `engine_waiting_target`, so the
        engine always has work queued and memory holds no more than that."""
        target = self.settings.engine_waiting_target
        async with self._gate:
            # The engine's queue drains at its own pace and says nothing when it does: poll.
            while self._preparing + int(self.engine.stats().get("waiting", 0)) >= target:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            self._preparing += 1

    async def _generate(self, job: Job, attempt: int, prepared: Prepared, timings: Timings) -> EngineOutput:
        request = EngineRequest(
            request_id=f"{job.job_id}#{attempt}",  # an earlier attempt may still be aborting
            messages=job.messages,
            images=prepared.images,
            videos=prepared.videos,
            embeds=prepared.embeds,
            rendered=prepared.rendered,
            sampling=job.sampling,
            response_format=job.response_format,
            priority=job.priority,
        )
        t0, started = time.perf_counter(), time.time()
        finished = False
        try:
            with tracing.span("vlmq.engine", {"gen_ai.request.model": self.engine.model}):
                out = await within(self.engine.generate(request), self.settings.job_timeout_s)
                _engine_stages(started, time.time(), out)
            finished = True
        except TimeoutError:
            raise VlmqError(ErrorCode.TIMEOUT, f"engine took over {self.settings.job_timeout_s}s") from None
        except (VlmqError, EngineDead):
            raise
        except Exception as exc:  # engine internals: report, keep serving
            raise VlmqError(ErrorCode.ENGINE_ERROR, f"{type(exc).__name__}: {exc}") from None
        finally:
            # Timed out, failed or cancelled: never leave the request inside the engine.
            if not finished:
                await _abort_quietly(self.engine, request.request_id)
        timings.engine_s, timings.ttft_s = time.perf_counter() - t0, out.ttft_s
        metrics.STAGE.labels("engine").observe(timings.engine_s)
        return out

    def _succeeded(self, job: Job, out: EngineOutput, attempt: int, timings: Timings) -> Result:
        parsed = None
        fmt = job.response_format
        # An engine (or an OpenAI-compatible server that ignored the constraint) answering
        # outside the format fails typed: a result is never claimed valid when it is not.
        if isinstance(fmt, ChoiceFormat) and out.text not in fmt.choices:
            return self._off_format(job, out, attempt, timings, "engine output is not one of the choices")
        if isinstance(fmt, JsonSchemaFormat):
            try:
                parsed = json.loads(out.text)
            except ValueError:
                return self._off_format(job, out, attempt, timings, "engine output is not valid JSON")
        usage = Usage(out.prompt_tokens, out.completion_tokens, out.image_tokens)
        return self.result(
            job,
            JobState.SUCCEEDED,
            attempt,
            timings,
            text=out.text,
            parsed=parsed,
            finish_reason=out.finish_reason,
            usage=usage,
        )

    def _off_format(self, job: Job, out: EngineOutput, attempt: int, timings: Timings, why: str) -> Result:
        error = Error(ErrorCode.ENGINE_ERROR, why, True)
        return self.result(job, JobState.FAILED, attempt, timings, error=error, text=out.text)

    def result(
        self,
        job: Job,
        state: JobState,
        attempt: int,
        timings: Timings | None = None,
        *,
        error: Error | None = None,
        text: str | None = None,
        parsed: Any = None,
        finish_reason: str | None = None,
        usage: Usage | None = None,
        **cached: Any,
    ) -> Result:
        """The job's terminal record, stamped with this worker, its model and the time."""
        timings = timings or Timings(submitted_at=job.submitted_at)
        timings.finished_at = time.time()
        return Result(
            job_id=job.job_id,
            state=state,
            model=self.engine.model,
            worker=self.settings.worker_id,
            attempt=attempt,
            timings=timings,
            batch_id=job.batch_id,
            metadata=job.metadata,
            error=error,
            text=text,
            parsed=parsed,
            finish_reason=finish_reason,
            usage=usage,
            trace_id=tracing.trace_id(),
            **cached,
        )


def _engine_stages(started: float, ended: float, out: EngineOutput) -> None:
    """The engine's own first-token time split its span in two: prefill (queue, vision
    encoder and prompt) and generation (decode)."""
    if not tracing.ON:
        return
    tracing.annotate(
        {
            "gen_ai.usage.input_tokens": out.prompt_tokens,
            "gen_ai.usage.output_tokens": out.completion_tokens,
            "gen_ai.response.finish_reasons": [out.finish_reason] if out.finish_reason else None,
        }
    )
    if out.ttft_s is not None:
        first = min(started + out.ttft_s, ended)
        tracing.timed("vlmq.engine.prefill", started, first)
        tracing.timed("vlmq.engine.generate", first, ended)


async def _abort_quietly(engine: Engine, request_id: str) -> None:
    # A failed abort must not hide the job's own outcome.
    with contextlib.suppress(Exception):
        await asyncio.shield(engine.abort(request_id))
