"""Stage: a video's bytes -> the frames the model takes, off the event loop (PyAV, FFmpeg).

Only the containers of `video_formats` open (mp4/mov, webm/mkv). The frame size and the
duration are checked from the headers before any frame is decoded, and the frames and
seconds actually decoded are counted while decoding (a header can lie), so a long, huge
or endless stream is `image_too_large`; whatever FFmpeg raises is `image_corrupt`.

Frames are sampled at `fps` per second of video, or `num_frames` spread evenly, at most
`max_video_frames`, and always an even count (Qwen-VL merges frames in pairs; others do
not mind). Each frame is resized like an image, all to the same size; the engine gets
the frames with what it needs to place them in time (source fps, frame indices).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from vlmq.schemas.errors import ErrorCode, VlmqError, describe
from vlmq.worker.preprocess import smart_resize

if TYPE_CHECKING:
    from PIL.Image import Image

# FFmpeg's demuxer names: "mov,mp4,m4a,3gp,3g2,mj2" and "matroska,webm".
VIDEO_FORMATS = ("mp4", "mov", "webm", "matroska")
_MAX_FPS = 240  # frames a second a real stream has at most: decoding past it is a lie
SEEK_GAP_S = 4.0  # from this far ahead, seeking beats decoding every frame in between


class VideoSampling(msgspec.Struct, frozen=True):
    """How one video of a job is sampled: `fps` or `num_frames`, and each frame's pixels."""

    fps: float | None
    num_frames: int | None
    min_pixels: int
    max_pixels: int


class VideoLimits(msgspec.Struct, frozen=True):
    """The worker's bounds (defaults: WorkerSettings')."""

    max_frames: int = 64
    max_seconds: float = 600.0
    max_frame_pixels: int = 64_000_000
    default_fps: float = 2.0
    formats: tuple[str, ...] = VIDEO_FORMATS


class Video(msgspec.Struct):
    """Sampled frames (RGB, one size) and where they stand in the source."""

    frames: list[Image]
    fps: float  # the source's frame rate
    duration_s: float
    total_frames: int
    indices: list[int]  # each sampled frame's position in the source

    @property
    def nbytes(self) -> int:
        return sum(f.width * f.height * 3 for f in self.frames)

    def metadata(self) -> dict[str, Any]:
        """What transformers (and vLLM) take with the frames: VideoMetadata's fields."""
        return {
            "fps": self.fps,
            "duration": self.duration_s,
            "total_num_frames": self.total_frames,
            "frames_indices": list(self.indices),
            "video_backend": "pyav",
        }


def load_video(data: bytes, sampling: VideoSampling, limits: VideoLimits, factor: int) -> Video:
    """Bytes -> sampled frames resized to multiples of `factor`, or VlmqError
    (IMAGE_CORRUPT / IMAGE_TOO_LARGE)."""
    import av

    if not data:
        raise VlmqError(ErrorCode.IMAGE_CORRUPT, "empty video (0 bytes)")
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            return _sample(container, sampling, limits, factor)
    except VlmqError:
        raise
    except Exception as exc:  # FFmpeg's errors, a demuxer's surprise: this video's fault
        raise VlmqError(ErrorCode.IMAGE_CORRUPT, f"cannot decode video: {describe(exc, 300)}") from None


def _sample(container: Any, sampling: VideoSampling, limits: VideoLimits, factor: int) -> Video:
    if not set(container.format.name.split(",")) & set(limits.formats):
        allowed = ", ".join(limits.formats)
        raise VlmqError(ErrorCode.IMAGE_CORRUPT, f"not a video of an allowed format ({allowed})")
    if not container.streams.video:
        raise VlmqError(ErrorCode.IMAGE_CORRUPT, "no video stream")
    stream = container.streams.video[0]
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > limits.max_frame_pixels:
        raise VlmqError(ErrorCode.IMAGE_TOO_LARGE, f"{w}x{h} frames: more pixels than max_image_pixels")
    duration = _duration(container, stream)
    if duration > limits.max_seconds:
        too_long = f"{duration:.1f} s of video > max_video_s {limits.max_seconds}"
        raise VlmqError(ErrorCode.IMAGE_TOO_LARGE, too_long)
    rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
    n = _frame_count(duration, rate, stream.frames, sampling, limits)
    size = smart_resize(h, w, factor, sampling.min_pixels, sampling.max_pixels)
    targets = [(i + 0.5) * duration / n for i in range(n)]
    frames, indices = _decode(container, stream, targets, rate, limits, lambda f: _rgb_resized(f, size))
    return Video(frames, rate, duration, max(stream.frames, indices[-1] + 1), indices)


def _duration(container: Any, stream: Any) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return float(container.duration) / 1_000_000  # AV_TIME_BASE
    raise VlmqError(ErrorCode.IMAGE_CORRUPT, "the video does not say how long it is")


def _frame_count(
    duration: float, rate: float, total: int, sampling: VideoSampling, limits: VideoLimits
) -> int:
    """Frames to sample: asked for, or the duration at the sampling fps; capped; even."""
    if sampling.num_frames is not None:
        n = sampling.num_frames
    else:
        n = math.ceil(duration * (sampling.fps or limits.default_fps))
    available = total or max(1, math.floor(duration * rate))
    n = max(1, min(n, limits.max_frames, available))
    return n + 1 if n % 2 and n + 1 <= limits.max_frames else max(2, n - n % 2)


class _Frames:
    """Decoded frames in time order, with a seek ahead over a long gap: a 10-minute video
    sampled at a few frames is not decoded whole. A seek lands on the keyframe before its
    target; one that lands no further than where decoding already was (keyframes too far
    apart) gains nothing, and the rest of the video is decoded in order. Every frame
    decoded, a seek's included, counts against the bound."""

    def __init__(self, container: Any, stream: Any, rate: float, limits: VideoLimits) -> None:
        self.container, self.stream, self.rate, self.limits = container, stream, rate, limits
        self.decoded = 0
        self.most = math.ceil(limits.max_seconds * _MAX_FPS)
        self.seeking = True

    def from_(self, target: float, now: float | None) -> Iterator[tuple[Any, float]]:
        """(frame, its time) from about `target` on; `now`: the time decoding had reached."""
        if now is not None and self.seeking and target - now > SEEK_GAP_S:
            self.container.seek(int(target / self.stream.time_base), stream=self.stream, backward=True)
        for frame in self.container.decode(self.stream):
            self.decoded += 1
            t = frame.time if frame.time is not None else self.decoded / self.rate
            if self.decoded > self.most or t > self.limits.max_seconds:
                too_long = f"the video runs past max_video_s {self.limits.max_seconds}"
                raise VlmqError(ErrorCode.IMAGE_TOO_LARGE, too_long)
            if now is not None and t <= now:
                self.seeking = False  # the seek went back as far as we were: decode in order
                continue
            now = None
            yield frame, t


def _decode(
    container: Any,
    stream: Any,
    targets: list[float],
    rate: float,
    limits: VideoLimits,
    convert: Callable[[Any], Image],
) -> tuple[list[Image], list[int]]:
    """The decoded frame nearest after each target time (seconds), converted at once (a
    decoded frame may be far larger than what the model takes: none is kept), and its index
    in the source. A stream shorter than its header said repeats its last frame."""
    picked: list[Image] = []
    indices: list[int] = []
    half = 0.5 / rate
    frames = _Frames(container, stream, rate, limits)
    now: float | None = None
    while len(picked) < len(targets):
        for frame, t in frames.from_(targets[len(picked)], now):
            now = t
            image = None
            while len(picked) < len(targets) and targets[len(picked)] <= t + half:
                image = image or convert(frame)
                picked.append(image)
                indices.append(round(t * rate))
            if len(picked) == len(targets) or (frames.seeking and targets[len(picked)] - t > SEEK_GAP_S):
                break
        else:
            break  # the stream ended
    if not picked:
        raise VlmqError(ErrorCode.IMAGE_CORRUPT, "the video has no frame that decodes")
    while len(picked) < len(targets):
        picked.append(picked[-1])
        indices.append(indices[-1])
    return picked, indices


def _rgb_resized(frame: Any, size: tuple[int, int]) -> Image:
    from PIL import Image as PILImage

    img: Image = frame.to_image()  # RGB
    th, tw = size
    if img.size != (tw, th):
        img = img.resize((tw, th), PILImage.Resampling.BICUBIC, reducing_gap=2.0)
    return img


def encode_mp4(video: Video) -> bytes:
    """The frames as an H.264 mp4 playing at the rate they were sampled (for engines that
    take a video file, not frames: OpenAI-compatible servers' `video_url`)."""
    import av

    rate = max(1, round(len(video.frames) / video.duration_s)) if video.duration_s > 0 else 1
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height = video.frames[0].size
        stream.pix_fmt = "yuv420p"
        for img in video.frames:
            frame = av.VideoFrame.from_image(img)  # type: ignore[no-untyped-call]  # PyAV's stub lacks it
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()
