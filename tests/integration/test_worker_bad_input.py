"""Bad input: each kind ends `failed` with its own code and a dead-letter record (a message
that cannot say which job it is: the dead letter only), and the worker keeps serving the next
job. Real worker process, real servers."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from typing import Any

import boto3
import msgspec

from tests.helpers import Env, produce, read_topic, start_worker, stop_worker
from vlmq.producer import Client
from vlmq.schemas import EmbeddingRef, ErrorCode, ImageRef, Job, JobState, Message, Part, TextPart, VideoRef
from vlmq.schemas.codec import decode_dead_letter
from vlmq.worker.embeds import safetensors_file
from vlmq.worker.samples import clip, photo


def _bomb_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, "PNG")  # 400 Mpx in a few hundred KB
    return buf.getvalue()


def _job(job_id: str, *parts: str | ImageRef | VideoRef | EmbeddingRef, **kw: Any) -> Job:
    content: list[Part] = [TextPart(p) if isinstance(p, str) else p for p in parts] or [TextPart("hi")]
    return Job(job_id=job_id, messages=[Message("user", content)], **kw)


async def test_each_bad_input_fails_with_its_code_and_a_dead_letter(e: Env) -> None:
    s3 = boto3.client("s3", endpoint_url=e.s3)
    good = photo(64, 48, seed=1)
    objects = {
        "good.jpg": good,
        "trunc.jpg": good[: len(good) // 2],
        "text.jpg": b"hello",
        "empty.jpg": b"",
        "big.jpg": good + b"\0" * 300_000,
        "bomb.png": _bomb_png(),
        "clip.mp4": clip(seconds=2),
        "trunc.mp4": clip(seconds=2)[:900],
        "long.webm": clip(seconds=12, fps=2, fmt="webm"),
    }
    for key, body in objects.items():
        s3.put_object(Bucket=e.bucket, Key=key, Body=body)
    img = {k: ImageRef(f"s3://{e.bucket}/{k}") for k in objects}
    vid = {k: VideoRef(f"s3://{e.bucket}/{k}") for k in objects}
    t = e.tag
    jobs = {
        ErrorCode.IMAGE_NOT_FOUND: _job(f"{t}-missing", ImageRef(f"s3://{e.bucket}/nope.jpg")),
        ErrorCode.URI_NOT_ALLOWED: _job(f"{t}-bucket", ImageRef("s3://other-bucket/x.jpg")),
        ErrorCode.IMAGE_CORRUPT: _job(f"{t}-trunc", img["trunc.jpg"]),
        ErrorCode.IMAGE_TOO_LARGE: _job(f"{t}-big", img["big.jpg"]),
        ErrorCode.TOO_MANY_IMAGES: _job(f"{t}-many", *[img["good.jpg"]] * 5),
        ErrorCode.PROMPT_TOO_LONG: _job(f"{t}-long", "x" * 5000),
        ErrorCode.UNKNOWN_MODEL: _job(f"{t}-model", model="llama-9000"),
        ErrorCode.ENGINE_ERROR: _job(f"{t}-engine", "please EXPLODE"),
        ErrorCode.IMAGE_CHECKSUM: _job(f"{t}-sha", ImageRef(img["good.jpg"].uri, sha256="0" * 64)),
    }
    more = {  # codes that appear more than once
        f"{t}-text": (ErrorCode.IMAGE_CORRUPT, _job(f"{t}-text", img["text.jpg"])),
        f"{t}-empty": (ErrorCode.IMAGE_CORRUPT, _job(f"{t}-empty", img["empty.jpg"])),
        f"{t}-bomb": (ErrorCode.IMAGE_TOO_LARGE, _job(f"{t}-bomb", img["bomb.png"])),
        f"{t}-file": (ErrorCode.URI_NOT_ALLOWED, _job(f"{t}-file", ImageRef("file:///etc/passwd"))),
        f"{t}-https": (ErrorCode.URI_NOT_ALLOWED, _job(f"{t}-https", ImageRef("https://169.254.169.254/x"))),
        f"{t}-b64": (ErrorCode.IMAGE_CORRUPT, _job(f"{t}-b64", ImageRef("data:image/png;base64,@@"))),
        f"{t}-vtrunc": (ErrorCode.IMAGE_CORRUPT, _job(f"{t}-vtrunc", vid["trunc.mp4"])),
        f"{t}-vpng": (ErrorCode.IMAGE_CORRUPT, _job(f"{t}-vpng", vid["good.jpg"])),
        f"{t}-vlong": (ErrorCode.IMAGE_TOO_LARGE, _job(f"{t}-vlong", vid["long.webm"])),
        f"{t}-vtwo": (ErrorCode.TOO_MANY_IMAGES, _job(f"{t}-vtwo", vid["clip.mp4"], vid["clip.mp4"])),
        # This worker did not opt in to image embeddings.
        f"{t}-embeds": (ErrorCode.UNSUPPORTED_INPUT, _job(f"{t}-embeds", EmbeddingRef(f"s3://{e.bucket}/e"))),
    }
    expect = {j.job_id: code for code, j in jobs.items()} | {k: c for k, (c, _) in more.items()}
    raw = {  # what only a broken producer sends: straight to Kafka
        f"{t}-garbage": (ErrorCode.BAD_MESSAGE, b"\xc1\xc1 not msgpack"),
        f"{t}-schema": (
            ErrorCode.INVALID_JOB,
            json.dumps(
                {
                    "job_id": f"{t}-schema",
                    "messages": [{"role": "user", "content": "x"}],
                    "sampling": {"max_tokens": -1},
                }
            ).encode(),
        ),
        f"{t}-version": (
            ErrorCode.UNSUPPORTED_VERSION,
            json.dumps({"job_id": f"{t}-version", "v": 99, "messages": []}).encode(),
        ),
    }
    expect |= {k: c for k, (c, _) in raw.items() if k != f"{t}-garbage"}
    ok_sha = hashlib.sha256(good).hexdigest()
    valid = [
        _job(f"{t}-ok", ImageRef(img["good.jpg"].uri, sha256=ok_sha)),
        _job(f"{t}-inline", ImageRef("data:image/jpeg;base64," + base64.b64encode(good).decode())),
        _job(
            f"{t}-video",
            img["good.jpg"],
            VideoRef(vid["clip.mp4"].uri, num_frames=4, max_pixels=16 * 28 * 28),
            "what changes?",
        ),
    ]

    w = start_worker(
        e,
        "w",
        engine_args="fail_on=EXPLODE,max_model_len=1000",
        max_images_per_job=4,
        max_image_bytes=200_000,
        allowed_buckets=e.bucket,
        max_prompt_chars=100_000,
        max_video_s=5,
    )
    # A non-Python client's mistakes: recorded as submitted (wire.md's enqueue step), then
    # produced; the garbage is produced without a record (its job is nobody's).
    await produce(e, [(k, v) for k, (_, v) in raw.items() if k != f"{t}-garbage"])
    await produce(e, [(f"{t}-garbage", raw[f"{t}-garbage"][1])], submitted=False)
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit_many([*jobs.values(), *(j for _, j in more.values()), *valid])
        results = {
            r.job_id: r for r in await client.wait_many([*expect, *(j.job_id for j in valid)], timeout=60)
        }
    for job_id, code in expect.items():
        r = results[job_id]
        assert r.state is JobState.FAILED and r.error is not None, job_id
        assert r.error.code is code, (job_id, r.error)
    assert all(results[j.job_id].state is JobState.SUCCEEDED for j in valid)
    photo_only, with_video = results[f"{t}-ok"].usage, results[f"{t}-video"].usage
    assert photo_only and with_video and with_video.image_tokens > photo_only.image_tokens  # frames seen
    dead = [decode_dead_letter(m.value) for m in await read_topic(e, e.dlq_topic, len(expect) + 1)]
    assert {d.job_id: d.error.code for d in dead} == expect | {f"{t}-garbage": ErrorCode.BAD_MESSAGE}
    garbage = next(d for d in dead if d.job_id == f"{t}-garbage")
    assert garbage.payload == raw[f"{t}-garbage"][1] and garbage.topic == e.jobs_topic
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        assert await client.store.get(f"{t}-garbage") is None  # its key named it; nothing proves it
    assert stop_worker(w) == 0  # alive all along, drains cleanly
    assert msgspec.json.decode(msgspec.json.encode(dead[0].error))["code"] in {c.value for c in ErrorCode}


async def test_image_embeddings_where_the_worker_opted_in(e: Env) -> None:
    """A fake engine standing for a Qwen-VL model of hidden size 64 (merge 2): a fitting
    file runs; a wrong hidden size, a grid that does not make the tokens, a pickle and a
    job mixing pixels and embeddings each fail typed, with a dead letter."""
    s3 = boto3.client("s3", endpoint_url=e.s3)
    objects = {
        "ok.safetensors": safetensors_file(bytes(16 * 64 * 2), (16, 64), "F16"),
        "narrow.safetensors": safetensors_file(bytes(16 * 32 * 4), (16, 32)),
        "pickle.safetensors": b"\x80\x04\x95" + b"\x00" * 64,
        "good.jpg": photo(64, 48),
    }
    for key, body in objects.items():
        s3.put_object(Bucket=e.bucket, Key=key, Body=body)

    def ref(key: str, grid: list[int] | None = None) -> EmbeddingRef:
        return EmbeddingRef(f"s3://{e.bucket}/{key}", image_grid_thw=grid or [1, 8, 8])

    t = e.tag
    expect = {
        f"{t}-narrow": (ErrorCode.EMBEDDING_INVALID, ref("narrow.safetensors")),
        f"{t}-grid": (ErrorCode.EMBEDDING_INVALID, ref("ok.safetensors", [1, 8, 10])),
        f"{t}-pickle": (ErrorCode.EMBEDDING_INVALID, ref("pickle.safetensors")),
    }
    jobs = [_job(j, part, "what is it?") for j, (_, part) in expect.items()]
    jobs.append(_job(f"{t}-mixed", ref("ok.safetensors"), ImageRef(f"s3://{e.bucket}/good.jpg")))
    ok = _job(f"{t}-ok", ref("ok.safetensors"), "what is it?")
    w = start_worker(e, "w", engine_args="enable_mm_embeds=true,hidden_size=64")
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit_many([*jobs, ok])
        results = {r.job_id: r for r in await client.wait_many([j.job_id for j in [*jobs, ok]], timeout=60)}
    codes = {j: (r.error.code if r.error else None) for j, r in results.items()}
    assert codes == {j: c for j, (c, _) in expect.items()} | {
        f"{t}-mixed": ErrorCode.UNSUPPORTED_INPUT,
        f"{t}-ok": None,
    }
    usage = results[f"{t}-ok"].usage
    assert results[f"{t}-ok"].state is JobState.SUCCEEDED and usage and usage.image_tokens == 16
    dead = [decode_dead_letter(m.value) for m in await read_topic(e, e.dlq_topic, len(jobs))]
    assert sorted(d.job_id or "" for d in dead) == sorted(j.job_id for j in jobs)
    assert stop_worker(w) == 0
