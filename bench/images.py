"""Image path: images/s per core of vlmq's preprocess vs. the naive Pillow path.

Same JPEGs (photo-like, made here), same target size (Qwen-VL's budget, max_pixels
1280*28*28). Raw: `Image.open(...).convert("RGB").resize(target)`, what most glue code
does. vlmq: `load_image` (header pixel guard, JPEG draft decoding at reduced scale, EXIF
orientation, RGB, bicubic resize with reducing_gap). Both on one thread, so the figure is
per core. `--s3` adds the fetch from moto_server through the worker's pooled client.

    python bench/images.py --count 100 --width 3000 --height 2000
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from PIL import Image

from bench.common import start_stack, write_result
from vlmq.worker.preprocess import load_image, smart_resize
from vlmq.worker.samples import photo
from vlmq.worker.settings import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, WorkerSettings


def raw(blobs: list[bytes], size: tuple[int, int]) -> float:
    t0 = time.perf_counter()
    for b in blobs:
        Image.open(io.BytesIO(b)).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    return len(blobs) / (time.perf_counter() - t0)


def ours(blobs: list[bytes]) -> float:
    t0 = time.perf_counter()
    for b in blobs:
        load_image(
            b, factor=28, min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS, max_image_pixels=100_000_000
        )
    return len(blobs) / (time.perf_counter() - t0)


async def fetch_all(blobs: list[bytes]) -> float:
    """Fetch from S3 (moto) with the worker's Fetcher, then decode: images/s, one core."""
    import boto3

    from vlmq.schemas.job import ImageRef
    from vlmq.worker.fetch import Fetcher

    stack, env = await asyncio.to_thread(start_stack)
    try:
        s3 = boto3.client("s3", endpoint_url=env["VLMQ_S3_ENDPOINT_URL"])
        s3.create_bucket(Bucket="bench")
        for i, b in enumerate(blobs):
            s3.put_object(Bucket="bench", Key=f"{i}.jpg", Body=b)
        settings = WorkerSettings(s3_endpoint_url=env["VLMQ_S3_ENDPOINT_URL"])
        async with Fetcher(settings) as f:
            t0 = time.perf_counter()
            data = await asyncio.gather(
                *(f.fetch(ImageRef(f"s3://bench/{i}.jpg")) for i in range(len(blobs)))
            )
            fetched = time.perf_counter() - t0
        decode = len(blobs) / ours(list(data))
        return len(blobs) / (fetched + decode)
    finally:
        stack.down()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--width", type=int, default=3000)
    ap.add_argument("--height", type=int, default=2000)
    ap.add_argument("--s3", action="store_true", help="also time the fetch from moto_server")
    args = ap.parse_args()
    blobs = [photo(args.width, args.height, seed=i, quality=90) for i in range(args.count)]
    h, w = smart_resize(args.height, args.width, 28, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)
    ours(blobs[:3]), raw(blobs[:3], (w, h))  # warm up
    base = raw(blobs, (w, h))
    value = ours(blobs)
    extra = {}
    if args.s3:
        extra["with_s3_fetch_images_per_s"] = round(asyncio.run(fetch_all(blobs)), 2)
    print(f"raw Pillow: {base:.1f} images/s/core; vlmq: {value:.1f} images/s/core")
    write_result(
        "images",
        "images/s per core",
        base,
        value,
        {
            "count": args.count,
            "source": f"{args.width}x{args.height} JPEG q90, photo-like",
            "target": f"{w}x{h} (max_pixels 1280*28*28)",
            "threads": 1,
        },
        **extra,
    )


if __name__ == "__main__":
    main()
