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
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import structlog

from vlmq.core.retry import within
from vlmq.schemas.errors import ErrorCode, VlmqError, describe
from vlmq.schemas.job import (
    Error,
    ImageRef,
    Job,
    JobState,
    JsonSchemaFormat,
    Result,
    TextPart,
    Timings,
    Usage,
)
from vlmq.worker import metrics
from vlmq.worker.engines.base import Engine, EngineDead, EngineOutput, EngineRequest
from vlmq.worker.fetch import Budget, Fetcher
from vlmq.worker.preprocess import load_image
from vlmq.worker.settings import WorkerSettings

if TYPE_CHECKING:
    from PIL.Image import Image

log = structlog.get_logger("vlmq.pipeline")


class Pipeline:
    def __init__(self, settings: WorkerSettings, fetcher: Fetcher, engine: Engine) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.engine = engine
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, job: Job, attempt: int) -> Result:
        """The job's terminal Result (succeeded or failed); cancellation propagates."""
        timings = Timings(submitted_at=job.submitted_at, started_at=time.time())
        try:
            self.check(job)
            images = await self._images(job, timings)
            out = await self._generate(job, attempt, images, timings)
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
        n = len(job.images)
        if n > self.settings.max_images_per_job:
            raise VlmqError(
                ErrorCode.TOO_MANY_IMAGES,
                f"{n} images > max_images_per_job {self.settings.max_images_per_job}",
            )
        topic = job.result_topic
        if topic is not None and not self.result_topic_allowed(topic):
            raise VlmqError(ErrorCode.INVALID_JOB, f"result_topic {topic!r} is not allowed on this worker")
        chars = sum(len(p.text) for m in job.messages for p in m.parts if isinstance(p, TextPart))
        if chars > self.settings.max_prompt_chars:
            raise VlmqError(
                ErrorCode.PROMPT_TOO_LONG,
                f"{chars} prompt characters > max_prompt_chars {self.settings.max_prompt_chars}",
            )

    def result_topic_allowed(self, topic: str) -> bool:
        """Whether results may go to `topic`: never into the jobs or the dead-letter topic."""
        s = self.settings
        if s.allowed_result_topics:
            return topic in s.allowed_result_topics
        return topic not in (s.jobs_topic, s.dlq_topic)  # never into the queue or the DLQ

    async def _images(self, job: Job, timings: Timings) -> list[Image]:
        refs = job.images
        if not refs:
            return []
        t0 = time.perf_counter()
        budget = Budget(self.settings.max_job_bytes)
        blobs = await asyncio.gather(*(self.fetcher.fetch(r, budget) for r in refs))
        t1 = time.perf_counter()
        metrics.IMAGE_BYTES.inc(sum(len(b) for b in blobs))
        loop = asyncio.get_running_loop()
        images = await asyncio.gather(
            *(loop.run_in_executor(self.pool, self._decode, b, r) for b, r in zip(blobs, refs, strict=True))
        )
        timings.fetch_s, timings.preprocess_s = t1 - t0, time.perf_counter() - t1
        metrics.STAGE.labels("fetch").observe(timings.fetch_s)
        metrics.STAGE.labels("preprocess").observe(timings.preprocess_s)
        return list(images)

    def _decode(self, data: bytes, ref: ImageRef) -> Image:
        # A job may ask for fewer pixels than the worker's budget, never for more.
        max_pixels = min(ref.max_pixels or self.settings.max_pixels, self.settings.max_pixels)
        min_pixels = min(ref.min_pixels or self.settings.min_pixels, max_pixels)
        return load_image(
            data,
            factor=self.engine.image_factor,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            max_image_pixels=self.settings.max_image_pixels,
            formats=tuple(self.settings.image_formats),
        )

    async def _generate(self, job: Job, attempt: int, images: list[Image], timings: Timings) -> EngineOutput:
        request = EngineRequest(
            request_id=f"{job.job_id}#{attempt}",  # an earlier attempt may still be aborting
            messages=job.messages,
            images=images,
            sampling=job.sampling,
            response_format=job.response_format,
            priority=job.priority,
        )
        t0 = time.perf_counter()
        finished = False
        try:
            out = await within(self.engine.generate(request), self.settings.job_timeout_s)
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
        if isinstance(job.response_format, JsonSchemaFormat):
            try:
                parsed = json.loads(out.text)
            except ValueError:
                return self.result(
                    job,
                    JobState.FAILED,
                    attempt,
                    timings,
                    error=Error(ErrorCode.ENGINE_ERROR, "engine output is not valid JSON", True),
                    text=out.text,
                )
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
        )


async def _abort_quietly(engine: Engine, request_id: str) -> None:
    # A failed abort must not hide the job's own outcome.
    with contextlib.suppress(Exception):
        await asyncio.shield(engine.abort(request_id))
