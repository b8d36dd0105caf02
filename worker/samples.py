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
