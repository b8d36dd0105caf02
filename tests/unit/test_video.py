"""Videos: the contract's VideoRef, PyAV frame sampling and its bounds, and the engine mappings,
on clips FFmpeg's own encoders make here (mp4/mov H.264, webm VP9, mkv)."""

from __future__ import annotations

import io
import json
import random

import msgspec
import pytest
from PIL import Image

from vlmq.producer import video
from vlmq.schemas import ErrorCode, ImageRef, Job, Message, Part, Sampling, TextPart, VideoRef, VlmqError
from vlmq.schemas.codec import decode_job, encode_job
from vlmq.worker.engines.base import EngineRequest
from vlmq.worker.engines.mapping import error_code, hf_messages, lmdeploy_messages, openai_body
from vlmq.worker.samples import clip, photo
from vlmq.worker.video import Video, VideoLimits, VideoSampling, encode_mp4, load_video

SAMPLING = VideoSampling(fps=None, num_frames=None, min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
LIMITS = VideoLimits(max_frames=16, max_seconds=60.0, default_fps=2.0)


def _load(data: bytes, limits: VideoLimits = LIMITS, **sampling: object) -> Video:
    return load_video(data, msgspec.structs.replace(SAMPLING, **sampling), limits, 28)


@pytest.mark.parametrize("fmt", ["mp4", "mov", "webm", "mkv"])
def test_each_container_samples_at_the_default_fps(fmt: str) -> None:
    v = _load(clip(seconds=2.5, fps=10, fmt=fmt))
    assert len(v.frames) == 6  # ceil(2.5 s x 2 fps) = 5, made even
    assert {f.size for f in v.frames} == {v.frames[0].size}
    w, h = v.frames[0].size
    assert w % 28 == 0 and h % 28 == 0 and w * h <= SAMPLING.max_pixels
    assert v.indices == sorted(v.indices) and len(set(v.indices)) == 6
    assert v.fps == 10 and v.duration_s == pytest.approx(2.5, abs=0.15)
    brightness = [sum(f.convert("L").tobytes()) for f in v.frames]
    assert brightness == sorted(brightness)  # the clip brightens: frames come in time order


@pytest.mark.parametrize("keyframe_every", [10, None])
def test_a_long_video_sampled_sparsely_seeks_when_keyframes_allow(keyframe_every: int | None) -> None:
    """30 s at 5 fps, four frames wanted: with a keyframe every 2 s the decoder seeks
    between them; with one keyframe in all it decodes in order. The same frames either way."""
    data = clip(seconds=30, fps=5, w=64, h=48, keyframe_every=keyframe_every)
    v = _load(data, num_frames=4)
    assert [abs(i - e) <= 1 for i, e in zip(v.indices, (19, 56, 94, 131), strict=True)] == [True] * 4
    brightness = [sum(f.convert("L").tobytes()) for f in v.frames]
    assert brightness == sorted(brightness) and len(set(brightness)) == 4


def test_num_frames_and_fps_as_asked_capped_and_even() -> None:
    data = clip(seconds=4, fps=10)
    assert len(_load(data, num_frames=8).frames) == 8
    assert len(_load(data, num_frames=5).frames) == 6
    assert len(_load(data, fps=1.0).frames) == 4
    assert len(_load(data, num_frames=500).frames) == LIMITS.max_frames
    one = _load(clip(seconds=0.1, fps=10), num_frames=4)  # a single frame: repeated as a pair
    assert len(one.frames) == 2 and one.indices == [0, 0]
    assert one.metadata()["frames_indices"] == [0, 0] and one.metadata()["total_num_frames"] == 1


@pytest.mark.parametrize(
    ("data", "code", "says"),
    [
        (b"", ErrorCode.IMAGE_CORRUPT, "empty"),
        (b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 500, ErrorCode.IMAGE_CORRUPT, "cannot decode"),
        (clip()[:600], ErrorCode.IMAGE_CORRUPT, ""),
        (photo(64, 48, fmt="PNG"), ErrorCode.IMAGE_CORRUPT, "allowed format"),
        (clip(seconds=90, fps=1), ErrorCode.IMAGE_TOO_LARGE, "max_video_s"),
    ],
)
def test_bad_videos_end_typed(data: bytes, code: ErrorCode, says: str) -> None:
    with pytest.raises(VlmqError) as err:
        _load(data)
    assert err.value.code is code and says in err.value.message


def test_frame_pixels_and_formats_are_the_workers_to_choose() -> None:
    with pytest.raises(VlmqError) as err:
        _load(clip(w=320, h=240), VideoLimits(max_frame_pixels=320 * 240 - 1))
    assert err.value.code is ErrorCode.IMAGE_TOO_LARGE
    with pytest.raises(VlmqError) as err:
        _load(clip(fmt="webm"), VideoLimits(formats=("mp4", "mov")))
    assert "allowed format" in err.value.message


def test_frames_survive_the_mp4_an_openai_server_gets() -> None:
    v = _load(clip(seconds=2, fps=10), num_frames=4)
    again = _load(encode_mp4(v), num_frames=4)
    assert len(again.frames) == 4 and again.frames[0].size == v.frames[0].size


def test_video_ref_contract() -> None:
    job = video("s3://b/v.mp4", num_frames=8, job_id="j1")
    assert decode_job(encode_job(job)[0]) == job and job.videos == [VideoRef("s3://b/v.mp4", num_frames=8)]
    assert job.images == [] and job.media == job.videos
    with pytest.raises(ValueError, match="not both"):
        VideoRef("s3://b/v.mp4", fps=1.0, num_frames=4)
    with pytest.raises(ValueError, match="unknown URI scheme"):
        VideoRef("ftp://x/v.mp4")
    raw = b'{"job_id":"j","messages":[{"role":"user","content":[{"type":"video","uri":"s3://b/v","fps":0}]}]}'
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(raw, type=Job)
    many = [Message("user", [VideoRef(f"s3://b/{i}") for i in range(17)])]
    with pytest.raises(ValueError, match="too many videos"):
        Job(job_id="j", messages=many)


def _request(v: Video) -> EngineRequest:
    parts: list[Part] = [ImageRef("s3://b/i.jpg"), VideoRef("s3://b/v.mp4"), TextPart("what happens?")]
    img = Image.new("RGB", (56, 56))
    return EngineRequest(
        request_id="r",
        messages=[Message("user", parts)],
        images=[img],
        videos=[v],
        sampling=Sampling(max_tokens=4),
    )


def test_engines_get_videos_where_they_stood() -> None:
    v = _load(clip(), num_frames=2)
    req = _request(v)
    assert hf_messages(req.messages)[0]["content"] == [
        {"type": "image"},
        {"type": "video"},
        {"type": "text", "text": "what happens?"},
    ]
    body = openai_body(req, ["data:image/jpeg;base64,AA"], "m", ["data:video/mp4;base64,BB"])
    kinds = [p["type"] for p in body["messages"][0]["content"]]
    assert kinds == ["image_url", "video_url", "text"]
    assert body["messages"][0]["content"][1]["video_url"]["url"] == "data:video/mp4;base64,BB"
    with pytest.raises(VlmqError) as err:
        lmdeploy_messages(req.messages, req.images)
    assert err.value.code is ErrorCode.UNSUPPORTED_INPUT
    vllm_says = "At most 0 video(s) may be provided in one prompt. (parameter=video)"
    assert error_code(vllm_says) is ErrorCode.UNSUPPORTED_INPUT


def test_a_clip_is_a_real_video_file() -> None:
    import av

    with av.open(io.BytesIO(clip(seconds=1, fps=5))) as c:
        assert c.streams.video[0].frames == 5


def test_openai_batch_lines_take_video_url_parts() -> None:
    from vlmq.producer.bulk import from_openai_batch

    part = {"type": "video_url", "video_url": {"url": "s3://b/clip.mp4"}}
    body = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "what happens?"}]}]}
    line = json.dumps({"custom_id": "v1", "method": "POST", "url": "/v1/chat/completions", "body": body})
    (item,) = from_openai_batch([line], "b1")
    assert isinstance(item, Job) and item.videos == [VideoRef("s3://b/clip.mp4")]


def test_mangled_videos_only_ever_fail_typed() -> None:
    """Bytes flipped, cut and inserted anywhere in real clips of each container: each
    decodes or fails `image_corrupt`/`image_too_large`, never another exception."""
    rnd = random.Random(7)
    clips = [clip(seconds=3, w=96, h=64, fmt=f) for f in ("mp4", "webm", "mov", "mkv")]
    outcomes = set()
    for _ in range(300):
        b = bytearray(rnd.choice(clips))
        for _ in range(rnd.randint(1, 20)):
            k = rnd.randrange(len(b))
            if (op := rnd.random()) < 0.6:
                b[k] = rnd.randrange(256)
            elif op < 0.8:
                del b[k : k + rnd.randint(1, 200)]
            else:
                b[k:k] = rnd.randbytes(rnd.randint(1, 50))
        try:
            _load(bytes(b))
            outcomes.add("decoded")
        except VlmqError as exc:
            outcomes.add(exc.code.value)
    assert outcomes <= {"decoded", "image_corrupt", "image_too_large"} and "image_corrupt" in outcomes
