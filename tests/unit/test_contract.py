"""The wire contract: round trips, golden bytes, compatibility, validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmq.schemas import (
    ChoiceFormat,
    DeadLetter,
    Error,
    ErrorCode,
    ImageRef,
    Job,
    JobState,
    JsonSchemaFormat,
    Message,
    RegexFormat,
    Result,
    Sampling,
    TextPart,
    Usage,
    VlmqError,
    decode_dead_letter,
    decode_job,
    decode_result,
    encode_dead_letter,
    encode_job,
    encode_result,
)
from vlmq.schemas.codec import JSON, MSGPACK, peek_job_id
from vlmq.schemas.export import render

ids = st.from_regex(r"[A-Za-z0-9._:\-]{1,40}", fullmatch=True)
texts = st.text(max_size=200)
uris = st.sampled_from(
    ["s3://b/k.jpg", "file:///tmp/x.png", "data:image/png;base64,AAAA", "https://example.com/a.jpg"]
)
images = st.builds(ImageRef, uri=uris, max_pixels=st.none() | st.integers(1000, 2_000_000))
parts = st.lists(st.one_of(st.builds(TextPart, texts), images), min_size=1, max_size=5)
messages = st.builds(Message, role=st.sampled_from(["system", "user", "assistant"]), content=parts | texts)
samplings = st.builds(
    Sampling,
    max_tokens=st.integers(1, 4096),
    temperature=st.floats(0, 2),
    top_p=st.floats(0.01, 1),
    top_k=st.none() | st.integers(1, 100),
    seed=st.none() | st.integers(0, 2**31),
    stop=st.lists(texts, max_size=3),
)
formats = (
    st.none()
    | st.builds(ChoiceFormat, st.lists(texts, min_size=1, max_size=5))
    | st.just(JsonSchemaFormat({"type": "object"}))
    | st.just(RegexFormat("[a-z]+"))
)
jobs = st.builds(
    Job,
    job_id=ids,
    messages=st.lists(messages, min_size=1, max_size=4),
    sampling=samplings,
    response_format=formats,
    priority=st.integers(-100, 100),
    batch_id=st.none() | ids,
    metadata=st.dictionaries(st.text(max_size=10), texts, max_size=3),
    deadline=st.none() | st.floats(0, 2e9),
)


@settings(max_examples=300, deadline=None)
@given(jobs, st.sampled_from([MSGPACK, JSON]))
def test_job_round_trips_through_both_codecs(job: Job, content_type: bytes) -> None:
    value, headers = encode_job(job, content_type=content_type)
    assert headers == [("content-type", content_type)]
    assert decode_job(value, content_type) == job
    assert decode_job(value, None) == job  # sniffed without the header


@settings(max_examples=100, deadline=None)
@given(
    st.builds(
        Result,
        job_id=ids,
        state=st.sampled_from(list(JobState)),
        text=st.none() | texts,
        usage=st.none() | st.builds(Usage, st.integers(0, 10**6), st.integers(0, 10**6)),
    )
)
def test_result_round_trips_as_json(result: Result) -> None:
    assert decode_result(encode_result(result)) == result


GOLDEN_JOB = Job(
    job_id="0190a000-0000-7000-8000-000000000001",
    messages=[Message("user", [ImageRef("s3://photos/cat.jpg"), TextPart("Describe it.")])],
    sampling=Sampling(max_tokens=64),
    response_format=ChoiceFormat(["safe", "unsafe"]),
    batch_id="b1",
)
GOLDEN_JSON = (
    b'{"job_id":"0190a000-0000-7000-8000-000000000001","messages":[{"role":"user","content":'
    b'[{"type":"image","uri":"s3://photos/cat.jpg"},{"type":"text","text":"Describe it."}]}],'
    b'"sampling":{"max_tokens":64},"response_format":{"type":"choice","choices":["safe","unsafe"]},'
    b'"batch_id":"b1"}'
)
GOLDEN_MSGPACK_HEX = (
    "85a66a6f625f6964d92430313930613030302d303030302d373030302d383030302d303030303030303030303031"
    "a86d6573736167657391a0"
)


def test_golden_bytes_change_only_on_purpose() -> None:
    """If this fails, the wire format changed: bump VERSION, update docs/wire.md, then here."""
    assert encode_job(GOLDEN_JOB, content_type=JSON)[0] == GOLDEN_JSON
    packed = encode_job(GOLDEN_JOB)[0]
    assert msgspec.msgpack.decode(packed) == json.loads(GOLDEN_JSON)
    assert packed.hex().startswith(GOLDEN_MSGPACK_HEX[:94])


def test_unknown_fields_are_ignored_everywhere() -> None:
    raw = json.loads(GOLDEN_JSON)
    raw["from_the_future"] = {"x": 1}
    raw["messages"][0]["tone"] = "warm"
    raw["messages"][0]["content"][0]["detail"] = "high"
    raw["sampling"]["min_p"] = 0.1
    assert decode_job(json.dumps(raw).encode()) == GOLDEN_JOB


def test_a_minimal_older_job_gets_defaults() -> None:
    job = decode_job(b'{"job_id":"a","messages":[{"role":"user","content":"hi"}]}')
    assert job.v == 1 and job.sampling == Sampling() and job.priority == 0
    assert job.messages[0].parts == [TextPart("hi")]


def _job(**over: object) -> bytes:
    base: dict[str, object] = {"job_id": "j1", "messages": [{"role": "user", "content": "hi"}]}
    base.update(over)
    return json.dumps(base).encode()


def _img(uri: str, **kw: object) -> list[dict[str, object]]:
    return [{"role": "user", "content": [{"type": "image", "uri": uri, **kw}]}]


@pytest.mark.parametrize(
    ("payload", "code", "names"),
    [
        (b"", ErrorCode.BAD_MESSAGE, "empty"),
        (b"\xc1\xc1", ErrorCode.BAD_MESSAGE, "msgpack"),
        (b"{not json", ErrorCode.BAD_MESSAGE, "JSON"),
        (b'["a", "list"]', ErrorCode.INVALID_JOB, "Expected `object`"),
        (_job(messages=[]), ErrorCode.INVALID_JOB, "$.messages"),
        (_job(job_id=None), ErrorCode.INVALID_JOB, "$.job_id"),
        (b'{"messages":[{"role":"user","content":"hi"}]}', ErrorCode.INVALID_JOB, "job_id"),
        (_job(job_id="has space"), ErrorCode.INVALID_JOB, "$.job_id"),
        (_job(sampling={"max_tokens": -1}), ErrorCode.INVALID_JOB, "$.sampling.max_tokens"),
        (_job(sampling={"max_tokens": "10"}), ErrorCode.INVALID_JOB, "$.sampling.max_tokens"),
        (_job(sampling={"temperature": 9}), ErrorCode.INVALID_JOB, "$.sampling.temperature"),
        (_job(sampling={"top_p": 0}), ErrorCode.INVALID_JOB, "$.sampling.top_p"),
        (_job(messages=[{"role": "robot", "content": "x"}]), ErrorCode.INVALID_JOB, "$.messages[0].role"),
        (_job(messages=[{"role": "user", "content": []}]), ErrorCode.INVALID_JOB, "$.messages[0].content"),
        (_job(messages=_img("ftp://x/y")), ErrorCode.INVALID_JOB, "unknown URI scheme 'ftp'"),
        (_job(messages=_img("gopher")), ErrorCode.INVALID_JOB, "$.messages[0].content[0]"),
        (_job(messages=_img("s3://b/k", max_pixels=0)), ErrorCode.INVALID_JOB, "max_pixels"),
        (_job(messages=_img("s3://b/k", sha256="xyz")), ErrorCode.INVALID_JOB, "sha256"),
        (
            _job(messages=[{"role": "user", "content": [{"type": "image", "uri": "s3://b/k"}] * 300}]),
            ErrorCode.INVALID_JOB,
            "too many images",
        ),
        (
            _job(messages=[{"role": "user", "content": "x" * 1_000_001}]),
            ErrorCode.INVALID_JOB,
            "$.messages[0].content",
        ),
        (
            _job(response_format={"type": "choice", "choices": []}),
            ErrorCode.INVALID_JOB,
            "$.response_format.choices",
        ),
        (_job(response_format={"type": "regex", "pattern": "("}), ErrorCode.INVALID_JOB, "invalid regex"),
        (_job(response_format={"type": "grammar"}), ErrorCode.INVALID_JOB, "$.response_format"),
        (_job(result_topic="bad topic!"), ErrorCode.INVALID_JOB, "$.result_topic"),
        (_job(v=2), ErrorCode.UNSUPPORTED_VERSION, "upgrade"),
        (_job(v=0), ErrorCode.INVALID_JOB, "$.v"),
    ],
)
def test_each_invalid_job_is_rejected_naming_the_field(payload: bytes, code: ErrorCode, names: str) -> None:
    with pytest.raises(VlmqError) as err:
        decode_job(payload)
    assert err.value.code is code
    assert names in err.value.message


def test_unsupported_content_type_is_a_bad_message() -> None:
    with pytest.raises(VlmqError) as err:
        decode_job(_job(), b"application/xml")
    assert err.value.code is ErrorCode.BAD_MESSAGE


def test_peek_job_id_of_undecodable_messages() -> None:
    assert peek_job_id(b"junk", b"key-1") == "key-1"
    assert peek_job_id(b'{"job_id":"x","messages":[]}', None) == "x"
    assert peek_job_id(b"\xc1", None) is None


def test_dead_letter_round_trip() -> None:
    dead = DeadLetter(Error(ErrorCode.IMAGE_CORRUPT, "truncated"), "t", 3, 42, b"\x00raw")
    assert decode_dead_letter(encode_dead_letter(dead)[0]) == dead


def test_committed_json_schema_is_current() -> None:
    """Run `vlmq schema export` after changing schemas/ (this fails until you do)."""
    folder = Path(__file__).parents[2] / "docs" / "schema"
    for name, text in render().items():
        assert (folder / name).read_text() == text, f"docs/schema/{name} is stale"


def test_sdk_and_cli_need_no_worker_dependencies() -> None:
    """The base install (producer SDK + CLI) imports without Pillow, torch, aiobotocore or
    aiohttp; `vlmq worker` without them says which extra to install."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('PIL', 'torch', 'aiobotocore', 'aiohttp', 'prometheus_client', 'vllm', 'lmdeploy'):\n"
        "    sys.modules[m] = None\n"
        "import vlmq.producer, vlmq.cli\n"
        "from vlmq.producer import Client, SyncClient, caption, moderate\n"
        "sys.argv = ['vlmq', 'worker']\n"
        "vlmq.cli.main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "pip install 'vlmq[worker]'" in proc.stderr
