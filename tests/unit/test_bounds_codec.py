"""Kafka message bodies as producers in the wild send them: content types with parameters
and in any case, JSON after a BOM or whitespace; and bodies nested to any depth end as a
typed `bad_message`, never a RecursionError that escapes."""

from __future__ import annotations

import msgspec
import pytest

from vlmq.schemas import ErrorCode, Job, Message, VlmqError, decode_job, decode_result_msg
from vlmq.schemas.codec import encode_job, invalid_job_id, media_type, peek_job_id
from vlmq.schemas.job import JobState, Result

JOB = Job(job_id="j1", messages=[Message(role="user", content="hi")])
AS_JSON = msgspec.json.encode(JOB)
AS_MSGPACK = msgspec.msgpack.encode(JOB)
DEEP = 100_000


@pytest.mark.parametrize(
    "header",
    [
        b"application/json; charset=utf-8",
        b"application/json;charset=UTF-8",
        b"Application/JSON",
        b" application/json ",
        b'application/json; charset="utf-8"',
    ],
)
def test_json_content_types_are_media_types(header: bytes) -> None:
    assert decode_job(AS_JSON, header) == JOB


@pytest.mark.parametrize(
    "header",
    [b"application/msgpack", b"APPLICATION/MSGPACK", b"application/x-msgpack", b"application/vnd.msgpack"],
)
def test_msgpack_content_types_are_media_types(header: bytes) -> None:
    assert decode_job(AS_MSGPACK, header) == JOB


def test_json_in_another_charset_is_a_bad_message() -> None:
    with pytest.raises(VlmqError) as err:
        decode_job(AS_JSON, b"application/json; charset=latin-1")
    assert err.value.code is ErrorCode.BAD_MESSAGE
    assert "charset" in err.value.message


def test_media_type_parameters() -> None:
    assert media_type(b'Application/Json ; Charset="UTF-8"; x=1') == (
        b"application/json",
        {b"charset": b"UTF-8", b"x": b"1"},
    )


@pytest.mark.parametrize(
    "value",
    [b"  \n\t" + AS_JSON, b"\xef\xbb\xbf" + AS_JSON, b"\xef\xbb\xbf\r\n " + AS_JSON],
    ids=["whitespace", "bom", "bom-whitespace"],
)
def test_unheaded_json_after_whitespace_or_bom(value: bytes) -> None:
    assert decode_job(value) == JOB
    assert decode_job(value, b"application/json") == JOB


def test_result_messages_take_media_types_and_a_bom() -> None:
    result = Result(job_id="j1", state=JobState.SUCCEEDED, text="a cat")
    value = b"\xef\xbb\xbf" + msgspec.json.encode(result)
    assert decode_result_msg(value, b"application/json; charset=utf-8") == result


def test_encoded_jobs_still_carry_the_exact_header() -> None:
    assert encode_job(JOB)[1] == [("content-type", b"application/msgpack")]


@pytest.mark.parametrize(
    ("value", "header"),
    [
        (b"[" * DEEP + b"]" * DEEP, b"application/json"),
        (b'{"job_id":"j1","messages":' + b"[" * DEEP + b"]" * DEEP + b"}", None),
        (b"{" + b'"a":{' * DEEP + b"}" * (DEEP + 1), None),
        (b"\x91" * DEEP + b"\xc0", b"application/msgpack"),
        (b"\x81\xa1a" * DEEP + b"\xc0", None),
    ],
    ids=["json-array", "json-field", "json-object", "msgpack-array", "msgpack-map"],
)
def test_any_nesting_is_a_bad_message(value: bytes, header: bytes | None) -> None:
    with pytest.raises(VlmqError) as err:
        decode_job(value, header)
    assert err.value.code in (ErrorCode.BAD_MESSAGE, ErrorCode.INVALID_JOB)
    # The dead letter's helpers read the same body: they must not raise either.
    assert peek_job_id(value, None) is None
    assert invalid_job_id(value, None) is None
