"""Codecs. Kafka: msgpack with a `content-type` header (JSON accepted). Redis: JSON."""

from __future__ import annotations

import hashlib
import re
from typing import Any, TypeVar

import msgspec

from vlmq.schemas.errors import ErrorCode, VlmqError
from vlmq.schemas.job import JOB_ID_PATTERN, VERSION, DeadLetter, Job, Result

MSGPACK = b"application/msgpack"
JSON = b"application/json"
CONTENT_TYPE = "content-type"
# Other names producers use for msgpack (the IANA one is newer than most libraries).
_MSGPACK_ALIASES = {MSGPACK, b"application/x-msgpack", b"application/vnd.msgpack"}
_BOM = b"\xef\xbb\xbf"
_JSON_SPACE = b" \t\r\n"

Headers = list[tuple[str, bytes]]
T = TypeVar("T")

_mp_enc = msgspec.msgpack.Encoder()
_js_enc = msgspec.json.Encoder()
_job_mp = msgspec.msgpack.Decoder(Job)
_job_js = msgspec.json.Decoder(Job)
_result_js = msgspec.json.Decoder(Result)
_result_mp = msgspec.msgpack.Decoder(Result)
_dead_mp = msgspec.msgpack.Decoder(DeadLetter)
_JOB_ID = re.compile(JOB_ID_PATTERN)
MAX_ID_CHARS = 160


class _Envelope(msgspec.Struct):
    v: int = VERSION


def encode_job(job: Job, *, content_type: bytes = MSGPACK) -> tuple[bytes, Headers]:
    """The Kafka value and headers for a job (key it by `job.job_id`)."""
    enc = _mp_enc if content_type == MSGPACK else _js_enc
    return enc.encode(job), [(CONTENT_TYPE, content_type)]


def content_type_of(headers: Any) -> bytes | None:
    for k, v in headers or ():
        if k.lower() == CONTENT_TYPE:
            return bytes(v)
    return None


def media_type(content_type: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """A content-type header as a media type (RFC 9110): its `type/subtype`, lowercased,
    and its parameters (names lowercased, values unquoted)."""
    kind, *params = content_type.split(b";")
    out: dict[bytes, bytes] = {}
    for param in params:
        name, _, val = param.partition(b"=")
        out[name.strip().lower()] = val.strip().strip(b'"')
    return kind.strip().lower(), out


def _is_json(value: bytes, content_type: bytes | None) -> bool:
    """Whether `value` is JSON by its header; without one, by its first byte past a UTF-8
    BOM and JSON whitespace (a msgpack Job is a map: it never starts with either)."""
    if content_type is None:
        return value.removeprefix(_BOM).lstrip(_JSON_SPACE)[:1] == b"{"
    kind, params = media_type(content_type)
    if kind == JSON:
        charset = params.get(b"charset", b"utf-8").lower()
        if charset not in (b"utf-8", b"utf8"):  # RFC 8259: JSON between systems is UTF-8
            raise VlmqError(ErrorCode.BAD_MESSAGE, f"unsupported JSON charset {charset.decode('latin-1')!r}")
        return True
    if kind in _MSGPACK_ALIASES:
        return False
    raise VlmqError(ErrorCode.BAD_MESSAGE, f"unsupported content-type {content_type!r}")


def decode_job(value: bytes | None, content_type: bytes | None = None) -> Job:
    """Decode a Kafka value into a Job, or raise VlmqError with a code and the field's path.

    `content_type` is a media type (`application/json; charset=utf-8`, any case). Without
    a header, a value starting with `{` (after a BOM or whitespace) is JSON, else msgpack.
    """
    if not value:
        raise VlmqError(ErrorCode.BAD_MESSAGE, "empty message value")
    is_json = _is_json(value, content_type)
    if is_json:
        value = value.removeprefix(_BOM)  # msgspec takes whitespace, not a BOM
    try:
        return (_job_js if is_json else _job_mp).decode(value)
    except msgspec.ValidationError as exc:
        _raise_version(value, is_json)
        raise VlmqError(ErrorCode.INVALID_JOB, str(exc)) from None
    except (msgspec.DecodeError, ValueError) as exc:  # ValueError: e.g. invalid UTF-8 in a str
        kind = "JSON" if is_json else "msgpack"
        raise VlmqError(ErrorCode.BAD_MESSAGE, f"not valid {kind}: {exc}") from None
    except RecursionError:
        raise VlmqError(ErrorCode.BAD_MESSAGE, "nested too deeply to decode") from None
    except Exception as exc:  # whatever a decoder may raise, it is this message's fault
        raise VlmqError(ErrorCode.BAD_MESSAGE, f"cannot decode: {type(exc).__name__}") from None


def _raise_version(value: bytes, is_json: bool) -> None:
    try:
        env = msgspec.convert((msgspec.json.decode if is_json else msgspec.msgpack.decode)(value), _Envelope)
    except (ValueError, RecursionError):  # msgspec's errors and UnicodeDecodeError derive from ValueError
        return
    if env.v > VERSION:
        raise VlmqError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"job schema v{env.v} is newer than this worker (reads <= v{VERSION}): upgrade it",
        )


def peek_job_id(value: bytes | None, key: bytes | None) -> str | None:
    """Best effort job id of an undecodable message, for its dead letter only: the Kafka
    key, else a `job_id` field."""
    if key:
        return key.decode("utf-8", "replace")[:MAX_ID_CHARS]
    body_id = _body_job_id(value)
    return body_id[:MAX_ID_CHARS] if body_id is not None else None


def is_job_id(text: str) -> bool:
    """Whether `text` is a valid job id (JOB_ID_PATTERN): the one check for ids that do not
    come in a decoded Job (a Kafka body that failed to decode, a cancel request)."""
    return _JOB_ID.match(text) is not None


def invalid_job_id(value: bytes | None, key: bytes | None) -> str | None:
    """The job an invalid message speaks for, when that is certain: the body's `job_id` is
    a valid id and the Kafka key, if any, is the same. Otherwise None, and the message must
    not touch any job's state (anyone could have keyed garbage with another's job id)."""
    body_id = _body_job_id(value)
    if body_id is None or not is_job_id(body_id):
        return None
    if key is not None and key != body_id.encode():
        return None
    return body_id


def _body_job_id(value: bytes | None) -> str | None:
    for dec in (msgspec.msgpack.decode, msgspec.json.decode):
        try:
            obj = dec((value or b"").removeprefix(_BOM))
        except (ValueError, RecursionError):  # msgspec.DecodeError is a ValueError
            continue
        if isinstance(obj, dict) and isinstance(obj.get("job_id"), str):
            return str(obj["job_id"])
    return None


def encode_result(result: Result) -> bytes:
    """Redis record form (JSON, readable from any language)."""
    return _js_enc.encode(result)


def decode_result(data: bytes | str) -> Result:
    return _result_js.decode(data)


def encode_result_msg(result: Result) -> tuple[bytes, Headers]:
    """The `result_topic` value: msgpack, like jobs."""
    return _mp_enc.encode(result), [(CONTENT_TYPE, MSGPACK)]


def decode_result_msg(value: bytes, content_type: bytes | None = None) -> Result:
    if content_type is not None and media_type(content_type)[0] == JSON:
        return _result_js.decode(value.removeprefix(_BOM))
    return _result_mp.decode(value)


def encode_dead_letter(dead: DeadLetter) -> tuple[bytes, Headers]:
    return _mp_enc.encode(dead), [(CONTENT_TYPE, MSGPACK)]


def decode_dead_letter(value: bytes) -> DeadLetter:
    return _dead_mp.decode(value)


def to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj)


def message_digest(value: bytes | None, content_type: bytes | None) -> str:
    """The digest a submit record keeps of a job's message, hex: sha256 of
    `content-type:<the header's value>\n` then the Kafka value's exact bytes (the header
    too: the same bytes under another content type decode differently). A worker runs a
    message only if its digest is the recorded one, so whoever can write to the topic
    cannot run, replace or end another's job (wire.md)."""
    return hashlib.sha256(b"content-type:" + (content_type or b"") + b"\n" + (value or b"")).hexdigest()


def header_text(value: bytes | None) -> str | None:
    """A header's bytes as text that gives the same bytes back (latin-1): any byte kept."""
    return value.decode("latin-1") if value is not None else None
