"""Job ids and builders for the two main jobs: captions and moderation."""

from __future__ import annotations

import hashlib
import os
import re
import time
from typing import Any

import msgspec

from vlmq.schemas import keys
from vlmq.schemas.job import (
    ChoiceFormat,
    EmbeddingRef,
    ImageRef,
    Job,
    JsonSchemaFormat,
    Message,
    ResponseFormat,
    Sampling,
    TextPart,
    VideoRef,
)

DEFAULT_CAPTION_PROMPT = "Describe this image in one or two sentences."
_SAFE = re.compile(r"[^A-Za-z0-9._\-]")


def new_job_id() -> str:
    """A UUIDv7 (RFC 9562): time-ordered, so ids sort by submission time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 64) & 0xFFF) << 64 | (0b10 << 62) | (rand & ((1 << 62) - 1))
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def batch_job_id(batch_id: str, key: str) -> str:
    """Deterministic id for item `key` of a batch: a resumed submit never duplicates a job."""
    safe = _SAFE.sub("_", key)[:64]
    digest = hashlib.blake2b(key.encode(), digest_size=6).hexdigest()
    return f"{batch_id}:{safe}:{digest}"


def user(*parts: str | ImageRef | VideoRef | EmbeddingRef) -> Message:
    """A user message from strings (text), ImageRefs, VideoRefs and EmbeddingRefs, in order."""
    return Message("user", [TextPart(p) if isinstance(p, str) else p for p in parts])


def image(uri: str, **kw: Any) -> ImageRef:
    return ImageRef(uri, **kw)


def _image(image: str | ImageRef | EmbeddingRef) -> ImageRef | EmbeddingRef:
    return ImageRef(image) if isinstance(image, str) else image


def embeddings(uri: str, image_grid_thw: list[int] | None = None, sha256: str | None = None) -> EmbeddingRef:
    """Precomputed image embeddings (a safetensors file of one [tokens, hidden] tensor
    `image_embeds`) in place of an image; Qwen-VL models need the image's [t, h, w] grid."""
    return EmbeddingRef(uri, sha256=sha256, image_grid_thw=image_grid_thw)


def caption(
    image_uri: str | ImageRef | EmbeddingRef,
    prompt: str = DEFAULT_CAPTION_PROMPT,
    *,
    job_id: str | None = None,
    max_tokens: int = 128,
    **job: Any,
) -> Job:
    """A caption job for one image (a URI, or a ref: an ImageRef, image embeddings)."""
    return Job(
        job_id=job_id or new_job_id(),
        messages=[user(_image(image_uri), prompt)],
        sampling=Sampling(max_tokens=max_tokens),
        **job,
    )


DEFAULT_VIDEO_PROMPT = "Describe what happens in this video."


def video(
    video_uri: str,
    prompt: str = DEFAULT_VIDEO_PROMPT,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
    job_id: str | None = None,
    max_tokens: int = 256,
    **job: Any,
) -> Job:
    """A job about one video (mp4, webm, mov, mkv), given to the model as frames: `fps`
    per second of video, or `num_frames` spread evenly (default: the worker's video_fps)."""
    return Job(
        job_id=job_id or new_job_id(),
        messages=[user(VideoRef(video_uri, fps=fps, num_frames=num_frames), prompt)],
        sampling=Sampling(max_tokens=max_tokens),
        **job,
    )


def moderate(
    image_uri: str | ImageRef | EmbeddingRef,
    labels: list[str],
    *,
    prompt: str | None = None,
    job_id: str | None = None,
    with_reason: bool = False,
    **job: Any,
) -> Job:
    """A moderation job: the answer is exactly one of `labels` (a choice), or a JSON object
    {"label": ..., "reason": ...} when `with_reason`."""
    prompt = prompt or (
        "Classify this image for content moderation. Answer with exactly one label of: "
        + ", ".join(labels)
        + "."
    )
    fmt: ResponseFormat = ChoiceFormat(list(labels))
    if with_reason:
        fmt = JsonSchemaFormat(
            {
                "type": "object",
                "properties": {"label": {"enum": list(labels)}, "reason": {"type": "string"}},
                "required": ["label", "reason"],
            }
        )
    return Job(
        job_id=job_id or new_job_id(),
        messages=[user(_image(image_uri), prompt)],
        sampling=Sampling(max_tokens=64),
        response_format=fmt,
        **job,
    )


def with_tenant(job: Job, tenant: str | None) -> Job:
    """The job as submitted for `tenant` (metadata `vlmq.tenant`: the result cache's scope,
    docs/cache.md); None leaves the job as it is. The submitter's setting wins over what the
    job carried: whoever records the job decides its tenant."""
    if tenant is None:
        return job
    return msgspec.structs.replace(job, metadata={**job.metadata, keys.CACHE_SCOPE_FIELD: tenant})
