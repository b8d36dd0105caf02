"""The CLI's one error boundary: every error a user can cause or meet becomes one line
that names what failed, where, and what to do next, with an exit code per class.
`vlmq --debug ...` (or VLMQ_DEBUG=1) shows the traceback instead.

Exit codes: 1 a job ended without success (or the work failed); 2 bad usage or input;
3 a service (Kafka, Redis, S3, a stack binary) cannot be reached or started; 4 not found;
5 credentials or permissions refused; 130 interrupted (Ctrl-C)."""

from __future__ import annotations

import enum

from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from redis.exceptions import AuthenticationError, NoPermissionError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from vlmq.core import s3
from vlmq.core.settings import Connection, SettingsError, redact_url, refused, unreachable
from vlmq.core.topology import TopologyError
from vlmq.deploy.stack import StackError
from vlmq.producer.errors import Denied, Interrupted, NotFound, Unavailable, ValidationError, VlmqClientError


class Exit(enum.IntEnum):
    FAILED = 1
    USAGE = 2
    UNAVAILABLE = 3
    NOT_FOUND = 4
    DENIED = 5
    INTERRUPTED = 130  # Ctrl-C, as a shell counts it (128 + SIGINT)


class UserError(Exception):
    """A mistake the CLI found itself (a bad flag value, an empty prefix): message + code."""

    def __init__(self, message: str, code: Exit = Exit.USAGE) -> None:
        super().__init__(message)
        self.code = code


def explain(exc: BaseException) -> tuple[str, Exit] | None:
    """The line and exit code for an error the user can act on; None for a bug."""
    if isinstance(exc, UserError):
        return str(exc), exc.code
    if isinstance(exc, Unavailable | StackError):
        return str(exc), Exit.UNAVAILABLE
    if isinstance(exc, NotFound):
        return str(exc), Exit.NOT_FOUND
    if isinstance(exc, Denied):
        return str(exc), Exit.DENIED
    if isinstance(exc, Interrupted):
        return str(exc), Exit.INTERRUPTED
    if isinstance(exc, TopologyError | SettingsError):
        return str(exc), Exit.USAGE
    if isinstance(exc, ValidationError):
        return f"invalid job: {exc}", Exit.USAGE
    if isinstance(exc, VlmqClientError):
        return str(exc), Exit.FAILED
    if isinstance(exc, OSError) and exc.filename is not None:  # a file the user named
        code = Exit.DENIED if isinstance(exc, PermissionError) else Exit.USAGE
        return f"cannot use {exc.filename}: {exc.strerror}", code
    if isinstance(exc, NoPermissionError):
        return (
            f"Redis refused the command for this user ({exc}): grant it vlmq's keys (docs/operations.md)",
            Exit.DENIED,
        )
    return _explain_redis(exc) or _explain_s3(exc)


def _explain_redis(exc: BaseException) -> tuple[str, Exit] | None:
    """Redis errors that reach the boundary raw (commands that talk to Redis without the
    SDK: api keys, the result cache): the same lines the SDK gives."""
    if not isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return None
    try:
        where = redact_url(Connection.load().redis_url)
    except SettingsError:
        where = "VLMQ_REDIS_URL"
    if isinstance(exc, AuthenticationError):
        return refused("Redis", where, exc), Exit.DENIED
    return unreachable("Redis", where, exc), Exit.UNAVAILABLE


def _explain_s3(exc: BaseException) -> tuple[str, Exit] | None:
    if isinstance(exc, EndpointConnectionError):
        return (
            f"cannot reach S3 at {exc.kwargs.get('endpoint_url')}: is it up? Else set VLMQ_S3_ENDPOINT_URL",
            Exit.UNAVAILABLE,
        )
    if isinstance(exc, NoCredentialsError):
        return "no S3 credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile", Exit.DENIED
    if isinstance(exc, ClientError):
        code, kind = s3.error_code(exc), s3.error_kind(exc)
        if kind == "not_found":
            bucket = exc.response.get("Error", {}).get("BucketName", "")
            what = f"bucket {bucket!r}" if code == "NoSuchBucket" else "S3 object"
            return f"{what} does not exist: check the s3:// URI (and VLMQ_S3_ENDPOINT_URL)", Exit.NOT_FOUND
        if kind == "denied":
            return f"S3 refused access ({code}): check the credentials and the bucket policy", Exit.DENIED
    return None
