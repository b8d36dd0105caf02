"""Fuzzing (hypothesis): whatever bytes arrive, the Kafka decoder and the image pipeline's
entry raise only VlmqError (with a code), never anything else, and never hang."""

from __future__ import annotations

import io
import json

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmq.schemas import ErrorCode, VlmqError, decode_job
from vlmq.schemas.codec import JSON, MSGPACK
from vlmq.worker.preprocess import load_image
from vlmq.worker.samples import photo

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
job_like = st.fixed_dictionaries(
    {"job_id": st.text(max_size=20) | st.integers(-(2**63), 2**63)},
    optional={
        "messages": json_values,
        "sampling": json_values,
        "response_format": json_values,
        "v": st.integers(-5, 5) | st.text(max_size=3),
        "priority": json_values,
    },
)


def _decodes_or_typed_error(value: bytes, content_type: bytes | None) -> None:
    try:
        decode_job(value, content_type)
    except VlmqError as exc:
        assert exc.code in (ErrorCode.BAD_MESSAGE, ErrorCode.INVALID_JOB, ErrorCode.UNSUPPORTED_VERSION)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512), st.sampled_from([None, MSGPACK, JSON, b"text/plain"]))
def test_random_bytes_never_escape_the_decoder(value: bytes, content_type: bytes | None) -> None:
    _decodes_or_typed_error(value, content_type)


@settings(max_examples=400, deadline=None)
@given(job_like, st.booleans())
def test_job_shaped_garbage_never_escapes_the_decoder(obj: dict[str, object], as_json: bool) -> None:
    value = json.dumps(obj).encode() if as_json else msgspec.msgpack.encode(obj)
    _decodes_or_typed_error(value, JSON if as_json else MSGPACK)


_SEEDS = [photo(64, 48, fmt=f) for f in ("JPEG", "PNG", "GIF", "WEBP", "BMP")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_SEEDS),
    st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=12),
    st.integers(0, 4000),
)
def test_mutated_images_decode_or_fail_with_an_image_code(
    seed: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(seed[: max(cut, 1)] if cut else seed)
    for pos, val in flips:
        if data:
            data[pos % len(data)] = val
    try:
        img = load_image(
            bytes(data), factor=28, min_pixels=3136, max_pixels=200_000, max_image_pixels=4_000_000
        )
    except VlmqError as exc:
        assert exc.code in (ErrorCode.IMAGE_CORRUPT, ErrorCode.IMAGE_TOO_LARGE)
    else:
        assert img.mode == "RGB" and img.size[0] % 28 == 0 and img.size[1] % 28 == 0


def test_random_noise_is_not_an_image() -> None:
    try:
        load_image(
            io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).getvalue(),
            factor=28,
            min_pixels=3136,
            max_pixels=200_000,
            max_image_pixels=4_000_000,
        )
    except VlmqError as exc:
        assert exc.code is ErrorCode.IMAGE_CORRUPT
