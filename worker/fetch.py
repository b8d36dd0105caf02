"""Stage: fetch image and video bytes. S3 through one pooled aiobotocore client; `file://`;
`data:`; http(s) (worker/web.py).

Policy first (scheme, bucket and folder allowlists), then the bytes, capped at
`max_image_bytes` (`max_video_bytes`, `max_embedding_bytes`) while streaming. Storage faults
(timeouts, 5xx, connection errors) are retried with exponential backoff and jitter for up
to `fetch_retry_s`, so an S3 outage delays jobs instead of failing them; missing objects
and denied access fail at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from vlmq.core import s3, tracing
from vlmq.core.retry import within
from vlmq.schemas.errors import ErrorCode, VlmqError, redact
from vlmq.schemas.job import MediaRef
from vlmq.worker.faults import Transient, fetch_retrying
from vlmq.worker.settings import WorkerSettings
from vlmq.worker.web import Resolve, WebFetcher, system_resolve


class Budget:
    """The bytes one job's images may take together (`max_job_bytes`). Each image counts
    once, however often its fetch is retried."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.sizes: dict[int, int] = {}

    def charge(self) -> Callable[[int], None]:
        """The function one image reports its size to (again on a retry: counted once)."""
        slot = len(self.sizes)
        self.sizes[slot] = 0
        return lambda size: self._take(slot, size)

    def _take(self, slot: int, size: int) -> None:
        self.sizes[slot] = size
        total = sum(self.sizes.values())
        if self.limit is not None and total > self.limit:
            raise VlmqError(
                ErrorCode.IMAGE_TOO_LARGE,
                f"the job's images take over {total} bytes > max_job_bytes {self.limit}",
            )


class Fetcher:
    """Use as `async with Fetcher(settings) as f: data = await f.fetch(ref)`."""

    def __init__(self, settings: WorkerSettings, resolve: Resolve = system_resolve) -> None:
        self.settings = settings
        self.resolve = resolve  # host name -> addresses, for web images (tests give their own)
        self._stack = contextlib.AsyncExitStack()
        self._s3: Any = None
        self._web: WebFetcher | None = None

    async def __aenter__(self) -> Fetcher:
        config = AioConfig(
            max_pool_connections=max(64, self.settings.max_in_flight),
            connect_timeout=self.settings.s3_timeout_s,
            read_timeout=self.settings.s3_timeout_s,
            retries={"mode": "standard", "max_attempts": 2},
        )
        self._s3 = await self._stack.enter_async_context(
            get_session().create_client("s3", endpoint_url=self.settings.s3_endpoint_url, config=config)
        )
        self._web = await self._stack.enter_async_context(WebFetcher(self.settings, self.resolve))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    @tracing.traced("vlmq.fetch", kind="client")
    async def fetch(self, ref: MediaRef, budget: Budget | None = None) -> bytes:
        """The image's (or video's) bytes. `budget`: the job's inputs together (checked on
        each one's size before its bytes are read, so a job of many big ones holds no memory)."""
        uri = ref.uri
        if tracing.ON:  # nothing computed for spans that are not there
            tracing.annotate({"url.scheme": uri.split(":", 1)[0][:16], "vlmq.media.kind": ref.kind})
            tracing.content({"url.full": redact(uri)})
        charge = (budget or Budget(None)).charge()
        cap = self.settings.max_bytes(ref.kind)
        if uri.startswith("s3://"):
            data = await self._fetch_s3(uri, charge, cap)
        elif uri.startswith("data:"):
            data = self._data_uri(uri, charge, cap)
        elif uri.startswith("file://"):
            data = await asyncio.to_thread(self._read_file, uri, charge, cap)
        elif uri.startswith(("https://", "http://")):
            assert self._web is not None, "use `async with Fetcher(...)`"
            data = await self._web.fetch(uri, charge, cap, kind=ref.kind)
        else:
            raise VlmqError(
                ErrorCode.URI_NOT_ALLOWED, f"{uri.split(':', 1)[0]}:// images are not enabled on this worker"
            )
        if ref.sha256 and hashlib.sha256(data).hexdigest() != ref.sha256:
            raise VlmqError(ErrorCode.IMAGE_CHECKSUM, f"sha256 of {_short(uri)} does not match")
        if tracing.ON:
            tracing.annotate({"vlmq.media.bytes": len(data)})
        return data

    async def _fetch_s3(self, uri: str, charge: Callable[[int], None], cap: int) -> bytes:
        parsed = urlparse(uri)
        bucket, key = parsed.netloc, unquote(parsed.path.lstrip("/"))
        if not bucket or not key:
            raise VlmqError(ErrorCode.URI_NOT_ALLOWED, f"malformed S3 URI {_short(uri)}")
        if self.settings.allowed_buckets and bucket not in self.settings.allowed_buckets:
            raise VlmqError(ErrorCode.URI_NOT_ALLOWED, f"bucket {bucket!r} is not allowed")
        return await fetch_retrying(
            lambda: self._get_object(bucket, key, uri, charge, cap), self.settings.fetch_retry_s, "storage"
        )

    async def _get_object(
        self, bucket: str, key: str, uri: str, charge: Callable[[int], None], cap: int
    ) -> bytes:
        async def get() -> bytes:
            resp = await self._s3.get_object(Bucket=bucket, Key=key)
            size = int(resp.get("ContentLength") or 0)
            async with resp["Body"] as body:
                if size > cap:
                    raise VlmqError(ErrorCode.IMAGE_TOO_LARGE, f"{_short(uri)} is {size} bytes > {cap}")
                charge(size)
                return bytes(await body.read())

        try:
            return await within(get(), self.settings.s3_timeout_s * 2)
        except ClientError as exc:
            kind = s3.error_kind(exc)
            if kind == "not_found":
                raise VlmqError(ErrorCode.IMAGE_NOT_FOUND, f"{_short(uri)} does not exist") from None
            if kind == "denied":
                raise VlmqError(ErrorCode.IMAGE_ACCESS_DENIED, f"access to {_short(uri)} denied") from None
            raise Transient(f"S3 {s3.error_code(exc)}") from None
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise Transient(type(exc).__name__) from None

    def _data_uri(self, uri: str, charge: Callable[[int], None], cap: int) -> bytes:
        header, sep, payload = uri.partition(",")
        if not sep or not header.endswith(";base64"):
            raise VlmqError(ErrorCode.IMAGE_CORRUPT, "data: URI must be base64 (data:<mime>;base64,...)")
        if len(payload) * 3 // 4 > cap:
            raise VlmqError(ErrorCode.IMAGE_TOO_LARGE, f"inline data over {cap} bytes")
        charge(len(payload) * 3 // 4)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise VlmqError(ErrorCode.IMAGE_CORRUPT, "data: URI is not valid base64") from None

    def _read_file(self, uri: str, charge: Callable[[int], None], cap: int) -> bytes:
        # Errors name the URI as sent: never where it resolved to (/proc/..., symlink targets).
        path = Path(unquote(urlparse(uri).path)).resolve()
        roots = [Path(r).resolve() for r in self.settings.allowed_file_roots]
        shown = _short(uri)
        if not any(path.is_relative_to(r) for r in roots):
            raise VlmqError(
                ErrorCode.URI_NOT_ALLOWED, f"{shown} is outside allowed_file_roots (VLMQ_ALLOWED_FILE_ROOTS)"
            )
        try:
            size = path.stat().st_size
            if size > cap:
                raise VlmqError(ErrorCode.IMAGE_TOO_LARGE, f"{shown} is {size} bytes > {cap}")
            charge(size)
            return path.read_bytes()
        except FileNotFoundError:
            raise VlmqError(ErrorCode.IMAGE_NOT_FOUND, f"{shown} does not exist") from None
        except PermissionError:
            raise VlmqError(ErrorCode.IMAGE_ACCESS_DENIED, f"{shown} is not readable") from None
        except IsADirectoryError:
            raise VlmqError(ErrorCode.IMAGE_NOT_FOUND, f"{shown} is a folder") from None
        except OSError as exc:  # a device, a FIFO, an I/O error: not an image file
            raise VlmqError(ErrorCode.IMAGE_NOT_FOUND, f"{shown} cannot be read ({exc.strerror})") from None


def _short(uri: str) -> str:
    return uri if len(uri) <= 120 else uri[:117] + "..."
