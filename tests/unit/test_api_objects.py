"""The API's objects have exactly the OpenAI SDK's fields (no more, none missing), and a
full one validates as the SDK's own type."""

from __future__ import annotations

import msgspec
import pytest
from openai.types import Batch as SdkBatch
from openai.types import FileObject as SdkFile
from openai.types.chat import ChatCompletion
from pydantic import BaseModel

from vlmq.api.objects import Batch, BatchError, BatchUsage, Errors, FileObject, RequestCounts
from vlmq.producer.bulk import openai_output
from vlmq.schemas import ErrorCode, JobState
from vlmq.schemas.job import Error, Result, Timings, Usage


def full_batch() -> Batch:
    return Batch(
        id="batch_1",
        endpoint="/v1/chat/completions",
        errors=Errors([BatchError("invalid_url", "url must be ...", 3, None)]),
        input_file_id="file-1",
        completion_window="24h",
        status="completed",
        output_file_id="file-2",
        error_file_id="file-3",
        created_at=1,
        in_progress_at=2,
        expires_at=3,
        finalizing_at=4,
        completed_at=5,
        request_counts=RequestCounts(3, 2, 1),
        metadata={"a": "b"},
        model="m",
        usage=BatchUsage(1, 2, 3),
    )


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (full_batch(), SdkBatch),
        (
            FileObject(id="file-1", bytes=3, created_at=1, filename="a.jsonl", purpose="batch", expires_at=9),
            SdkFile,
        ),
    ],
)
def test_fields_are_the_sdks(ours: msgspec.Struct, theirs: type[BaseModel]) -> None:
    raw = msgspec.to_builtins(ours)
    assert set(raw) == set(theirs.model_fields)
    parsed = theirs.model_validate(raw)
    assert parsed.model_dump(mode="json", exclude_unset=False) == raw


def test_output_lines_validate_as_chat_completions_and_errors_have_no_repr() -> None:
    ok = Result(
        job_id="j1",
        state=JobState.SUCCEEDED,
        text="a cat",
        finish_reason="length",
        usage=Usage(10, 5),
        timings=Timings(finished_at=1.5),
        model="m",
        metadata={"custom_id": "c1"},
    )
    line = openai_output(ok)
    assert line["error"] is None and line["response"]["status_code"] == 200
    body = ChatCompletion.model_validate(line["response"]["body"])
    assert body.choices[0].logprobs is None and body.usage and body.usage.total_tokens == 15
    bad = Result(
        job_id="j2",
        state=JobState.FAILED,
        error=Error(
            ErrorCode.INTERNAL,
            "OSError: <_io.BytesIO object at 0x7f00aa> broke\\nTraceback (most recent call last): x",
        ),
        metadata={"custom_id": "c2"},
    )
    failed = openai_output(bad)["response"]
    assert failed["status_code"] == 500 and failed["body"]["error"]["type"] == "server_error"
    assert (
        "0x" not in failed["body"]["error"]["message"]
        and "Traceback" not in failed["body"]["error"]["message"]
    )
    expired = openai_output(Result(job_id="j3", state=JobState.EXPIRED, metadata={"custom_id": "c3"}))
    assert expired["response"] is None and expired["error"]["code"] == "batch_expired"
