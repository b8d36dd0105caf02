"""Outside JSON nested to any depth is a typed answer, never a RecursionError that escapes:
batch-file and manifest lines become bad lines (the batch fails validation instead of
staying `validating`), API bodies a 400."""

from __future__ import annotations

import json

import pytest

from vlmq.api.online import Failure, online_job
from vlmq.api.settings import ApiSettings
from vlmq.producer.bulk import BadLine, Preset, from_manifest, from_openai_batch
from vlmq.schemas import Job

DEEP = 100_000
NESTED = "[" * DEEP + "]" * DEEP


def _deepest_loadable() -> int:
    """The deepest array `json.loads` still reads from here: a line that passes the parser
    and is nested deeper than anything after it (re-encoding, validation) can take."""
    lo, hi = 1, 10_000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            json.loads("[" * mid + "]" * mid)
            lo = mid
        except RecursionError:
            hi = mid - 1
    return lo


def _openai_line(custom_id: str, **body: object) -> str:
    messages = [{"role": "user", "content": "hi"}]
    return json.dumps(
        {"custom_id": custom_id, "url": "/v1/chat/completions", "body": {"messages": messages, **body}}
    )


def test_a_deep_batch_line_is_a_bad_line_and_the_rest_still_parse() -> None:
    items = list(from_openai_batch([NESTED, '{"custom_id": ' + NESTED + "}", _openai_line("ok")], "b1"))
    bad = [i for i in items if isinstance(i, BadLine)]
    assert [(b.line, b.code) for b in bad] == [(1, "invalid_json_line"), (2, "invalid_json_line")]
    assert "nested too deeply" in bad[0].reason
    assert [i.metadata["custom_id"] for i in items if isinstance(i, Job)] == ["ok"]


def test_manifest_lines_around_the_parsers_depth_never_raise() -> None:
    """Near the limit a line may pass the parser and be too deep when the whole-job line
    is re-encoded one level deeper: a job or a bad line either way, never an exception."""
    top = _deepest_loadable()
    for depth in range(top - 30, top + 30):
        row = '{"key": "k", "messages": [{"role": "user", "content": "hi"}], "x": '
        line = row + "[" * depth + "]" * depth + "}"
        items = list(from_manifest([line], "b1", Preset()))
        assert len(items) == 1 and isinstance(items[0], Job | BadLine)


def test_a_deep_manifest_line_is_a_bad_line() -> None:
    items = list(from_manifest([NESTED, json.dumps({"key": "a", "image": "s3://b/a.jpg"})], "b1", Preset()))
    assert isinstance(items[0], BadLine) and items[0].code == "invalid_json_line"
    assert isinstance(items[1], Job)


@pytest.mark.parametrize(
    "body",
    [
        NESTED,
        '{"model": "m", "messages": ' + NESTED + "}",
        '{"model": "m", "x": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}",
    ],
    ids=["array", "messages", "object"],
)
def test_a_deep_chat_completion_body_is_a_400(body: str) -> None:
    with pytest.raises(Failure) as err:
        online_job(body.encode(), ApiSettings(models=["m"]))
    assert err.value.status == 400


def test_chat_completion_bodies_around_the_parsers_depth_are_a_job_or_a_400() -> None:
    top = _deepest_loadable()
    for depth in range(top - 30, top + 30):
        body = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": '
        body += "[" * depth + "]" * depth + "}"
        try:
            online_job(body.encode(), ApiSettings(models=["m"]))
        except Failure as exc:
            assert exc.status == 400
