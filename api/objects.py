"""The OpenAI objects this API speaks, field for field (checked against the `openai` SDK's
own types in the tests): File, Batch, lists, errors, and the request bodies it takes."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
TERMINAL = ("failed", "completed", "expired", "cancelled")
ObjectId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}(?!\n)$")]
ENDPOINTS = ("/v1/chat/completions",)
WINDOW = re.compile(r"^24h$")


class FileObject(Struct, kw_only=True):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileDeleted(Struct):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class RequestCounts(Struct):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(Struct):
    code: str
    message: str
    line: int | None = None
    param: str | None = None


class Errors(Struct):
    data: list[BatchError]
    object: Literal["list"] = "list"


class InputTokensDetails(Struct, frozen=True):
    cached_tokens: int = 0


class OutputTokensDetails(Struct, frozen=True):
    reasoning_tokens: int = 0


class BatchUsage(Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()


class Batch(Struct, kw_only=True):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: Errors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = msgspec.field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: BatchUsage | None = None


class Page(Struct):
    data: list[Any]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


class ExpiresAfter(Struct):
    anchor: Literal["created_at"]
    seconds: Annotated[int, Meta(ge=3600, le=2_592_000)]


class BatchCreate(Struct):
    """POST /v1/batches. `metadata`: at most 16 pairs, keys 64 and values 512 characters."""

    input_file_id: ObjectId
    endpoint: str
    completion_window: str
    metadata: (
        Annotated[
            dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=512)]],
            Meta(max_length=16),
        ]
        | None
    ) = None
    output_expires_after: ExpiresAfter | None = None


class ApiError(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(Struct):
    error: ApiError
