"""Photo-like sample images (smooth colour fields plus grain), for the demo, tests and
benchmarks: cheap to make, deterministic per seed, and they compress like photos."""

from __future__ import annotations

import io
import random
from typing import Any

from PIL import Image, ImageFilter

import vlmq.worker.preprocess  # noqa: F401  # registers HEIF with Pillow: photo(fmt="HEIF")


def photo(w: int = 640, h: int = 480, seed: int = 0, fmt: str = "JPEG", **save: Any) -> bytes:
    rnd = random.Random(seed)
    small = Image.new("RGB", (8, 6))
    small.putdata([tuple(rnd.randrange(256) for _ in range(3)) for _ in range(48)])
    img = small.resize((w, h), Image.Resampling.BICUBIC)
    noise = Image.frombytes("L", (w, h), rnd.randbytes(w * h)).convert("RGB")
    img = Image.blend(img, noise, 0.15).filter(ImageFilter.SMOOTH)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


# Container and codec of each sample video format: what phones and browsers write.
CLIP_FORMATS = {
    "mp4": ("mp4", "libx264"),
    "mov": ("mov", "libx264"),
    "webm": ("webm", "libvpx-vp9"),
    "mkv": ("matroska", "libx264"),
}


def clip(
    seconds: float = 2.0,
    fps: int = 10,
    w: int = 160,
    h: int = 120,
    seed: int = 0,
    fmt: str = "mp4",
    keyframe_every: int | None = None,
) -> bytes:
    """A short video made by FFmpeg's own encoders: a photo that brightens frame by frame,
    so each frame differs and a frame's position can be read back from its pixels.
    `keyframe_every`: frames between keyframes (the encoder's default: a few seconds)."""
    import av

    container, codec = CLIP_FORMATS[fmt]
    base = Image.open(io.BytesIO(photo(w, h, seed)))
    n = max(1, round(seconds * fps))
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        assert isinstance(stream, av.VideoStream)  # a video codec's stream
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if keyframe_every:
            stream.codec_context.gop_size = keyframe_every
        for i in range(n):
            frame = Image.blend(base, Image.new("RGB", (w, h), "white"), i / (n + 1))
            out.mux(stream.encode(av.VideoFrame.from_image(frame)))  # type: ignore[no-untyped-call]
        out.mux(stream.encode())
    return buf.getvalue()
