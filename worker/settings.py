"""One typed settings object for the worker: defaults here, `VLMQ_*` env vars, then flags."""

from __future__ import annotations

import os
import socket
from typing import Any, Literal

import msgspec

from vlmq.schemas import keys

QWEN_MIN_PIXELS = 256 * 28 * 28
QWEN_MAX_PIXELS = 1280 * 28 * 28


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(msgspec.Struct, kw_only=True):
    # Where things are.
    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    s3_endpoint_url: str | None = None  # None: AWS; credentials from the standard AWS chain
    jobs_topic: str = keys.JOBS_TOPIC
    dlq_topic: str = keys.DLQ_TOPIC
    group_id: str = "vlmq-workers"
    worker_id: str = msgspec.field(default_factory=_default_worker_id)
    # Kafka security (aiokafka names).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT"
    )
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_ssl_cafile: str | None = None
    # The engine.
    engine: str = "fake"
    model: str | None = None
    engine_args: dict[str, str] = {}
    # Flow control.
    max_in_flight: int = 64
    job_timeout_s: float = 600.0
    commit_interval_s: float = 1.0
    revoke_grace_s: float = 10.0
    drain_timeout_s: float = 30.0
    session_timeout_ms: int = 10_000
    max_poll_interval_ms: int = 300_000
    # Images.
    max_images_per_job: int = 16
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 64_000_000  # decoded size; guards against decompression bombs
    min_pixels: int = QWEN_MIN_PIXELS
    max_pixels: int = QWEN_MAX_PIXELS
    max_prompt_chars: int = 200_000
    s3_timeout_s: float = 10.0
    fetch_retry_s: float = 60.0  # keep retrying a storage outage this long, then fail the job
    allowed_buckets: list[str] = []  # empty: any bucket
    allowed_file_roots: list[str] = []  # file:// only below these folders; empty: refused
    decode_threads: int = msgspec.field(default_factory=lambda: max(2, os.cpu_count() or 2))
    # Results.
    result_ttl_s: int = 7 * 24 * 3600
    # Operations.
    metrics_port: int = 9400  # 0: no metrics/health server
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"

    @classmethod
    def load(cls, overrides: dict[str, Any] | None = None) -> WorkerSettings:
        """Defaults, then `VLMQ_<FIELD>` env vars, then `overrides` (flags; None = unset)."""
        raw: dict[str, Any] = {}
        for name in cls.__struct_fields__:
            val = os.environ.get(f"VLMQ_{name.upper()}")
            if val is not None:
                raw[name] = _parse_env(name, val)
        raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return msgspec.convert(raw, cls, strict=False)

    def redacted(self) -> dict[str, Any]:
        """Settings for logs: secrets never appear in a log line."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        for k, v in out.items():
            if "password" in k and v:
                out[k] = "***"
        out["redis_url"] = redact_url(self.redis_url)
        return out


_LIST_FIELDS = {"allowed_buckets", "allowed_file_roots"}


def _parse_env(name: str, val: str) -> Any:
    if name in _LIST_FIELDS:
        return [v for v in val.split(",") if v]
    if name == "engine_args":
        return parse_pairs(val.split(","))
    return val


def parse_pairs(items: list[str]) -> dict[str, str]:
    """`key=value` strings (flags like --engine-arg) into a dict; a bare key means "true"."""
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        out[k.strip().replace("-", "_")] = v.strip() if sep else "true"
    return out


def engine_flags(args: list[str]) -> dict[str, str]:
    """Engine flags as `vllm serve` takes them (`--max-num-seqs 16`, `--max-num-seqs=16`,
    `--enforce-eager`) into engine_args: snake_case keys, a flag without a value is "true"."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"unexpected argument {arg!r}: engine options are --name value")
        name, sep, value = arg[2:].partition("=")
        if not sep:
            has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            value = args[i + 1] if has_value else "true"
            i += has_value
        out[name.replace("-", "_")] = value
        i += 1
    return out


def redact_url(url: str) -> str:
    """redis://user:secret@host -> redis://user:***@host."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    cred, _, host = rest.rpartition("@")
    user = cred.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
