"""What an S3 error means, read once for the worker's fetch and the CLI's messages."""

from __future__ import annotations

from typing import Literal

from botocore.exceptions import ClientError

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED = {
    "AccessDenied",
    "403",
    "Forbidden",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
}


def error_code(exc: ClientError) -> str:
    """S3's own code (`NoSuchBucket`), else the HTTP status."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def error_kind(exc: ClientError) -> Literal["not_found", "denied"] | None:
    """`not_found`, `denied`, or None for anything else (a fault worth retrying)."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in _NOT_FOUND or status == 404:
        return "not_found"
    if code in _DENIED or status == 403:
        return "denied"
    return None
