"""Bulk backlogs: jobs from an S3 prefix, a JSONL manifest or an OpenAI Batch API input
file; results out as JSONL or in the OpenAI batch output format.

Job ids are deterministic (`batch_job_id(batch, key)`), so an interrupted submit is simply
run again: what Kafka acknowledged is skipped. Everything streams: sources are iterators,
submits go in chunks, exports write row by row, so millions of rows need little memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import msgspec

from vlmq.producer.builders import DEFAULT_CAPTION_PROMPT, batch_job_id, caption, moderate
from vlmq.schemas.codec import decode_job
from vlmq.schemas.errors import ErrorCode, VlmqError
from vlmq.schemas.job import Job, JobState, Result, Usage

OPENAI_URL = "/v1/chat/completions"
IMAGE_SUFFIXES = (
    *(".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"),
    *(".heic", ".heif", ".avif"),
)


class BadLine(msgspec.Struct, frozen=True):
    """A source line that became no job: where, and why."""

    line: int
    reason: str
    key: str | None = None
    code: str = "invalid_request"  # OpenAI-style


Item = Job | BadLine


class Preset(msgspec.Struct, frozen=True):
    """What to ask of every image of a prefix: a caption prompt, or moderation labels."""

    prompt: str = DEFAULT_CAPTION_PROMPT
    labels: list[str] | None = None
    max_tokens: int = 128

    def job(self, uri: str, job_id: str, batch_id: str, key: str) -> Job:
        meta = {"key": key}
        if self.labels:
            return moderate(uri, self.labels, job_id=job_id, batch_id=batch_id, metadata=meta)
        return caption(
            uri, self.prompt, job_id=job_id, max_tokens=self.max_tokens, batch_id=batch_id, metadata=meta
        )


def from_s3_prefix(
    s3: Any, uri: str, batch_id: str, preset: Preset, suffixes: tuple[str, ...] = IMAGE_SUFFIXES
) -> Iterator[Item]:
    """One job per object under `s3://bucket/prefix` whose name ends in one of `suffixes`."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.lower().endswith(suffixes):
                yield preset.job(f"s3://{bucket}/{key}", batch_job_id(batch_id, key), batch_id, key)


def from_manifest(lines: Iterable[str], batch_id: str, preset: Preset) -> Iterator[Item]:
    """JSONL: `{"key": ..., "image": uri}` (the preset's prompt, or the line's `prompt` and
    `labels`), or a whole job `{"key": ..., "messages": [...], ...}` in vlmq's schema."""
    return _parse(lines, "key", lambda row, key: _manifest_job(row, key, batch_id, preset))


def _manifest_job(row: dict[str, Any], key: str, batch_id: str, preset: Preset) -> Job:
    job_id = batch_job_id(batch_id, key)
    if "messages" in row:
        raw = {
            **row,
            "job_id": job_id,
            "batch_id": batch_id,
            "metadata": {**row.get("metadata", {}), "key": key},
        }
        return _validated(json.dumps(raw).encode(), key)
    if not isinstance(row.get("image"), str):
        raise _Bad("needs `image` (a URI) or `messages`", key)
    line_preset = msgspec.structs.replace(
        preset, prompt=row.get("prompt", preset.prompt), labels=row.get("labels", preset.labels)
    )
    return _validated(msgspec.json.encode(line_preset.job(row["image"], job_id, batch_id, key)), key)


def from_openai_batch(lines: Iterable[str], batch_id: str, *, allow_https: bool = True) -> Iterator[Item]:
    """OpenAI Batch API input: `{"custom_id", "method": "POST", "url": "/v1/chat/completions",
    "body": {"model", "messages", "max_tokens", ...}}` per line. Image parts are
    `{"type": "image_url", "image_url": {"url": ...}}` with s3://, data: and https:// (unless
    not `allow_https`; the worker checks every URL: see worker/web.py); videos likewise as
    vLLM's `{"type": "video_url", "video_url": {"url": ...}}`."""
    reader = OpenAIReader(batch_id, allow_https=allow_https)
    for n, line in enumerate(lines, 1):
        if item := reader.line(n, line):
            yield item


class OpenAIReader:
    """OpenAI Batch API input one line at a time (the API server reads files from S3 in
    pieces); it remembers the custom ids it has seen, so a duplicate is a bad line."""

    def __init__(self, batch_id: str, *, allow_https: bool = True) -> None:
        self.batch_id, self.allow_https = batch_id, allow_https
        self.seen: set[str] = set()

    def line(self, n: int, text: str | bytes) -> Item | None:
        """Line `n` as a job or a BadLine; None for a blank line."""
        return _parse_line(
            n,
            text,
            "custom_id",
            self.seen,
            lambda row, key: _openai_job(row, key, self.batch_id, self.allow_https),
        )


def _parse(
    lines: Iterable[str], key_field: str, build: Callable[[dict[str, Any], str], Job]
) -> Iterator[Item]:
    """JSONL lines -> jobs, or BadLine(line number, reason); keys must be unique."""
    seen: set[str] = set()
    for n, line in enumerate(lines, 1):
        if item := _parse_line(n, line, key_field, seen, build):
            yield item


def _parse_line(
    n: int, line: str | bytes, key_field: str, seen: set[str], build: Callable[[dict[str, Any], str], Job]
) -> Item | None:
    if not line.strip():
        return None
    try:
        row = json.loads(line)
        return build(row, _key(row, key_field, seen))
    except _Bad as exc:
        return BadLine(n, str(exc), exc.key, exc.code)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        return BadLine(n, f"not JSON: {exc}", code="invalid_json_line")
    except RecursionError:  # parsing, or re-encoding a line just under the parser's depth
        return BadLine(n, "not JSON this server reads: nested too deeply", code="invalid_json_line")


class _Bad(ValueError):
    def __init__(self, reason: str, key: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(reason)
        self.key = key
        self.code = code


def _key(row: Any, field: str, seen: set[str]) -> str:
    if not isinstance(row, dict):
        raise _Bad("a line must be a JSON object")
    key = row.get(field)
    if not isinstance(key, str) or not key:
        raise _Bad(f"`{field}` is missing or not a string", code="missing_required_parameter")
    if len(key) > 512:
        raise _Bad(f"`{field}` is longer than 512 characters")
    if key in seen:
        raise _Bad(f"duplicate {field} {_shown(key)}", key, "duplicate_custom_id")
    seen.add(key)
    return key


def _openai_job(row: dict[str, Any], key: str, batch_id: str, allow_https: bool) -> Job:
    if row.get("method", "POST") != "POST":
        raise _Bad(f"method must be POST, not {_shown(row.get('method'))}", key, "invalid_method")
    if row.get("url") != OPENAI_URL:
        raise _Bad(f"url must be {OPENAI_URL}, not {_shown(row.get('url'))}", key, "invalid_url")
    body = row.get("body")
    if not isinstance(body, dict):
        raise _Bad("`body` is missing or not an object", key)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Bad("body.messages is missing or empty", key)
    msgs = [_openai_message(m, i, key, allow_https) for i, m in enumerate(messages)]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
    sampling = {k: body[k] for k in ("temperature", "top_p", "seed", "stop") if k in body}
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    if body.get("stream"):
        raise _Bad("stream is not supported here", key, "unsupported_parameter")
    if (param := unsupported_parameter(body)) is not None:
        raise _Bad(f"{param} is not supported here", key, "unsupported_parameter")
    if body.get("n", 1) != 1:
        raise _Bad("n must be 1", key, "unsupported_parameter")
    raw = {
        "job_id": batch_job_id(batch_id, key),
        "batch_id": batch_id,
        "messages": msgs,
        "model": body.get("model"),
        "sampling": {"max_tokens": max_tokens, **sampling},
        "response_format": _openai_format(body.get("response_format"), key),
        "metadata": {"custom_id": key},
        **_openai_cache(body.get("metadata"), key),
    }
    return _validated(msgspec.json.encode(raw), key)


# Body fields a chat completion runs with (stream: the online route's; a batch line refuses it).
_RUNS = frozenset(
    {
        *("model", "messages", "max_tokens", "max_completion_tokens", "n", "response_format"),
        *("temperature", "top_p", "seed", "stop", "stream", "stream_options"),
    }
)
# Fields that change nothing a response says (who asked; OpenAI's own storage and tiers).
_INERT = frozenset(("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"))
# Fields accepted only at a value that asks for nothing (clients send these defaults).
_NEUTRAL: dict[str, Any] = {
    "logprobs": False,
    "top_logprobs": 0,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": {},
    "tools": [],
    "tool_choice": "none",
    "functions": [],
    "function_call": "none",
    "modalities": ["text"],
}


def unsupported_parameter(body: dict[str, Any]) -> str | None:
    """The first body field vlmq would not honour (tools, logprobs, audio...): a request
    that asks for one is refused by name, never run without it."""
    for name, value in body.items():
        if name in _RUNS or name in _INERT or name == "parallel_tool_calls":
            continue
        if name in _NEUTRAL and (value is None or value == _NEUTRAL[name]):
            continue
        return str(name)
    return None


def _openai_cache(metadata: Any, key: str) -> dict[str, str]:
    """The request's `metadata.vlmq_cache` (use, refresh, off) as the job's `cache`; the
    rest of OpenAI's metadata is not the job's (its tenant is the API key's)."""
    mode = metadata.get("vlmq_cache") if isinstance(metadata, dict) else None
    if mode is None:
        return {}
    if mode not in ("use", "refresh", "off"):
        raise _Bad(f"metadata.vlmq_cache must be use, refresh or off, not {_shown(mode)}", key)
    return {"cache": mode}


def _openai_message(m: Any, i: int, key: str, allow_https: bool) -> dict[str, Any]:
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
        raise _Bad(f"body.messages[{i}] needs role system, user or assistant", key)
    content = m.get("content")
    if isinstance(content, str):
        return {"role": m["role"], "content": content}
    if not isinstance(content, list) or not content:
        raise _Bad(f"body.messages[{i}].content must be a string or a non-empty list", key)
    return {"role": m["role"], "content": [_openai_part(p, i, key, allow_https) for p in content]}


def _openai_part(p: Any, i: int, key: str, allow_https: bool) -> dict[str, Any]:
    kind = p.get("type") if isinstance(p, dict) else None
    if kind == "text" and isinstance(p.get("text"), str):
        return {"type": "text", "text": p["text"]}
    if kind not in ("image_url", "video_url"):  # video_url: vLLM's extension of the format
        raise _Bad(
            f"body.messages[{i}]: unsupported content part {_shown(kind)}", key, "unsupported_parameter"
        )
    url = (p.get(kind) or {}).get("url") if isinstance(p.get(kind), dict) else None
    if not isinstance(url, str):
        raise _Bad(f"body.messages[{i}]: {kind}.url is missing", key)
    what = kind.removesuffix("_url")  # image, video
    allowed = ("s3://", "data:") + (("https://",) if allow_https else ())
    if not url.startswith(allowed):
        raise _Bad(
            f"body.messages[{i}]: {what} URL scheme not allowed: {_shown(url[:40])}"
            f" (use {', '.join(allowed)})",
            key,
            "invalid_image_url",
        )
    return {"type": what, "uri": url}


def _openai_format(fmt: Any, key: str) -> dict[str, Any] | None:
    if fmt is None or fmt == {"type": "text"}:
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict):
            return {"type": "json_schema", "schema": schema}
    raise _Bad(f"response_format not supported: {_shown(fmt)}", key, "unsupported_parameter")


def _shown(value: Any) -> str:
    """A value from a user's line, for a message: JSON, never a Python repr."""
    return json.dumps(value, default=str)[:80]


def _validated(raw: bytes, key: str) -> Job:
    try:
        return decode_job(raw)
    except VlmqError as exc:
        raise _Bad(f"invalid job: {exc.message}", key) from None


# -- export -------------------------------------------------------------------------------


async def export(
    results: AsyncIterator[Result], out: IO[bytes], *, openai: bool = False, errors: IO[bytes] | None = None
) -> tuple[int, int]:
    """Stream a batch's results to `out` (and failures to `errors` in OpenAI form).
    Returns (rows written to out, rows written to errors)."""
    enc = msgspec.json.Encoder()
    n_out = n_err = 0
    async for r in results:
        if not openai:
            out.write(enc.encode(r) + b"\n")
            n_out += 1
        elif r.state is JobState.SUCCEEDED or errors is None:
            out.write(enc.encode(openai_output(r)) + b"\n")
            n_out += 1
        else:
            errors.write(enc.encode(openai_output(r)) + b"\n")
            n_err += 1
    return n_out, n_err


# HTTP status and OpenAI error type per failure code; others are the server's (500).
_CLIENT_ERRORS = {
    ErrorCode.UNKNOWN_MODEL: (404, "invalid_request_error", "model_not_found"),
    ErrorCode.PROMPT_TOO_LONG: (400, "invalid_request_error", "context_length_exceeded"),
}
_SERVER_CODES = {ErrorCode.ENGINE_ERROR, ErrorCode.TIMEOUT, ErrorCode.INTERNAL, ErrorCode.POISON}
UNFINISHED = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed: the batch was cancelled.",
}
_FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter", "function_call")


def openai_output(r: Result, custom_id: str | None = None) -> dict[str, Any]:
    """One line of the OpenAI Batch API output (or error) file for a result: a success's
    body is a ChatCompletion; a failed request has its HTTP status and an OpenAI error
    body; a cancelled or expired one has `error` (batch_cancelled, batch_expired).
    `custom_id`: the request's, when the caller knows it (else the job's metadata says)."""
    custom_id = custom_id or r.metadata.get("custom_id", r.metadata.get("key", r.job_id))
    if r.state is JobState.SUCCEEDED:
        response: dict[str, Any] = {"status_code": 200, "request_id": r.job_id, "body": chat_completion(r)}
        if r.cached:  # answered by the result cache: `usage` is the answer's, as it was run
            response["vlmq_cache"] = {"cached": True, "age_s": r.cache_age_s, "source": r.cache_source}
        return openai_line(r.job_id, custom_id, response=response)
    if r.state is JobState.FAILED and r.error is not None:
        status, kind, code = http_error(r.error.code)
        body = {"error": {"message": public(r.error.message), "type": kind, "param": None, "code": code}}
        return openai_line(
            r.job_id, custom_id, response={"status_code": status, "request_id": r.job_id, "body": body}
        )
    code = "batch_expired" if r.state is JobState.EXPIRED else "batch_cancelled"
    return openai_line(r.job_id, custom_id, error={"code": code, "message": UNFINISHED[code]})


def openai_line(
    job_id: str,
    custom_id: str,
    *,
    response: dict[str, Any] | None = None,
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {"id": f"batch_req_{job_id}", "custom_id": custom_id, "response": response, "error": error}


def http_error(code: ErrorCode) -> tuple[int, str, str]:
    """(HTTP status, OpenAI error type, code) for a job's failure code."""
    if code in _CLIENT_ERRORS:
        return _CLIENT_ERRORS[code]
    if code in _SERVER_CODES:
        return 500, "server_error", code.value
    return 400, "invalid_request_error", code.value


def public(message: str) -> str:
    """A job's error message for someone outside: no object reprs, no traceback."""
    message = message.split("Traceback (most recent", maxsplit=1)[0]
    message = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<object>", message)
    return message.strip()[:1000]


def chat_completion(r: Result) -> dict[str, Any]:
    """A succeeded job as an OpenAI ChatCompletion object."""
    usage = r.usage or Usage()
    finish = r.finish_reason if r.finish_reason in _FINISH_REASONS else "stop"
    return {
        "id": f"chatcmpl-{r.job_id}",
        "object": "chat.completion",
        "created": int(r.timings.finished_at if r.timings and r.timings.finished_at else 0),
        "model": r.model or "",
        "choices": [
            {
                "index": 0,
                "finish_reason": finish,
                "message": {"role": "assistant", "content": r.text, "refusal": None},
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        },
        "system_fingerprint": None,
    }


def read_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        yield from f
