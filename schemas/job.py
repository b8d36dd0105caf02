"""The job and its result: what travels on Kafka and what lands in Redis.

Structs are tight (msgspec, `omit_defaults`) but not `array_like`: the JSON form is what
clients in other languages read, so fields keep their names. Unknown fields are ignored
(forward compatibility); invalid values are rejected with the field's path in the message.
"""

from __future__ import annotations

import enum
import re
import warnings
from typing import Annotated, Any, ClassVar, Literal

from msgspec import Meta, Struct
from msgspec import json as _msgspec_json

from vlmq.schemas.errors import ErrorCode, redact

VERSION = 1
"""Schema version this code writes. It reads any version <= VERSION."""

MAX_IMAGES_PER_JOB = 256  # the contract's hard cap; workers enforce a lower, configurable one
MAX_VIDEOS_PER_JOB = 16  # likewise (workers: max_videos_per_job)
MAX_VIDEO_FRAMES = 1024  # frames one video may ask for; workers cap lower (max_video_frames)
MAX_TEXT_CHARS = 1_000_000  # per text part; a 10 MB prompt is never a valid job
MAX_OUTPUT_TOKENS = 32_768
URI_SCHEMES = ("s3://", "file://", "data:", "https://", "http://")

MAX_SCHEMA_BYTES = 64 * 1024  # a JSON schema for structured output, encoded
MAX_SCHEMA_DEPTH = 64  # dicts and lists; one object level of a JSON schema is two (properties)
INT64_MAX = 2**63 - 1

# `(?!\n)$`: a bare `$` also matches before a final newline (Python's re, which msgspec uses),
# so "id\n" would pass; JSON Schema's regex dialect reads the lookahead the same way.
JOB_ID_PATTERN = r"^[A-Za-z0-9._:\-]{1,160}(?!\n)$"
SHA256_PATTERN = r"^[0-9a-f]{64}(?!\n)$"
JobId = Annotated[str, Meta(pattern=JOB_ID_PATTERN, description="Idempotency key")]
Pixels = Annotated[int, Meta(ge=1, le=100_000_000)]
# Unix seconds; NaN and infinities fail the bounds (a NaN deadline would never pass).
UnixTime = Annotated[float, Meta(ge=0.0, le=1e11)]
ShortText = Annotated[str, Meta(max_length=1_000)]


_json = _msgspec_json.Encoder()


def _check_depth(value: Any, limit: int) -> None:
    """Nesting deeper than `limit` is refused without recursion (a deep schema is a bomb)."""
    level: list[Any] = [value]
    for _ in range(limit):
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item if isinstance(item, list) else ())
            if isinstance(child, dict | list)
        ]
        if not level:
            return
    raise ValueError(f"nested deeper than {limit} levels")


class TextPart(Struct, tag="text", tag_field="type", frozen=True):
    text: Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]


def _check_media(uri: str, min_pixels: int | None, max_pixels: int | None) -> None:
    if not uri.startswith(URI_SCHEMES):
        if ":" not in uri.split("/", 1)[0]:  # /abs, ./rel, ~/x, cat.jpg: a path, no scheme
            raise ValueError(
                f"{uri[:120]!r} is a local path, not a URI: upload the file to S3 and give "
                "s3://bucket/key (workers on other machines cannot read your disk), or "
                "file:///absolute/path where workers share the folder (VLMQ_ALLOWED_FILE_ROOTS)"
            )
        scheme = uri.split(":", 1)[0][:16]
        raise ValueError(f"unknown URI scheme {scheme!r}: use one of {', '.join(URI_SCHEMES)}")
    if min_pixels and max_pixels and min_pixels > max_pixels:
        raise ValueError("min_pixels must not exceed max_pixels")


class ImageRef(Struct, tag="image", tag_field="type", frozen=True, omit_defaults=True):
    """An image by reference. `min_pixels`/`max_pixels` bound the resize (Qwen-VL style)."""

    kind: ClassVar[str] = "image"  # the wire tag, for code that handles images and videos alike

    uri: Annotated[str, Meta(min_length=1, max_length=8_000_000)]
    sha256: Annotated[str, Meta(pattern=SHA256_PATTERN)] | None = None
    min_pixels: Pixels | None = None
    max_pixels: Pixels | None = None

    def __post_init__(self) -> None:
        _check_media(self.uri, self.min_pixels, self.max_pixels)


class VideoRef(Struct, tag="video", tag_field="type", frozen=True, omit_defaults=True):
    """A video by reference (mp4, webm, mov, mkv), given to the model as frames. `fps`:
    frames sampled per second of video; `num_frames`: that many, spread evenly (at most one
    of the two; neither: the worker's `video_fps`). `min_pixels`/`max_pixels` bound each
    frame's resize, as for an image."""

    kind: ClassVar[str] = "video"
    uri: Annotated[str, Meta(min_length=1, max_length=8_000_000)]
    sha256: Annotated[str, Meta(pattern=SHA256_PATTERN)] | None = None
    fps: Annotated[float, Meta(gt=0.0, le=60.0)] | None = None
    num_frames: Annotated[int, Meta(ge=1, le=MAX_VIDEO_FRAMES)] | None = None
    min_pixels: Pixels | None = None
    max_pixels: Pixels | None = None

    def __post_init__(self) -> None:
        _check_media(self.uri, self.min_pixels, self.max_pixels)
        if self.fps is not None and self.num_frames is not None:
            raise ValueError("give fps or num_frames, not both")


class EmbeddingRef(Struct, tag="image_embeds", tag_field="type", frozen=True, omit_defaults=True):
    """Precomputed image embeddings (the vision encoder's output for one image), in place of
    the image: a safetensors file holding one tensor `image_embeds` of [tokens, hidden size]
    (float16, bfloat16 or float32). Qwen-VL-family models also need `image_grid_thw`, the
    image's [t, h, w] in patches. Only workers that opt in (vLLM's `enable_mm_embeds`)
    take them; safetensors only, never a pickle."""

    kind: ClassVar[str] = "image_embeds"
    uri: Annotated[str, Meta(min_length=1, max_length=8_000_000)]
    sha256: Annotated[str, Meta(pattern=SHA256_PATTERN)] | None = None
    image_grid_thw: (
        Annotated[list[Annotated[int, Meta(ge=1, le=100_000)]], Meta(min_length=3, max_length=3)] | None
    ) = None

    def __post_init__(self) -> None:
        _check_media(self.uri, None, None)


MediaRef = ImageRef | VideoRef | EmbeddingRef
Part = TextPart | ImageRef | VideoRef | EmbeddingRef


class Message(Struct, frozen=True):
    role: Literal["system", "user", "assistant"]
    content: Annotated[list[Part], Meta(min_length=1)] | Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]

    @property
    def parts(self) -> list[Part]:
        return [TextPart(self.content)] if isinstance(self.content, str) else self.content


class Sampling(Struct, omit_defaults=True, frozen=True):
    """Field names follow vLLM's SamplingParams."""

    max_tokens: Annotated[int, Meta(ge=1, le=MAX_OUTPUT_TOKENS)] = 256
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = 0.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    seed: Annotated[int, Meta(ge=-INT64_MAX - 1, le=INT64_MAX)] | None = None
    stop: Annotated[list[ShortText], Meta(max_length=16)] = []
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] = 1.0


class JsonSchemaFormat(Struct, tag="json_schema", tag_field="type", frozen=True):
    schema: Annotated[dict[str, Any], Meta(description="JSON Schema; at most 64 KiB and 64 levels deep")]

    def __post_init__(self) -> None:
        _check_depth(self.schema, MAX_SCHEMA_DEPTH)
        size = len(_json.encode(self.schema))
        if size > MAX_SCHEMA_BYTES:
            raise ValueError(f"schema is {size} bytes encoded > {MAX_SCHEMA_BYTES}")


class RegexFormat(Struct, tag="regex", tag_field="type", frozen=True):
    pattern: Annotated[str, Meta(min_length=1, max_length=10_000)]

    def __post_init__(self) -> None:
        try:
            with warnings.catch_warnings():  # FutureWarnings about odd sets are not the job's failure
                warnings.simplefilter("ignore")
                re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"invalid regex: {exc}") from None


class ChoiceFormat(Struct, tag="choice", tag_field="type", frozen=True):
    choices: Annotated[list[ShortText], Meta(min_length=1, max_length=1_000)]


ResponseFormat = JsonSchemaFormat | RegexFormat | ChoiceFormat
# The result cache (docs/cache.md): `use` an identical job's answer (or wait for a running
# one), `refresh` (run anyway and replace the cached answer), `off` (neither read nor written).
CacheMode = Literal["use", "refresh", "off"]


class Job(Struct, omit_defaults=True, frozen=True):
    """One request: chat messages with images, sampling, an optional structured output.

    `priority`: lower runs earlier (vLLM's convention). `deadline`: unix seconds; a job not
    started by then ends `expired`. `result_topic`: also publish the Result there.
    """

    job_id: JobId
    messages: Annotated[list[Message], Meta(min_length=1, max_length=256)]
    model: Annotated[str, Meta(max_length=512)] | None = None
    sampling: Sampling = Sampling()
    response_format: ResponseFormat | None = None
    priority: Annotated[int, Meta(ge=-1_000_000, le=1_000_000)] = 0
    deadline: UnixTime | None = None
    batch_id: JobId | None = None
    metadata: Annotated[
        dict[Annotated[str, Meta(max_length=128)], Annotated[str, Meta(max_length=4096)]], Meta(max_length=64)
    ] = {}
    result_topic: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._\-]{1,249}(?!\n)$")] | None = None
    submitted_at: UnixTime | None = None
    cache: CacheMode = "use"
    v: Annotated[int, Meta(ge=1, le=1_000_000)] = VERSION

    def __post_init__(self) -> None:
        if self.v > VERSION:
            raise ValueError(f"unsupported schema version {self.v}: this build reads <= {VERSION}")
        images, videos, embeds = self.counts()
        images += embeds  # an embedding stands for an image
        if images > MAX_IMAGES_PER_JOB:
            raise ValueError(f"too many images: {images} > {MAX_IMAGES_PER_JOB}")
        if videos > MAX_VIDEOS_PER_JOB:
            raise ValueError(f"too many videos: {videos} > {MAX_VIDEOS_PER_JOB}")

    @property
    def media(self) -> list[MediaRef]:
        """Images, videos and image embeddings, in the order they stand in the messages."""
        return [
            p
            for m in self.messages
            if not isinstance(m.content, str)
            for p in m.content
            if not isinstance(p, TextPart)
        ]

    def counts(self) -> tuple[int, int, int]:
        """(images, videos, image embeddings) in the messages, in one pass."""
        kinds = [p.kind for p in self.media]
        return kinds.count("image"), kinds.count("video"), kinds.count("image_embeds")

    @property
    def images(self) -> list[ImageRef]:
        return [p for p in self.media if isinstance(p, ImageRef)]

    @property
    def videos(self) -> list[VideoRef]:
        return [p for p in self.media if isinstance(p, VideoRef)]

    @property
    def embeds(self) -> list[EmbeddingRef]:
        return [p for p in self.media if isinstance(p, EmbeddingRef)]


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


TERMINAL_STATES = tuple(s for s in JobState if s.terminal)


class Usage(Struct, omit_defaults=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tokens: int = 0


class Timings(Struct, omit_defaults=True):
    """Unix seconds for the moments; seconds for the stage durations."""

    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    fetch_s: float | None = None
    preprocess_s: float | None = None
    engine_s: float | None = None
    ttft_s: float | None = None


class Error(Struct):
    code: ErrorCode
    message: str
    retryable: bool = False

    def __post_init__(self) -> None:
        # Every failure is recorded, dead-lettered and shown through this one type.
        self.message = redact(self.message)


class Result(Struct, omit_defaults=True):
    """A job's terminal record. `parsed` holds the decoded JSON when a schema was asked.
    `cached`: the answer is an identical earlier job's (`cache_source`), written
    `cache_age_s` seconds before this job ended (docs/cache.md). `trace_id`: the
    OpenTelemetry trace of the run that ended it, when the worker traced (docs/operations.md)."""

    job_id: str
    state: JobState
    text: str | None = None
    parsed: Any = None
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    model: str | None = None
    worker: str | None = None
    attempt: int = 0
    error: Error | None = None
    batch_id: str | None = None
    metadata: dict[str, str] = {}
    cached: bool = False
    cache_age_s: float | None = None
    cache_source: str | None = None
    trace_id: Annotated[str, Meta(pattern="^[0-9a-f]{32}$")] | None = None
    v: int = VERSION


MAX_DEAD_LETTER_PAYLOAD = 256 * 1024


class DeadLetter(Struct, omit_defaults=True):
    """What goes to the dead-letter topic: the original bytes (the first 256 KiB: a dead
    letter must fit in a Kafka message) and why they failed. `payload_size` is the
    original size; when it is larger than `payload`, re-read the original at topic,
    partition, offset while the topic retains it."""

    error: Error
    topic: str
    partition: int
    offset: int
    payload: bytes
    payload_size: int | None = None
    # The message's content-type header (latin-1 text of its bytes): a retry sends the
    # payload with it, so the digest recorded at submit matches again.
    content_type: str | None = None
    job_id: str | None = None
    worker: str | None = None
    at: float | None = None
