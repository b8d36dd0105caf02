"""Random bf16 safetensors for a model folder made by make_model.py (LMDeploy has no
`load_format=dummy`). Built on the GPU from the config, saved next to it.

    python bench/gpu/make_weights.py /tmp/models/qwen2-vl-7b
"""

from __future__ import annotations

import sys
import time

import torch
from transformers import AutoConfig, AutoModelForImageTextToText


def main(path: str) -> None:
    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(path)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, torch_dtype=torch.bfloat16)
    for p in model.parameters():  # small random values: no inf/nan in a forward pass
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="5GB")
    n = sum(p.numel() for p in model.parameters())
    print(f"{n / 1e9:.2f}B parameters written to {path} in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main(sys.argv[1])
