"""The image stage alone, with every core busy: vlmq's thread pool vs. its process pool,
both against raw Pillow in threads, on 3 MP and 12 MP photos.

Raw: `Image.open(...).convert("RGB").resize(target)` in one thread per core (Pillow drops
the GIL while it decodes and resizes). vlmq: `ImagePool.prepare` (header pixel guard, JPEG
draft decoding at reduced scale, EXIF, RGB, resize) with `pool="thread"` and
`pool="process"` (no renderer: the resized image comes back pickled), one worker per core.
Each mode runs `--repeat` times, interleaved; the median is kept.

    python bench/image_pool.py --count 60
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

from PIL import Image

from bench.common import write_result
from vlmq.schemas.job import ImageRef, Message, TextPart
from vlmq.worker.preprocess import smart_resize
from vlmq.worker.render import DecodeLimits, ImagePool, Sizing
from vlmq.worker.samples import photo
from vlmq.worker.settings import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS

SIZES = {"3MP": (2048, 1536), "12MP": (4032, 3024)}
LIMITS = DecodeLimits(28, 100_000_000, ("JPEG",))
MESSAGES = [Message("user", [ImageRef("s3://b/k"), TextPart("x")])]


def raw(blobs: list[bytes], workers: int) -> float:
    w, h = Image.open(io.BytesIO(blobs[0])).size
    th, tw = smart_resize(h, w, 28, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)

    def one(b: bytes) -> Any:
        return Image.open(io.BytesIO(b)).convert("RGB").resize((tw, th), Image.Resampling.BICUBIC)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, blobs))
    return len(blobs) / (time.perf_counter() - t0)


async def pooled(pool: ImagePool, blobs: list[bytes]) -> float:
    px: list[Sizing] = [(QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)]
    t0 = time.perf_counter()
    await asyncio.gather(*(pool.prepare([b], px, MESSAGES) for b in blobs))
    return len(blobs) / (time.perf_counter() - t0)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=60, help="photos per size")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    pools = {kind: ImagePool(LIMITS, pool=kind, workers=args.workers) for kind in ("thread", "process")}
    await pools["process"].warm()
    rows = []
    try:
        for name, (w, h) in SIZES.items():
            blobs = [photo(w, h, seed=i, quality=90) for i in range(args.count)]
            runs: dict[str, list[float]] = {"raw_pillow": [], "vlmq_thread": [], "vlmq_process": []}
            for _ in range(args.repeat):
                runs["raw_pillow"].append(raw(blobs, args.workers))
                runs["vlmq_thread"].append(await pooled(pools["thread"], blobs))
                runs["vlmq_process"].append(await pooled(pools["process"], blobs))
            med = {k: round(statistics.median(v), 2) for k, v in runs.items()}
            row: dict[str, Any] = {"size": f"{name} {w}x{h}", "images_per_s": med, "runs": runs}
            row["thread_over_raw"] = round(med["vlmq_thread"] / med["raw_pillow"], 2)
            row["process_over_raw"] = round(med["vlmq_process"] / med["raw_pillow"], 2)
            row["process_over_thread"] = round(med["vlmq_process"] / med["vlmq_thread"], 2)
            print(row["size"], med, flush=True)
            rows.append(row)
    finally:
        for pool in pools.values():
            pool.close()
    big = rows[-1]["images_per_s"]
    write_result(
        "image-pool",
        "images/s",
        big["raw_pillow"],
        big["vlmq_thread"],
        {
            "count_per_size": args.count,
            "repeat": args.repeat,
            "workers": args.workers,
            "target": "Qwen-VL budget, max_pixels 1280*28*28",
            "photos": "photo-like JPEG q90 (vlmq.worker.samples.photo)",
            "top_level": "12 MP: vlmq's thread pool (the default) vs raw Pillow in threads",
        },
        rows=rows,
    )


if __name__ == "__main__":
    asyncio.run(main())
