"""One typed settings object for every process: defaults here, `VLMQ_*` env vars, then flags.

`Connection` is what the SDK, the CLI and the worker share (where Kafka, Redis and S3 are,
how to log in, how long results live); `WorkerSettings` extends it with the worker's own
knobs. Every field is `VLMQ_<FIELD NAME>` in the environment: `redis_url` is
`VLMQ_REDIS_URL`. Lists are comma-separated, dicts `key=value,key=value`.
"""

from __future__ import annotations

import os
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import msgspec

from vlmq.schemas import keys

RESULT_TTL_S = 7 * 24 * 3600
LEASE_S = 30.0  # how long a worker's claim holds a running job without renewal
DEFAULT_KAFKA = "127.0.0.1:9092"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
KafkaProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
RedisTopology = Literal["single", "cluster", "sentinel"]

S = TypeVar("S", bound="Settings")


class SettingsError(ValueError):
    """A setting's value is not one it can take; the message names the env var and flag."""

    def __init__(self, exc: msgspec.ValidationError) -> None:
        text = str(exc)
        # "... - at `$.field`"; a check of the whole (__post_init__) names its variable itself
        field = text.rpartition("$.")[2].split("`")[0].split(".")[0].split("[")[0] if "$." in text else ""
        where = f" (VLMQ_{field.upper()} or --{field.replace('_', '-')})" if field else ""
        super().__init__(f"invalid setting: {text}{where}")


class Settings(msgspec.Struct, kw_only=True):
    """A settings object that loads itself: defaults, then the environment, then flags."""

    @classmethod
    def load(cls: type[S], overrides: dict[str, Any] | None = None) -> S:
        """Defaults, then `VLMQ_<FIELD>` env vars, then `overrides` (flags; None = unset)."""
        raw: dict[str, Any] = {}
        for field in msgspec.structs.fields(cls):
            val = os.environ.get(f"VLMQ_{field.name.upper()}")
            if val is not None:
                raw[field.name] = _parse_env(field.type, val)
        raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise SettingsError(exc) from None

    def redacted(self) -> dict[str, Any]:
        """The settings for a log line: secrets never appear in one."""
        return _redact(msgspec.to_builtins(self))


REDIS_SCHEMES = ("redis", "rediss", "unix")


class Connection(Settings, kw_only=True):
    """Where the services are and how to reach them: the same for SDK, CLI and worker."""

    # Kafka bootstrap servers, `host:port[,host:port...]`.
    kafka_bootstrap: str = DEFAULT_KAFKA
    # Redis URL (`redis://[user:password@]host:port/db`, `rediss://` for TLS).
    redis_url: str = DEFAULT_REDIS
    # What `redis_url` points at: one Redis (`single`), a Redis Cluster (`cluster`: any
    # node's URL; the client finds the rest), or Sentinel (`sentinel`: the URL lists the
    # sentinels, `redis://host:26379,host:26379/0`, and the master is found by name).
    redis_topology: RedisTopology = "single"
    # The master's name for Sentinel.
    redis_sentinel_master: str = "mymaster"
    # Replicas that must acknowledge a worker's terminal write (Redis WAIT) before it
    # commits the Kafka offset; None: 1 when every master has a replica, else 0.
    redis_wait_replicas: int | None = None
    # S3 endpoint (MinIO, moto...); None: AWS, credentials from the standard AWS chain.
    s3_endpoint_url: str | None = None
    # The topic jobs are produced to and consumed from.
    jobs_topic: str = keys.JOBS_TOPIC
    # The tenant this submitter records on its jobs (job metadata `vlmq.tenant`, bound to
    # the submit record): the result cache's scope (docs/cache.md). None: the job's own.
    tenant: str | None = None
    # The dead-letter topic: every failed job's message and error.
    dlq_topic: str = keys.DLQ_TOPIC
    # Kafka security, in aiokafka's names; SASL fields matter only with a SASL protocol.
    kafka_security_protocol: KafkaProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    # CA bundle for SSL/SASL_SSL; None: the system's.
    kafka_ssl_cafile: str | None = None
    # Seconds every job record (and batch) lives in Redis after its last write.
    result_ttl_s: int = RESULT_TTL_S

    def __post_init__(self) -> None:
        # redis-py would say so only at the first command, as a 65-line traceback.
        if self.redis_url.partition("://")[0] not in REDIS_SCHEMES:
            raise ValueError(
                f"VLMQ_REDIS_URL (--redis-url) {redact_url(self.redis_url)!r} is not a Redis URL: "
                f"write redis://{self.redis_url.partition('://')[2] or self.redis_url} "
                "(rediss:// for TLS, unix:// for a socket)"
            )
        s3 = self.s3_endpoint_url
        if s3 and s3.partition("://")[0] not in ("http", "https"):
            raise ValueError(
                f"VLMQ_S3_ENDPOINT_URL (--s3-endpoint-url) {s3!r} is not an "
                f"http(s) URL: write http://{s3.partition('://')[2] or s3}"
            )

    def kafka_options(self) -> dict[str, Any]:
        """aiokafka's TLS/SASL keyword arguments, for producers and consumers alike."""
        out: dict[str, Any] = {"security_protocol": self.kafka_security_protocol}
        if self.kafka_sasl_mechanism:
            out |= {
                "sasl_mechanism": self.kafka_sasl_mechanism,
                "sasl_plain_username": self.kafka_sasl_username,
                "sasl_plain_password": self.kafka_sasl_password,
            }
        if "SSL" in self.kafka_security_protocol:
            from aiokafka.helpers import create_ssl_context

            out["ssl_context"] = create_ssl_context(cafile=self.kafka_ssl_cafile)
        return out


# A key is secret when one of its words is one of these (`hf_token`, `api_key`), not when
# a word merely contains one (`completion_tokens`, `max_tokens` stay readable).
_SECRET_WORDS = {"password", "passwd", "secret", "token", "key", "credential", "credentials", "auth"}
_NOT_SECRET = {"cache_key", "partition_key", "sort_key"}


def _redact(value: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in value.items():
        if isinstance(v, dict):  # engine_args may hold an api_key
            out[k] = _redact(v)
        elif (
            v and k.lower() not in _NOT_SECRET and _SECRET_WORDS & set(k.lower().replace("-", "_").split("_"))
        ):
            out[k] = "***"
        else:
            out[k] = redact_url(v) if isinstance(v, str) and "://" in v else v
    return out


def _parse_env(kind: Any, val: str) -> Any:
    """An env var's text as the field's type wants it; msgspec converts the rest."""
    origin = getattr(kind, "__origin__", None)
    if origin is list:
        return [v.strip() for v in val.split(",") if v.strip()]
    if origin is dict:
        return parse_pairs([v for v in val.split(",") if v])
    return val


def parse_pairs(items: list[str]) -> dict[str, str]:
    """`key=value` strings (flags like --engine-arg) into a dict; a bare key means "true"."""
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        out[k.strip().replace("-", "_")] = v.strip() if sep else "true"
    return out


# The setting that says where each service is, for the hint in a "cannot reach" line.
SERVICE_SETTING = {"Redis": "VLMQ_REDIS_URL", "Kafka": "VLMQ_KAFKA_BOOTSTRAP", "S3": "VLMQ_S3_ENDPOINT_URL"}


def unreachable(service: str, address: str, cause: BaseException, hint: str = "") -> str:
    """The one line for a service that does not answer, SDK and worker alike: which,
    where (no password), why in a few words, and what to do."""
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    hint = (
        hint or f'is it up? For a local stack: eval "$(vlmq stack up)"; else set {SERVICE_SETTING[service]}'
    )
    return f"cannot reach {service} at {address} ({reason[:200]}): {hint}"


def refused(service: str, address: str, cause: BaseException) -> str:
    """The one line for a service that answered but refused the credentials: not "is it
    up?" (it is), but which setting holds the user and password."""
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return (
        f"{service} at {address} refused the credentials ({reason[:200]}): "
        f"check the user and password in {SERVICE_SETTING[service]}"
    )


def redact_url(url: str) -> str:
    """A URL for a log line: no password in the userinfo, no query value (presigned URLs,
    `?password=`): redis://user:secret@host/0?password=x -> redis://user:***@host/0?password=***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        cred, _, host = netloc.rpartition("@")
        netloc = f"{cred.split(':', 1)[0]}:***@{host}"
    query = "&".join(f"{k}=***" for k, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
