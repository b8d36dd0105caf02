"""What the photo benches share (bench_e2e.py, sweep.py, multi_gpu.py): the photos, the
prompt, one request, the figures of a timed run. Light on purpose: the sweep imports this
on the lent GPU with no more than vLLM's wheels and a few small ones (no S3, no Kafka).
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench.gpu.gpu_sampler import GpuSampler
from vlmq.schemas.job import ImageRef, Message, Sampling, TextPart
from vlmq.worker.engines.base import EngineRequest
from vlmq.worker.samples import photo
from vlmq.worker.settings import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS

PROMPT = "Describe this image in one or two sentences."
# The mixed set: landscape and portrait phone and web photos, in turn.
MIXED = [(1024, 768), (2048, 1536), (4032, 3024), (1536, 2048), (3024, 4032)]
PIXELS = (QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)


def shapes(size: str, n: int) -> list[tuple[int, int]]:
    if size == "mixed":
        return [MIXED[i % len(MIXED)] for i in range(n)]
    w, h = (int(x) for x in size.split("x"))
    return [(w, h)] * n


def make_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[bytes]:
    with ProcessPoolExecutor() as pool:
        return list(pool.map(_photo, [(w, h, seed + i) for i, (w, h) in enumerate(sizes)], chunksize=4))


def _photo(a: tuple[int, int, int]) -> bytes:
    return photo(a[0], a[1], seed=a[2], quality=90)


def request(i: int, n_images: int, max_tokens: int, **kw: Any) -> EngineRequest:
    parts: list[Any] = [ImageRef(f"s3://memory/{i}")] * n_images + [TextPart(PROMPT)]
    kw.setdefault("images", [])
    return EngineRequest(
        request_id=f"r{i}-{time.monotonic_ns()}",
        messages=[Message("user", parts)],
        sampling=Sampling(max_tokens=max_tokens),
        **kw,
    )


def _figures(n: int, dt: float, outs: list[Any], gpu: GpuSampler) -> dict[str, Any]:
    tokens = sum(o.completion_tokens for o in outs)
    return {
        "images": n,
        "seconds": round(dt, 2),
        "images_per_s": round(n / dt, 2),
        "output_tokens_per_s": round(tokens / dt, 1),
        "gpu_util_mean_pct": gpu.mean,
        "gpu_util_per_gpu_pct": gpu.per_gpu,
        "mean_prompt_tokens": round(sum(o.prompt_tokens for o in outs) / n, 1),
        "mean_output_tokens": round(tokens / n, 1),
    }
