"""multipart/form-data parsed as it arrives (python-multipart's streaming parser): the
`file` part goes straight into an S3 multipart upload, the other fields are small and
bounded. Bytes and lines are counted on the way, so an upload over the limits stops at
the limit, not after it has filled a disk."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from vlmq.api.storage import Writer

MAX_FIELDS = 16
MAX_FIELD_BYTES = 1024


class Refused(ValueError):
    """The upload breaks a rule; the message says which (it becomes a 400 or 413)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


class Form:
    """What an upload carried: small fields, and the file's name, size and line count."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = 0
        self.lines = 0
        self._last = b"\n"

    def count(self, data: bytes) -> None:
        self.size += len(data)
        self.lines += data.count(b"\n")
        self._last = data[-1:] or self._last

    @property
    def line_count(self) -> int:
        return self.lines + (self._last != b"\n")  # a last line without its newline


async def receive(
    chunks: AsyncIterator[bytes], content_type: str, file: Writer, max_bytes: int, max_lines: int
) -> Form:
    """Parse the body, writing the `file` part to `file`. Raises Refused."""
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise Refused("send the file as multipart/form-data (the openai SDK does)")
    form, parser_events = Form(), _Events()
    parser = MultipartParser(params[b"boundary"], parser_events.callbacks(), max_header_count=8)
    async for chunk in chunks:
        parser.write(chunk)
        for name, filename, data in parser_events.drain():
            if filename is None:
                _field(form, name, data)
                continue
            if name != "file":
                raise Refused(f"unexpected file part {name!r}: send one part named file")
            form.filename = form.filename or filename
            form.count(data)
            if form.size > max_bytes:
                raise Refused(f"the file is larger than {max_bytes} bytes", 413, "file")
            if form.lines > max_lines:
                raise Refused(f"the file has more than {max_lines} lines", 400, "file")
            await file.write(data)
    parser.finalize()
    if form.filename is None:
        raise Refused("no file part: send the file as the part named file", 400, "file")
    if form.line_count > max_lines:
        raise Refused(f"the file has more than {max_lines} lines", 400, "file")
    return form


def _field(form: Form, name: str, data: bytes) -> None:
    value = form.fields.get(name, "") + data.decode("utf-8", "replace")
    if len(value) > MAX_FIELD_BYTES or (name not in form.fields and len(form.fields) >= MAX_FIELDS):
        raise Refused(f"form field {name[:40]!r} is too long, or there are too many fields")
    form.fields[name] = value


class _Events:
    """python-multipart's callbacks are synchronous: they queue (part name, filename, data)
    here, and `receive` drains the queue after each chunk, awaiting the S3 writes."""

    def __init__(self) -> None:
        self.queue: list[tuple[str, str | None, bytes]] = []
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._filename: str | None = None

    def callbacks(self) -> Any:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._grow("_header_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._grow("_header_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done,
            "on_part_data": lambda d, s, e: self.queue.append((self._name, self._filename, bytes(d[s:e]))),
        }

    def _begin(self) -> None:
        self._headers, self._name, self._filename = {}, "", None

    def _grow(self, attr: str, data: bytes) -> None:
        value = getattr(self, attr) + data
        if len(value) > 4096:
            raise Refused("a part header is too long")
        setattr(self, attr, value)

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _headers_done(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        self._filename = filename.decode("utf-8", "replace")[:255] if filename is not None else None
        if self._filename is not None:  # an empty file still counts as the file
            self.queue.append((self._name, self._filename, b""))

    def drain(self) -> list[tuple[str, str | None, bytes]]:
        out, self.queue = self.queue, []
        return out
