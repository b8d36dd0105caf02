"""What is echoed of outside input: URL credentials never, ids only when they match whole."""

from __future__ import annotations

import msgspec
import pytest

from vlmq.schemas import ErrorCode
from vlmq.schemas.codec import decode_job, is_job_id, message_digest
from vlmq.schemas.errors import VlmqError, redact
from vlmq.schemas.job import Error


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("https://alice:hunter2@cdn.example.com/a.png", "hunter2"),
        ("fetch failed: HTTP://bob:pw%40x@h:8080/x", "pw%40x"),
        ("s3://AKIA:topsecret@bucket/key", "topsecret"),
        ("x https://h/a.png?X-Amz-Signature=abc123&X-Amz-Date=1 y", "abc123"),
        ("https://h/a?sig=zz9&b=1", "zz9"),
        ("https://h/a?access_token=tok1", "tok1"),
        ("two: https://u:one@a/ and redis://:two@b/0", "one"),
    ],
)
def test_credentials_in_urls_are_redacted(text: str, secret: str) -> None:
    assert secret not in redact(text)
    assert secret not in Error(ErrorCode.INTERNAL, text).message  # every Error, however built
    decoded = msgspec.json.decode(msgspec.json.encode({"code": "internal", "message": text}), type=Error)
    assert secret not in decoded.message


def test_redaction_keeps_what_is_not_a_secret() -> None:
    text = "s3://bucket/key.jpg and https://h/x.png?w=100 and http://x/@y"
    assert redact(text) == text


@pytest.mark.parametrize("bad", ["a\n", "job\n", "x" * 161, "", "a b", "a/b", "é"])
def test_ids_match_their_pattern_in_full(bad: str) -> None:
    assert not is_job_id(bad)
    body = msgspec.json.encode({"job_id": bad, "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(VlmqError) as err:
        decode_job(body, b"application/json")
    assert err.value.code is ErrorCode.INVALID_JOB


def test_the_digest_is_of_the_exact_bytes() -> None:
    assert message_digest(b"{}", None) != message_digest(b"{} ", None)
    assert message_digest(b"{}", b"application/json") != message_digest(b"{}", b"application/msgpack")
    assert len(message_digest(None, None)) == 64 and message_digest(b"", b"") == message_digest(None, None)
