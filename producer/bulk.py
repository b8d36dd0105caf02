"""Bulk backlogs: jobs from an S3 prefix, a JSONL manifest or an OpenAI Batch API input
file; results out as JSONL or in the OpenAI batch output format.

Job ids are deterministic (`batch_job_id(batch, key)`), so an interrupted submit is simply
run again: what Kafka acknowledged is skipped. Everything streams: sources are iterators,
submits go in chunks, exports write row by row, so millions of rows need little memory.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import msgspec

from vlmq.producer.builders import DEFAULT_CAPTION_PROMPT, batch_job_id, caption, moderate
from vlmq.schemas.codec import decode_job
from vlmq.schemas.errors import VlmqError
from vlmq.schemas.job import (
    Job,
    JobState,
    Result,
)

OPENAI_URL = "/v1/chat/completions"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class BadLine(msgspec.Struct, frozen=True):
    """A source line that became no job: where, and why."""

    line: int
    reason: str
    key: str | None = None


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


def from_openai_batch(lines: Iterable[str], batch_id: str, *, allow_https: bool = False) -> Iterator[Item]:
    """OpenAI Batch API input: `{"custom_id", "method": "POST", "url": "/v1/chat/completions",
    "body": {"model", "messages", "max_tokens", ...}}` per line. Image parts are
    `{"type": "image_url", "image_url": {"url": ...}}` with s3://, data: (and https:// when
    `allow_https`)."""
    return _parse(lines, "custom_id", lambda row, key: _openai_job(row, key, batch_id, allow_https))


def _parse(
    lines: Iterable[str], key_field: str, build: Callable[[dict[str, Any], str], Job]
) -> Iterator[Item]:
    """JSONL lines -> jobs, or BadLine(line number, reason); keys must be unique."""
    seen: set[str] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            yield build(row, _key(row, key_field, seen))
        except _Bad as exc:
            yield BadLine(n, str(exc), exc.key)
        except ValueError as exc:
            yield BadLine(n, f"not JSON: {exc}")


class _Bad(ValueError):
    def __init__(self, reason: str, key: str | None = None) -> None:
        super().__init__(reason)
        self.key = key


def _key(row: Any, field: str, seen: set[str]) -> str:
    if not isinstance(row, dict):
        raise _Bad("a line must be a JSON object")
    key = row.get(field)
    if not isinstance(key, str) or not key:
        raise _Bad(f"`{field}` is missing or not a string")
    if key in seen:
        raise _Bad(f"duplicate {field} {key!r}", key)
    seen.add(key)
    return key


def _openai_job(row: dict[str, Any], key: str, batch_id: str, allow_https: bool) -> Job:
    if row.get("method", "POST") != "POST":
        raise _Bad(f"method must be POST, not {row.get('method')!r}", key)
    if row.get("url") != OPENAI_URL:
        raise _Bad(f"url must be {OPENAI_URL}, not {row.get('url')!r}", key)
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
    raw = {
        "job_id": batch_job_id(batch_id, key),
        "batch_id": batch_id,
        "messages": msgs,
        "model": body.get("model"),
        "sampling": {"max_tokens": max_tokens, **sampling},
        "response_format": _openai_format(body.get("response_format"), key),
        "metadata": {"custom_id": key},
    }
    return _validated(msgspec.json.encode(raw), key)


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
    if kind != "image_url":
        raise _Bad(f"body.messages[{i}]: unsupported content part {kind!r}", key)
    url = (p.get("image_url") or {}).get("url") if isinstance(p.get("image_url"), dict) else None
    if not isinstance(url, str):
        raise _Bad(f"body.messages[{i}]: image_url.url is missing", key)
    allowed = ("s3://", "data:") + (("https://",) if allow_https else ())
    if not url.startswith(allowed):
        raise _Bad(
            f"body.messages[{i}]: image URL scheme not allowed: {url[:40]!r} (use {', '.join(allowed)})", key
        )
    return {"type": "image", "uri": url}


def _openai_format(fmt: Any, key: str) -> dict[str, Any] | None:
    if fmt is None or fmt == {"type": "text"}:
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict):
            return {"type": "json_schema", "schema": schema}
    raise _Bad(f"response_format not supported: {json.dumps(fmt)[:80]}", key)


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


def openai_output(r: Result) -> dict[str, Any]:
    """One line of the OpenAI Batch API output (or error) file for a result."""
    custom_id = r.metadata.get("custom_id", r.metadata.get("key", r.job_id))
    line: dict[str, Any] = {"id": f"vlmq_{r.job_id}", "custom_id": custom_id}
    if r.state is not JobState.SUCCEEDED:
        code = r.error.code.value if r.error else r.state.value
        msg = r.error.message if r.error else f"job {r.state.value}"
        return line | {"response": None, "error": {"code": code, "message": msg}}
    usage = r.usage
    body = {
        "id": f"chatcmpl-{r.job_id}",
        "object": "chat.completion",
        "created": int(r.timings.finished_at if r.timings and r.timings.finished_at else 0),
        "model": r.model,
        "choices": [
            {
                "index": 0,
                "finish_reason": r.finish_reason or "stop",
                "message": {"role": "assistant", "content": r.text},
            }
        ],
        "usage": {
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
            "total_tokens": (usage.prompt_tokens + usage.completion_tokens) if usage else 0,
        },
    }
    return line | {"response": {"status_code": 200, "request_id": r.job_id, "body": body}, "error": None}


def read_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        yield from f
