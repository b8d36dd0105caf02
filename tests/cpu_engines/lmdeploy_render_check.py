"""Run in the CPU engines venv (LMDeploy's front end needs no GPU; its engines do):
LMDeploy's renderer in the worker's real process pool must give exactly what LMDeploy's own
front end gives for the same jobs (token ids, placement, every tensor), without a CUDA
context in the image processes; a job it cannot render fails typed, and the pool goes on.

    python tests/cpu_engines/lmdeploy_render_check.py MODEL_DIR
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from typing import Any

import torch

from vlmq.schemas import ErrorCode, ImageRef, Message, TextPart
from vlmq.worker.engines.lmdeploy import LmdeployRendererFactory
from vlmq.worker.engines.mapping import lmdeploy_messages
from vlmq.worker.render import DecodeLimits, ImagePool
from vlmq.worker.samples import photo

PIXELS = (56 * 56, 448 * 448)


def front_end(model: str) -> Any:
    """LMDeploy's prompt processor, built as its VLAsyncEngine builds it."""
    from lmdeploy import PytorchEngineConfig, VisionConfig
    from lmdeploy.model import get_chat_template
    from lmdeploy.serve.processors import MultimodalProcessor
    from lmdeploy.tokenizer import Tokenizer
    from lmdeploy.vl.engine import ImageEncoder

    encoder = ImageEncoder(model, "pytorch", VisionConfig(), PytorchEngineConfig())
    return MultimodalProcessor(Tokenizer(model), get_chat_template(model, None), encoder, "pytorch")


def same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, Mapping):  # dicts, and transformers' BatchFeature
        assert a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


async def main(model: str) -> None:
    import lmdeploy.vl.engine as vl_engine

    dtype = vl_engine._resolve_mm_feature_dtype(None, None)  # the parent's answer, sent along
    factory = LmdeployRendererFactory(model, None, False, str(dtype).removeprefix("torch."))
    limits = DecodeLimits(28, 10**8, ())
    pool = ImagePool(limits, pool="process", workers=2, renderer=factory)
    threads = ImagePool(limits, pool="thread", workers=1)  # decoded images, as the engine gets them
    ours = front_end(model)
    jobs = {  # one image; two images around text; an odd size (resized to the 28-pixel grid)
        "one": [photo(640, 480, seed=1)],
        "two": [photo(320, 240, seed=2), photo(500, 333, seed=3)],
        "odd": [photo(97, 1301, seed=4)],
    }
    try:
        await pool.warm()
        for name, blobs in jobs.items():
            parts: list[Any] = [ImageRef(f"s3://b/{name}{i}") for i in range(len(blobs))]
            messages = [Message("user", [*parts, TextPart(f"Describe {name}.")])]
            got = await pool.prepare(blobs, [PIXELS] * len(blobs), messages)
            assert got.rendered is not None and got.nbytes > 0, name
            images = (await threads.prepare(blobs, [PIXELS] * len(blobs), messages)).images
            want = await ours.get_prompt_input(lmdeploy_messages(messages, images), do_preprocess=True)
            same(got.rendered, want, name)
            tokens = sum(int(m["image_tokens"].sum()) for m in got.rendered["multimodal"])
            ids = got.rendered["input_ids"]
            print(f"{name}: {len(ids)} tokens, {tokens} image tokens, {got.nbytes} bytes of tensors")
        cuda = await asyncio.get_running_loop().run_in_executor(pool._executor, _cuda_initialized)
        assert cuda is False, "an image process opened a CUDA context"
        bad = [Message("user", [ImageRef("s3://b/x"), TextPart("x")])]
        try:
            await pool.prepare([b"not an image"], [PIXELS], bad)
            raise AssertionError("a corrupt image was rendered")
        except Exception as exc:
            assert getattr(exc, "code", None) == ErrorCode.IMAGE_CORRUPT, repr(exc)
        retry = [Message("user", [ImageRef("s3://b/y"), TextPart("x")])]
        assert (await pool.prepare(jobs["one"], [PIXELS], retry)).rendered is not None
    finally:
        pool.close()
        threads.close()
    print("lmdeploy renderer: same as LMDeploy's front end")


def _cuda_initialized() -> bool:
    return bool(torch.cuda.is_initialized())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
