"""The pipeline (check -> fetch -> preprocess -> generate -> Result) with the fake engine and
file:// images: no Kafka, no Redis, no S3."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import pytest

from tests.expect import expected_text
from vlmq.schemas import (
    ChoiceFormat,
    ErrorCode,
    ImageRef,
    Job,
    JobState,
    JsonSchemaFormat,
    Message,
    Part,
    Sampling,
    TextPart,
)
from vlmq.worker.engines import EngineDead, EngineOutput, EngineRequest
from vlmq.worker.engines.fake import FakeEngine
from vlmq.worker.fetch import Fetcher
from vlmq.worker.pipeline import Pipeline
from vlmq.worker.samples import photo
from vlmq.worker.settings import WorkerSettings


class Dying(FakeEngine):
    async def generate(self, request: EngineRequest) -> EngineOutput:
        raise EngineDead("engine core exited")


class Broken(FakeEngine):
    async def generate(self, request: EngineRequest) -> EngineOutput:
        raise KeyError("some internal slot")


@pytest.fixture
def settings(tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(
        allowed_file_roots=[str(tmp_path)], max_images_per_job=2, max_prompt_chars=1000, job_timeout_s=0.3
    )


async def _pipeline(settings: WorkerSettings, engine: FakeEngine) -> AsyncIterator[Pipeline]:
    await engine.start()
    async with Fetcher(settings) as fetcher:
        pipeline = Pipeline(settings, fetcher, engine)
        try:
            yield pipeline
        finally:
            pipeline.close()
            await engine.close()


@pytest.fixture
async def pipeline(settings: WorkerSettings) -> AsyncIterator[Pipeline]:
    async for p in _pipeline(settings, FakeEngine(step_ms=1)):
        yield p


def _job(*parts: str | ImageRef, model: str | None = None, job_id: str = "j1") -> Job:
    content: list[Part] = [TextPart(p) if isinstance(p, str) else p for p in parts]
    return Job(
        job_id=job_id, messages=[Message("user", content)], sampling=Sampling(max_tokens=8), model=model
    )


def _file(tmp_path: Path, name: str, data: bytes) -> ImageRef:
    path = tmp_path / name
    path.write_bytes(data)
    return ImageRef(f"file://{path}")


async def test_a_job_with_two_images_succeeds_with_the_engines_answer(
    pipeline: Pipeline, settings: WorkerSettings, tmp_path: Path
) -> None:
    blobs = [photo(640, 480, seed=1), photo(1200, 900, seed=2)]
    job = _job(_file(tmp_path, "a.jpg", blobs[0]), "Compare", _file(tmp_path, "b.jpg", blobs[1]))
    result = await pipeline.run(job, attempt=1)
    assert result.state is JobState.SUCCEEDED, result.error
    assert result.text == expected_text(job, blobs, settings)
    assert result.attempt == 1 and result.model == "fake" and result.worker == settings.worker_id
    assert result.usage is not None and result.usage.image_tokens > 0
    t = result.timings
    assert t is not None and t.fetch_s is not None and t.preprocess_s is not None and t.engine_s is not None


@pytest.mark.parametrize(("fmt", "magic"), [("HEIF", b"ftypheic"), ("AVIF", b"ftypavif")])
async def test_phone_and_web_formats_decode_like_any_photo(
    pipeline: Pipeline, settings: WorkerSettings, tmp_path: Path, fmt: str, magic: bytes
) -> None:
    """A HEIC photo (iPhones) and an AVIF image, made by the real encoders, run like a JPEG;
    a worker whose image_formats leave them out refuses them as image_corrupt."""
    data = photo(640, 480, seed=7, fmt=fmt, quality=80)
    assert data[4:12] == magic
    job = _job("Describe", _file(tmp_path, f"p.{fmt.lower()}", data))
    result = await pipeline.run(job, attempt=1)
    assert result.state is JobState.SUCCEEDED, result.error
    assert result.text == expected_text(job, [data], settings)
    strict = msgspec.structs.replace(settings, image_formats=["JPEG", "PNG"])
    async for narrow in _pipeline(strict, FakeEngine(step_ms=1)):
        refused = await narrow.run(job, attempt=1)
        assert refused.error is not None and refused.error.code is ErrorCode.IMAGE_CORRUPT


@pytest.mark.parametrize(
    ("build", "code"),
    [
        (lambda d: _job("hi", ImageRef(f"file://{d}/missing.jpg")), ErrorCode.IMAGE_NOT_FOUND),
        (lambda d: _job("hi", ImageRef("file:///etc/hostname")), ErrorCode.URI_NOT_ALLOWED),
        (lambda d: _job("hi", _file(d, "x.jpg", b"\xff\xd8 not a jpeg")), ErrorCode.IMAGE_CORRUPT),
        (lambda d: _job("hi", ImageRef("http://example.com/x.jpg")), ErrorCode.URI_NOT_ALLOWED),
        (
            lambda d: _job(*[_file(d, f"{i}.jpg", photo(64, 64, seed=i)) for i in range(3)]),
            ErrorCode.TOO_MANY_IMAGES,
        ),
        (lambda d: _job("x" * 1001), ErrorCode.PROMPT_TOO_LONG),
        (lambda d: _job("hi", model="another-model"), ErrorCode.UNKNOWN_MODEL),
        (lambda d: _job("please BOOM"), ErrorCode.ENGINE_ERROR),
    ],
)
async def test_bad_input_is_a_failed_result_with_its_code(
    settings: WorkerSettings, tmp_path: Path, build: Callable[[Path], Job], code: ErrorCode
) -> None:
    async for pipeline in _pipeline(settings, FakeEngine(fail_on="BOOM")):
        result = await pipeline.run(build(tmp_path), attempt=1)
        assert result.state is JobState.FAILED and result.error is not None
        assert result.error.code is code, result.error


async def test_a_slow_engine_times_out_and_its_request_leaves_the_engine(settings: WorkerSettings) -> None:
    engine = FakeEngine(step_ms=50, completion_tokens=1000)
    async for pipeline in _pipeline(settings, engine):
        result = await pipeline.run(_job("long answer"), attempt=1)
        assert result.error is not None and result.error.code is ErrorCode.TIMEOUT
        assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0


async def test_an_engine_bug_fails_the_job_but_a_dead_engine_stops_the_worker(
    settings: WorkerSettings,
) -> None:
    async for pipeline in _pipeline(settings, Broken()):
        result = await pipeline.run(_job("hi"), attempt=1)
        assert result.error is not None and result.error.code is ErrorCode.ENGINE_ERROR
        assert "KeyError" in result.error.message
    async for pipeline in _pipeline(settings, Dying()):
        with pytest.raises(EngineDead):
            await pipeline.run(_job("hi"), attempt=1)


class OffFormat(FakeEngine):
    """An engine (or an OpenAI-compatible server that ignored the constraint) answering
    outside the job's format."""

    async def generate(self, request: EngineRequest) -> EngineOutput:
        out = await super().generate(request)
        out.text = "maybe" if isinstance(request.response_format, ChoiceFormat) else "{not json"
        return out


@pytest.mark.parametrize(
    ("fmt", "why"),
    [
        (ChoiceFormat(["safe", "unsafe"]), "engine output is not one of the choices"),
        (JsonSchemaFormat({"type": "object"}), "engine output is not valid JSON"),
    ],
)
async def test_an_answer_outside_the_format_is_a_typed_failure(
    settings: WorkerSettings, fmt: ChoiceFormat | JsonSchemaFormat, why: str
) -> None:
    job = msgspec.structs.replace(_job("Safe?"), response_format=fmt)
    async for pipeline in _pipeline(settings, OffFormat(step_ms=1)):
        result = await pipeline.run(job, attempt=1)
        assert result.state is JobState.FAILED and result.error is not None
        assert (result.error.code, result.error.message) == (ErrorCode.ENGINE_ERROR, why)
        assert result.text in ("maybe", "{not json")  # kept, for whoever looks into it
    async for pipeline in _pipeline(settings, FakeEngine(step_ms=1)):  # in format: succeeds
        assert (await pipeline.run(job, attempt=1)).state is JobState.SUCCEEDED
