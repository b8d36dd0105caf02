"""What the fake engine must answer for a job: computed from the same bytes, independently
of the worker process (the worker fetched them from S3 and decoded them itself)."""

from __future__ import annotations

from vlmq.schemas.job import Job, Sampling
from vlmq.worker.engines.base import EngineRequest
from vlmq.worker.engines.fake import answer
from vlmq.worker.preprocess import load_image
from vlmq.worker.settings import WorkerSettings


def expected_text(job: Job, image_bytes: list[bytes], s: WorkerSettings | None = None) -> str:
    s = s or WorkerSettings()
    images = [
        load_image(
            b,
            factor=28,
            min_pixels=ref.min_pixels or s.min_pixels,
            max_pixels=ref.max_pixels or s.max_pixels,
            max_image_pixels=s.max_image_pixels,
        )
        for b, ref in zip(image_bytes, job.images, strict=True)
    ]
    req = EngineRequest(
        request_id=job.job_id,
        messages=job.messages,
        images=images,
        sampling=job.sampling or Sampling(),
        response_format=job.response_format,
    )
    return answer(req)
