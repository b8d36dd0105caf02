"""What keeps one message from stopping a worker, piece by piece: the decoder's catch-all,
which messages may name their job, the image decoder's allowlist and catch-all, what counts
as an outage, and error texts without Python reprs."""

from __future__ import annotations

import io
import math
from typing import Any

import msgspec
import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, UnknownTopicOrPartitionError
from PIL import Image, ImageFile
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, ResponseError

from vlmq.core.retry import InfrastructureError, is_transient, through_outage
from vlmq.schemas import ErrorCode, VlmqError
from vlmq.schemas.codec import decode_job, invalid_job_id
from vlmq.schemas.errors import describe
from vlmq.worker.preprocess import load_image, unknown_formats
from vlmq.worker.samples import photo

BASE = {"messages": [{"role": "user", "content": "hi"}]}


def _load(data: bytes, formats: tuple[str, ...] | None = None) -> Image.Image:
    return load_image(
        data,
        factor=28,
        min_pixels=28 * 28,
        max_pixels=512 * 512,
        max_image_pixels=10_000_000,
        formats=formats,
    )


def _code(value: bytes) -> ErrorCode:
    with pytest.raises(VlmqError) as err:
        decode_job(value)
    return err.value.code


def test_nesting_deeper_than_any_decoder_goes_is_a_bad_message() -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    for field in (
        b'"response_format": {"type": "json_schema", "schema": {"a": ' + nested + b"}}",
        b'"unknown": ' + nested,
    ):
        assert (
            _code(b'{"job_id": "a", "messages": [{"role": "user", "content": "hi"}], ' + field + b"}")
            is ErrorCode.BAD_MESSAGE
        )
    packed = msgspec.msgpack.encode({"job_id": "a"})[:-1] + b"\x91" * 100_000 + b"\xc0"
    assert _code(packed) is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize(
    "extra",
    [
        {"deadline": math.nan},
        {"deadline": math.inf},
        {"submitted_at": -1.0},
        {"sampling": {"seed": 2**64 - 1}},
        {"metadata": {f"k{i}": "v" for i in range(65)}},
        {"metadata": {"k": "v" * 5000}},
        {"model": "m" * 513},
        {"sampling": {"stop": ["s" * 1001]}},
        {"response_format": {"type": "json_schema", "schema": {"d": "x" * 70_000}}},
    ],
)
def test_every_field_has_a_bound(extra: dict[str, object]) -> None:
    assert _code(msgspec.msgpack.encode({"job_id": "a", **BASE, **extra})) is ErrorCode.INVALID_JOB


def test_a_schema_within_the_bounds_decodes() -> None:
    schema: dict[str, object] = {"type": "string"}
    for _ in range(30):
        schema = {"type": "object", "properties": {"p": schema}}
    job = decode_job(
        msgspec.json.encode(
            {"job_id": "a", **BASE, "response_format": {"type": "json_schema", "schema": schema}}
        )
    )
    assert job.response_format is not None


@pytest.mark.parametrize(
    ("value", "key", "named"),
    [
        (b'{"job_id": "j1", "sampling": {"max_tokens": 0}}', b"j1", "j1"),
        (b'{"job_id": "j1", "sampling": {"max_tokens": 0}}', None, "j1"),
        (b'{"job_id": "j1"}', b"someone-else", None),  # the key names another job
        (b'{"job_id": "has space"}', b"has space", None),  # not a valid id
        (b'{"job_id": 7}', b"7", None),
        (b"\xc1\xc1", b"victim", None),  # garbage keyed with a victim's id
        (b"", b"victim", None),
    ],
)
def test_only_a_message_that_names_its_job_for_certain_may_fail_it(
    value: bytes, key: bytes | None, named: str | None
) -> None:
    assert invalid_job_id(value, key) == named


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


class _Exploding(ImageFile.ImageFile):
    """A Pillow plugin whose decoder raises what no caught list expects."""

    format = "VLMQBOOM"

    def _open(self) -> None:
        self._size = (8, 8)
        self._mode = "RGB"

    def load(self) -> Any:
        raise NotImplementedError("this decoder is not finished")


Image.register_open(_Exploding.format, _Exploding, lambda prefix: prefix.startswith(b"VLMQBOOM"))


def test_any_decoder_exception_is_image_corrupt() -> None:
    with pytest.raises(VlmqError) as err:
        _load(b"VLMQBOOM" + b"\0" * 64, ("VLMQBOOM",))
    assert err.value.code is ErrorCode.IMAGE_CORRUPT and "NotImplementedError" in err.value.message


def test_only_allowed_formats_are_opened() -> None:
    tga = _save(Image.new("RGB", (32, 32)), "TGA")
    with pytest.raises(VlmqError) as err:
        _load(tga, ("JPEG", "PNG"))
    assert err.value.code is ErrorCode.IMAGE_CORRUPT and "JPEG, PNG" in err.value.message
    assert _load(tga, ("TGA",)).mode == "RGB"
    assert _load(photo(64, 48), ("JPEG",)).mode == "RGB"
    assert unknown_formats(["JPEG", "png", "NOPE"]) == ["NOPE"]


def test_errors_speak_vlmqs_words_not_pythons_reprs() -> None:
    with pytest.raises(VlmqError) as err:
        _load(b"definitely not an image")
    assert " at 0x" not in err.value.message and "<_io" not in err.value.message
    bomb = _save(Image.new("1", (4000, 4000)), "PNG")
    with pytest.raises(VlmqError) as err:
        _load(bomb)
    assert err.value.code is ErrorCode.IMAGE_TOO_LARGE and "max_image_pixels" in err.value.message
    assert describe(ValueError(f"bad {io.BytesIO()!r} here")) == "ValueError: bad <object> here"
    assert describe(KeyError("k")) == "KeyError: 'k'" and len(describe(ValueError("x" * 900))) == 500


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (RedisConnectionError("reset"), True),
        (ConnectionRefusedError(), True),
        (KafkaConnectionError(), True),
        (UnknownTopicOrPartitionError(), True),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
        (NoPermissionError("NOPERM"), False),
        (MessageSizeTooLargeError(), False),
        (KeyError("x"), False),
    ],
)
def test_what_counts_as_an_outage(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


async def test_an_outage_past_its_budget_is_an_infrastructure_error() -> None:
    async def down() -> None:
        raise RedisConnectionError("connection refused")

    with pytest.raises(InfrastructureError, match="unavailable"):
        await through_outage(down, seconds=0.3)

    async def refused() -> None:
        raise ResponseError("WRONGTYPE")

    with pytest.raises(ResponseError):  # not an outage: the job's own failure, at once
        await through_outage(refused, seconds=30)
