"""Precomputed image embeddings: every claim of a safetensors file is checked against its
bytes and against the model before an engine sees it; anything else is a typed failure."""

from __future__ import annotations

import json
import pickle
import random
import struct

import msgspec
import pytest

from vlmq.schemas import EmbeddingRef, ErrorCode, ImageRef, Job, Message, TextPart, VlmqError
from vlmq.worker.embeds import MAX_HEADER_BYTES, EmbedSpec, load_embedding, safetensors_file
from vlmq.worker.engines.mapping import hf_messages, lmdeploy_messages, openai_messages

QWEN = EmbedSpec(hidden_size=64, merge_size=2)
LLAVA = EmbedSpec(hidden_size=64)


def floats(n: int, itemsize: int = 4) -> bytes:
    return random.Random(n).randbytes(n * itemsize)


def raw_file(header: object, body: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + body


@pytest.mark.parametrize(("dtype", "size"), [("F32", 4), ("F16", 2), ("BF16", 2)])
def test_a_file_that_fits_the_model_passes(dtype: str, size: int) -> None:
    data = safetensors_file(floats(16 * 64, size), (16, 64), dtype)
    e = load_embedding(data, [1, 8, 8], QWEN)
    assert (e.tokens, e.dtype, e.grid_thw, e.data) == (16, dtype, (1, 8, 8), data)
    llava = safetensors_file(floats(576 * 64), (576, 64))
    assert load_embedding(llava, None, LLAVA).grid_thw is None
    assert load_embedding(llava, [1, 8, 8], LLAVA).grid_thw is None  # a grid it has no use for


def good_header(shape: list[int], end: int, dtype: str = "F32") -> dict[str, object]:
    return {"image_embeds": {"dtype": dtype, "shape": shape, "data_offsets": [0, end]}}


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "too short"),
        (b"\x80\x04\x95" + pickle.dumps({"image_embeds": [1.0] * 64}), "header length"),  # a pickle
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}" * 40_000, "header length"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not an object"),
        (raw_file({}, b""), "one tensor named image_embeds, not none"),
        (raw_file({"pixels": {}}, b""), "not 'pixels'"),
        (raw_file(good_header([16, 64], 4096) | {"other": {}}, floats(1024)), "one tensor"),
        (raw_file(good_header([16, 64], 8192, "I64"), floats(1024, 8)), "dtype 'I64'"),
        (raw_file(good_header([2, 8, 64], 4096), floats(1024)), "2-D"),
        (raw_file(good_header([16, -64], 4096), floats(1024)), "2-D"),
        (raw_file(good_header([16, 64], 4096), floats(1000)), "do not hold"),  # truncated
        (raw_file(good_header([16, 64], 4096), floats(1024) + b"junk"), "do not hold"),
        (raw_file(good_header([16, 64], 9999), floats(1024)), "do not hold"),
        (safetensors_file(floats(16 * 32), (16, 32)), "hidden size is 64"),
    ],
)
def test_anything_else_is_embedding_invalid(data: bytes, says: str) -> None:
    with pytest.raises(VlmqError) as err:
        load_embedding(data, [1, 8, 8], QWEN)
    assert err.value.code is ErrorCode.EMBEDDING_INVALID and says in err.value.message


def test_qwen_vl_models_need_a_grid_that_makes_the_tokens() -> None:
    data = safetensors_file(floats(16 * 64), (16, 64))
    with pytest.raises(VlmqError, match="needs image_grid_thw"):
        load_embedding(data, None, QWEN)
    with pytest.raises(VlmqError, match=r"makes 20 tokens at merge size 2, the tensor has 16"):
        load_embedding(data, [1, 8, 10], QWEN)


def test_the_contract_bounds_the_part() -> None:
    job = Job(job_id="j", messages=[Message("user", [EmbeddingRef("s3://b/e.st", image_grid_thw=[1, 8, 8])])])
    assert job.embeds and not job.images and job.media == job.embeds
    raw = msgspec.json.encode(job).replace(b"[1,8,8]", b"[1,8]")
    with pytest.raises(msgspec.ValidationError, match="image_grid_thw"):
        msgspec.json.decode(raw, type=Job)
    with pytest.raises(ValueError, match="unknown URI scheme"):
        EmbeddingRef("gopher://x")


def test_embeddings_stand_where_their_image_would() -> None:
    msgs = [Message("user", [EmbeddingRef("s3://b/e"), TextPart("what is it?"), ImageRef("s3://b/i")])]
    assert hf_messages(msgs)[0]["content"][0] == {"type": "image"}
    with pytest.raises(VlmqError) as err:
        openai_messages(msgs, ["u"])
    assert err.value.code is ErrorCode.UNSUPPORTED_INPUT
    with pytest.raises(VlmqError) as err:
        lmdeploy_messages(msgs, [object()])
    assert err.value.code is ErrorCode.UNSUPPORTED_INPUT


def test_mangled_files_only_ever_fail_typed() -> None:
    rnd = random.Random(3)
    good = safetensors_file(floats(16 * 64), (16, 64))
    outcomes = set()
    for _ in range(2000):
        b = bytearray(good)
        for _ in range(rnd.randint(1, 6)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        try:
            load_embedding(bytes(b), [1, 8, 8], QWEN)
            outcomes.add("ok")
        except VlmqError as exc:
            outcomes.add(exc.code.value)
    assert outcomes == {"ok", "embedding_invalid"}
