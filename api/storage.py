"""Files in S3: written as multipart uploads while they arrive, read back line by line from
any byte offset (a driver that took a batch over resumes where the last one stopped),
streamed out to clients. Memory per transfer is one part (8 MiB) or one line."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from aiobotocore.session import get_session
from botocore.exceptions import ClientError

PART = 8 * 1024 * 1024  # S3 wants >= 5 MiB for every part but the last
READ = 1024 * 1024


class Storage:
    def __init__(self, bucket: str, endpoint_url: str | None) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self._stack = contextlib.AsyncExitStack()
        self.s3: Any = None

    async def start(self, create_bucket: bool = False) -> None:
        self.s3 = await self._stack.enter_async_context(
            get_session().create_client("s3", endpoint_url=self.endpoint_url)
        )
        if create_bucket:
            with contextlib.suppress(ClientError):  # already there (ours)
                await self.s3.create_bucket(Bucket=self.bucket)
        try:  # fail at start, not at the first upload
            await self.s3.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            raise RuntimeError(
                f"cannot use the files bucket {self.bucket} ({exc}): create it, or start with --create-bucket"
            ) from None

    async def close(self) -> None:
        await self._stack.aclose()

    def writer(self, key: str) -> Writer:
        return Writer(self, key)

    async def delete(self, key: str) -> None:
        await self.s3.delete_object(Bucket=self.bucket, Key=key)

    async def chunks(self, key: str) -> AsyncIterator[bytes]:
        resp = await self.s3.get_object(Bucket=self.bucket, Key=key)
        async with resp["Body"] as body:
            while chunk := await body.read(READ):
                yield chunk

    async def lines(
        self, key: str, start: int = 0, size: int | None = None
    ) -> AsyncGenerator[tuple[bytes, int], None]:
        """Each line from byte `start` on (without its newline), with the offset just past it."""
        if size is not None and start >= size:
            return
        resp = await self.s3.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-")
        buf, pos = b"", start
        async with resp["Body"] as body:
            while chunk := await body.read(READ):
                buf += chunk
                *done, buf = buf.split(b"\n")
                for line in done:
                    pos += len(line) + 1
                    yield line, pos
        if buf:
            yield buf, pos + len(buf)


class Writer:
    """One object written part by part; `abort` leaves nothing behind."""

    def __init__(self, storage: Storage, key: str) -> None:
        self.storage, self.key = storage, key
        self.size = 0
        self._buf = bytearray()
        self._parts: list[dict[str, Any]] = []
        self._upload_id: str | None = None

    async def write(self, data: bytes) -> None:
        self._buf += data
        self.size += len(data)
        if len(self._buf) >= PART:
            await self._flush()

    async def _flush(self) -> None:
        s3, bucket = self.storage.s3, self.storage.bucket
        if self._upload_id is None:
            self._upload_id = (await s3.create_multipart_upload(Bucket=bucket, Key=self.key))["UploadId"]
        n = len(self._parts) + 1
        resp = await s3.upload_part(
            Bucket=bucket, Key=self.key, UploadId=self._upload_id, PartNumber=n, Body=bytes(self._buf)
        )
        self._parts.append({"PartNumber": n, "ETag": resp["ETag"]})
        self._buf.clear()

    async def close(self) -> None:
        s3, bucket = self.storage.s3, self.storage.bucket
        if self._upload_id is None:  # small: one PUT
            await s3.put_object(Bucket=bucket, Key=self.key, Body=bytes(self._buf))
            return
        if self._buf:
            await self._flush()
        await s3.complete_multipart_upload(
            Bucket=bucket, Key=self.key, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
        )

    async def abort(self) -> None:
        if self._upload_id is not None:
            with contextlib.suppress(ClientError):
                await self.storage.s3.abort_multipart_upload(
                    Bucket=self.storage.bucket, Key=self.key, UploadId=self._upload_id
                )
