"""Stage: precomputed image embeddings -> checked before any engine sees them.

An `image_embeds` part names a safetensors file (a format that holds only tensors: loading
it runs no code, unlike a pickle) with one 2-D tensor `image_embeds` of [tokens, hidden
size], float16, bfloat16 or float32. Only its header is read here (a bounded JSON), and
every claim in it is checked against the bytes and against the model: the dtype, the
shape, the offsets (the tensor fills the file exactly), the hidden size of the model's
language backbone, and for Qwen-VL-family models the part's `image_grid_thw` (tokens ==
t x h x w / merge size²). A file that fails any of it is `embedding_invalid`; the engine
(vLLM with `enable_mm_embeds`) gets only what passed.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import msgspec

from vlmq.schemas.errors import ErrorCode, VlmqError

_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4}
MAX_HEADER_BYTES = 64 * 1024  # one tensor's header is ~150 bytes; a huge one is an attack


class EmbedSpec(msgspec.Struct, frozen=True):
    """What a model takes: its language backbone's hidden size, and for Qwen-VL-family
    models the vision encoder's spatial merge size (then a grid is required)."""

    hidden_size: int
    merge_size: int | None = None


class Embedding(msgspec.Struct, frozen=True):
    """A checked embeddings file: its bytes (a safetensors file), what it holds, its grid."""

    data: bytes
    dtype: str
    tokens: int
    grid_thw: tuple[int, int, int] | None

    @property
    def nbytes(self) -> int:
        return len(self.data)


def load_embedding(data: bytes, grid_thw: list[int] | None, spec: EmbedSpec) -> Embedding:
    """The file's tensor, checked against the model, or VlmqError(EMBEDDING_INVALID)."""
    header = _header(data)
    names = [k for k in header if k != "__metadata__"]
    if names != ["image_embeds"]:
        raise _invalid(f"the file must hold one tensor named image_embeds, not {_names(names)}")
    info = header["image_embeds"]
    if not isinstance(info, dict):
        raise _invalid("the image_embeds entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _ITEMSIZE:
        raise _invalid(f"dtype {dtype!r}: float16 (F16), bfloat16 (BF16) or float32 (F32) only")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(n) is int and n > 0 for n in shape)):
        raise _invalid(f"shape {shape!r}: a 2-D [tokens, hidden size] tensor only")
    tokens, hidden = shape
    size = tokens * hidden * _ITEMSIZE[dtype]
    body = len(data) - 8 - _header_len(data)
    if offsets != [0, size] or body != size:
        raise _invalid(f"data_offsets {offsets!r} and {body} bytes of data do not hold a {dtype} {shape}")
    if hidden != spec.hidden_size:
        raise _invalid(f"[{tokens}, {hidden}]: this model's hidden size is {spec.hidden_size}")
    return Embedding(data, dtype, tokens, _grid(grid_thw, tokens, spec))


def _grid(grid_thw: list[int] | None, tokens: int, spec: EmbedSpec) -> tuple[int, int, int] | None:
    if spec.merge_size is None:
        return None  # a model without grids (LLaVA) takes the tensor alone
    if not grid_thw:
        raise _invalid("this model needs image_grid_thw (patches: [t, h, w]) with each embedding")
    t, h, w = grid_thw
    expected = t * h * w / spec.merge_size**2
    if expected != tokens:
        raise _invalid(
            f"image_grid_thw {grid_thw} makes {expected:g} tokens at merge size {spec.merge_size}, "
            f"the tensor has {tokens}"
        )
    return t, h, w


def _header_len(data: bytes) -> int:
    if len(data) < 8:
        raise _invalid("not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise _invalid("not a safetensors file (its header length is wrong)")
    return int(n)


def _header(data: bytes) -> dict[str, Any]:
    n = _header_len(data)
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError):
        raise _invalid("not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise _invalid("not a safetensors file (its header is not an object)")
    return header


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n[:40]) for n in names[:4])
    return shown + (", ..." if len(names) > 4 else "") if names else "none"


def _invalid(message: str) -> VlmqError:
    return VlmqError(ErrorCode.EMBEDDING_INVALID, message)


def safetensors_file(tensor: bytes, shape: tuple[int, int], dtype: str = "F32") -> bytes:
    """A safetensors file holding `tensor` (raw little-endian bytes) as image_embeds: what a
    producer writes (`safetensors.torch.save_file({"image_embeds": t}, ...)` makes the same)."""
    header = {"image_embeds": {"dtype": dtype, "shape": list(shape), "data_offsets": [0, len(tensor)]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # aligned, as safetensors writes it
    assert math.prod(shape) * _ITEMSIZE[dtype] == len(tensor), "shape and bytes disagree"
    return struct.pack("<Q", len(raw)) + raw + tensor
