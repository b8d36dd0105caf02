"""Error codes: every way a job can fail, named once, shared by every language."""

from __future__ import annotations

import enum
import re


class ErrorCode(str, enum.Enum):
    """Why a job failed. `RETRYABLE` says which a client may simply resubmit."""

    # The message itself.
    NOT_SUBMITTED = "not_submitted"  # no submit record names this job: nobody submitted it
    FORGED = "forged"  # the body is not the one recorded at submit (or names another batch)
    BAD_MESSAGE = "bad_message"  # not msgpack/JSON, or not a Job at all
    INVALID_JOB = "invalid_job"  # decodes, but a field is invalid
    UNSUPPORTED_VERSION = "unsupported_version"  # v newer than this worker speaks
    UNKNOWN_MODEL = "unknown_model"  # the job names a model this worker does not serve
    PROMPT_TOO_LONG = "prompt_too_long"
    TOO_MANY_IMAGES = "too_many_images"
    UNSUPPORTED = "unsupported"  # the engine cannot honour a request feature
    UNSUPPORTED_INPUT = "unsupported_input"  # an input kind (video) this worker or engine does not take
    # Images.
    URI_NOT_ALLOWED = "uri_not_allowed"  # scheme, bucket, path or host refused by policy
    IMAGE_NOT_FOUND = "image_not_found"
    IMAGE_ACCESS_DENIED = "image_access_denied"
    IMAGE_TOO_LARGE = "image_too_large"  # bytes or pixels over the limit
    IMAGE_CORRUPT = "image_corrupt"  # not an image, truncated, unsupported format
    IMAGE_CHECKSUM = "image_checksum"  # sha256 given by the producer does not match
    IMAGE_FETCH_FAILED = "image_fetch_failed"  # storage kept failing past the retry budget
    EMBEDDING_INVALID = "embedding_invalid"  # image embeddings that are not what the model takes
    # Generation.
    ENGINE_ERROR = "engine_error"
    TIMEOUT = "timeout"
    # The worker.
    INTERNAL = "internal"  # an unexpected error while handling this job (the type is in the message)
    POISON = "poison"  # delivered more than max_attempts times: workers died on it each time


RETRYABLE: frozenset[ErrorCode] = frozenset(
    {ErrorCode.IMAGE_FETCH_FAILED, ErrorCode.ENGINE_ERROR, ErrorCode.TIMEOUT, ErrorCode.INTERNAL}
)


def describe(exc: BaseException, limit: int = 500) -> str:
    """An unexpected exception for a job's error message: its type and text, without Python
    reprs of objects (`<_io.BytesIO object at 0x...>`), at most `limit` characters."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<object>", f"{type(exc).__name__}: {exc}".rstrip(": "))
    return text if len(text) <= limit else text[: limit - 3] + "..."


# `scheme://user:password@host`: what a URL's userinfo looks like wherever a URL is quoted;
# and query parameters that carry a secret (presigned URLs: X-Amz-Signature, sig, token).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]{0,31}://)[^/@\s?#]*@")
_SECRET_PARAM = re.compile(
    r"(?i)([?&][a-z0-9_.\-]*(?:sig|signature|token|key|secret|password|credential|auth)[a-z0-9_.\-]*=)[^&#\s]*"
)


def redact(text: str) -> str:
    """`text` with every URL's credentials (`user:password@`, secret query values) replaced
    by `***`: error messages quote URIs, and they travel to Redis, dead letters, logs and
    the dashboard."""
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


class VlmqError(Exception):
    """A failure with a code. Raised by the worker's stages, turned into a failed Result."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[VlmqError], tuple[ErrorCode, str]]:
        # Crosses process boundaries (the image pool): rebuilt from its own fields.
        return (type(self), (self.code, self.message))

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE
