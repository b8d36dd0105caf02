"""Images by http(s) URL, safe by default against server-side request forgery.

Before each hop (the URL, then every redirect, at most `url_max_redirects`) the host is
resolved once and every address it resolves to is checked: loopback, private, link-local
(cloud metadata: 169.254.169.254), multicast, reserved and unspecified addresses are
refused, IPv4 and IPv6 alike (IPv4-mapped IPv6 is checked as the IPv4 it maps), unless
`url_allowed_networks` names them. The connection then goes to the checked address
itself (aiohttp asks our resolver, which answers only with the pinned addresses), so a
DNS answer that changes between the check and the connect (rebinding) changes nothing.
TLS still verifies the certificate against the host name. Bytes are counted while they
stream (`max_image_bytes`, `max_video_bytes`), the `Content-Type` must be an image's (a
video's, for a video; or a generic binary type, as presigned S3/GCS URLs give) and the
first bytes must be an image's (a video's; a safetensors file's) magic. Bodies are asked
for uncompressed; one sent gzip or deflate anyway is decoded, and its limit counts the
decoded bytes.
Timeouts: connect, per read, and for the whole image (a server that trickles bytes).
Only 429, 5xx, timeouts and broken connections are retried, within `fetch_retry_s`.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import socket
import ssl
import zlib
from collections.abc import Awaitable, Callable
from typing import NamedTuple
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from vlmq.schemas.errors import ErrorCode, VlmqError
from vlmq.worker.faults import Transient, fetch_retrying
from vlmq.worker.settings import WorkerSettings

Resolve = Callable[[str], Awaitable[list[str]]]
_PINNED: contextvars.ContextVar[dict[str, list[str]]] = contextvars.ContextVar("vlmq_pinned_hosts")
_REDIRECTS = {301, 302, 303, 307, 308}
_GENERIC_TYPES = {"application/octet-stream", "binary/octet-stream", ""}
# Content-Encodings undone here (a server may compress whatever it is asked), zlib's window
# bits for each; deflate is zlib-wrapped by the standard, raw from some servers.
_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# The first bytes of every format the worker decodes (see `image_formats`).
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


class _Kind(NamedTuple):
    """What a body must be: its Content-Type's major type, and how its first bytes look."""

    name: str
    looks_right: Callable[[bytes], bool]


_IMAGE = _Kind(
    "image",
    lambda h: h.startswith(_MAGIC) or (h[:4] == b"RIFF" and h[8:12] == b"WEBP") or h[4:8] == b"ftyp",
)
# ISO media (mp4, mov: an `ftyp` box first) and EBML (webm, mkv).
_VIDEO = _Kind("video", lambda h: h[4:8] == b"ftyp" or h.startswith(b"\x1a\x45\xdf\xa3"))
# safetensors: a little-endian header length (well under 2**32), then its JSON object.
_EMBEDS = _Kind("application", lambda h: h[4:8] == b"\0\0\0\0" and h[8:9] == b"{")
_KINDS = {"image": _IMAGE, "video": _VIDEO, "image_embeds": _EMBEDS}


async def system_resolve(host: str) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class _PinnedResolver(AbstractResolver):
    """Answers aiohttp with the addresses this fetch checked, never with a fresh lookup."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC) -> list[ResolveResult]:
        pinned = _PINNED.get({}).get(host)
        if not pinned:
            raise OSError(f"{host} was not checked before connecting")
        return [
            ResolveResult(
                hostname=host,
                host=ip,
                port=port,
                family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in pinned
        ]

    async def close(self) -> None:
        return None


class WebFetcher:
    """`async with WebFetcher(settings) as w: data = await w.fetch(url, charge)`."""

    def __init__(self, settings: WorkerSettings, resolve: Resolve = system_resolve) -> None:
        self.s = settings
        self.resolve = resolve  # tests give a resolver of their own (names -> addresses)
        self.allowed_networks = [ipaddress.ip_network(n, strict=False) for n in settings.url_allowed_networks]
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> WebFetcher:
        tls = ssl.create_default_context(cafile=self.s.url_ca_file)
        connector = aiohttp.TCPConnector(
            resolver=_PinnedResolver(), use_dns_cache=False, ssl=tls, limit=self.s.max_in_flight
        )
        timeout = aiohttp.ClientTimeout(
            total=self.s.url_timeout_s,
            sock_connect=self.s.url_connect_timeout_s,
            sock_read=self.s.url_read_timeout_s,
        )
        # trust_env off: no proxy from the environment carries a request past the checks.
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(
        self, url: str, charge: Callable[[int], None], cap: int | None = None, *, kind: str = "image"
    ) -> bytes:
        """The body of `url`, what `kind` (an input's MediaRef.kind) must be; at most `cap`
        bytes (default: the kind's, `WorkerSettings.max_bytes`)."""
        expect, most = _KINDS[kind], cap or self.s.max_bytes(kind)
        return await fetch_retrying(
            lambda: self._follow(url, charge, most, expect), self.s.fetch_retry_s, _short(url)
        )

    async def _follow(self, url: str, charge: Callable[[int], None], cap: int, kind: _Kind) -> bytes:
        """One try: the URL and its redirects, each hop checked before it is connected to."""
        pins: dict[str, list[str]] = {}
        token = _PINNED.set(pins)
        try:
            for _ in range(self.s.url_max_redirects + 1):
                host = await self._check(url, pins)
                nxt = await self._get(url, host, charge, cap, kind)
                if isinstance(nxt, bytes):
                    return nxt
                url = nxt
            raise VlmqError(
                ErrorCode.URI_NOT_ALLOWED,
                f"more than {self.s.url_max_redirects} redirects (url_max_redirects)",
            )
        finally:
            _PINNED.reset(token)

    async def _check(self, url: str, pins: dict[str, list[str]]) -> str:
        """The URL's host, after its scheme, name and every address it resolves to passed."""
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
        if scheme not in self.s.url_schemes:
            raise VlmqError(ErrorCode.URI_NOT_ALLOWED, f"{scheme}:// images are not enabled (url_schemes)")
        if not host or parts.username or parts.password:
            raise VlmqError(ErrorCode.URI_NOT_ALLOWED, f"{_short(url)} has no host, or has credentials")
        if self.s.url_allowed_hosts and not any(_host_matches(host, h) for h in self.s.url_allowed_hosts):
            raise VlmqError(ErrorCode.URI_NOT_ALLOWED, f"host {host} is not in url_allowed_hosts")
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            addresses = await self._lookup(host)
        if not addresses:
            raise VlmqError(ErrorCode.IMAGE_NOT_FOUND, f"host {host} does not resolve")
        # One refused address refuses the host: whoever runs its DNS chooses the answer.
        if refused := [a for a in addresses if not self._public(a)]:
            raise VlmqError(
                ErrorCode.URI_NOT_ALLOWED, f"host {host} resolves to a non-public address ({refused[0]})"
            )
        pins[host] = addresses
        return host

    async def _lookup(self, host: str) -> list[str]:
        try:
            return await self.resolve(host)
        except OSError as exc:
            if isinstance(exc, socket.gaierror) and exc.errno in (socket.EAI_NONAME, socket.EAI_NODATA):
                raise VlmqError(ErrorCode.IMAGE_NOT_FOUND, f"host {host} does not resolve") from None
            raise Transient(f"DNS: {exc}") from None

    def _public(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allowed_networks):
            return True
        return ip.is_global and not ip.is_multicast and not ip.is_reserved

    async def _get(
        self, url: str, host: str, charge: Callable[[int], None], cap: int, kind: _Kind
    ) -> bytes | str:
        """The body, or the next URL of a redirect."""
        assert self._session is not None, "use `async with WebFetcher(...)`"
        try:
            # identity: images are compressed already; a server that compresses anyway is
            # decoded below, its size limit applied to the decoded bytes.
            headers = {"Accept-Encoding": "identity"}
            async with self._session.get(
                url, allow_redirects=False, auto_decompress=False, headers=headers
            ) as resp:
                if resp.status in _REDIRECTS and resp.headers.get("Location"):
                    return urljoin(url, resp.headers["Location"])
                _raise_for(resp.status, url)
                _check_type(resp.headers.get("Content-Type", ""), url, kind)
                return await self._body(resp, url, charge, cap, kind)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            raise Transient(f"{type(exc).__name__}: {exc}"[:300]) from None
        except aiohttp.ClientResponseError as exc:  # a malformed response: the server's fault
            raise Transient(f"bad response from {host}: {exc.message}"[:300]) from None

    async def _body(
        self, resp: aiohttp.ClientResponse, url: str, charge: Callable[[int], None], cap: int, kind: _Kind
    ) -> bytes:
        decoder = _Decoder.of(resp.headers.get("Content-Encoding", ""), url, cap)
        if resp.content_length is not None and decoder is None:  # an encoded length says nothing
            if resp.content_length > cap:
                raise VlmqError(
                    ErrorCode.IMAGE_TOO_LARGE, f"{_short(url)} is {resp.content_length} bytes > {cap}"
                )
            charge(resp.content_length)
        body = bytearray()
        async for sent in resp.content.iter_chunked(64 * 1024):
            chunk = decoder.feed(sent) if decoder else sent
            body += chunk
            if len(body) > cap:
                raise VlmqError(ErrorCode.IMAGE_TOO_LARGE, f"{_short(url)} sent over {cap} bytes")
            if len(body) >= 16 and len(body) - len(chunk) < 16:
                _check_magic(bytes(body[:16]), url, kind)
        if decoder:
            decoder.end()
        _check_magic(bytes(body[:16]), url, kind)
        charge(len(body))
        return bytes(body)


class _Decoder:
    """A gzip or deflate body undone as it streams, never more than `cap` + 1 bytes out of
    one chunk: a bomb (a few KB that inflate to gigabytes) stops at the limit."""

    def __init__(self, coding: str, wbits: int, url: str, cap: int) -> None:
        self.coding, self.url, self.cap = coding, url, cap
        self.out = 0
        self._z = zlib.decompressobj(wbits)
        self._raw_ok = coding == "deflate"  # may still turn out to be raw deflate

    @classmethod
    def of(cls, header: str, url: str, cap: int) -> _Decoder | None:
        coding = header.strip().lower()
        if coding in ("", "identity"):
            return None
        if coding not in _CODINGS:
            raise VlmqError(
                ErrorCode.IMAGE_FETCH_FAILED,
                f"{_short(url)} came with Content-Encoding {coding[:40]!r} (gzip and deflate are decoded)",
            )
        return cls(coding, _CODINGS[coding], url, cap)

    def feed(self, data: bytes) -> bytes:
        try:
            out = self._z.decompress(data, self.cap - self.out + 1)
        except zlib.error:
            if not self._raw_ok:
                raise self._corrupt() from None
            self._raw_ok = False  # no zlib header: raw deflate, from its first byte
            self._z = zlib.decompressobj(-zlib.MAX_WBITS)
            return self.feed(data)
        self._raw_ok = False
        self.out += len(out)
        if self.out > self.cap:
            raise VlmqError(
                ErrorCode.IMAGE_TOO_LARGE,
                f"{_short(self.url)} decodes ({self.coding}) to over {self.cap} bytes",
            )
        return out

    def end(self) -> None:
        if not self._z.eof:
            raise self._corrupt()

    def _corrupt(self) -> VlmqError:
        return VlmqError(
            ErrorCode.IMAGE_CORRUPT, f"{_short(self.url)}: its {self.coding} body does not decode"
        )


def _raise_for(status: int, url: str) -> None:
    if 200 <= status < 300:
        return
    shown = _short(url)
    if status in (404, 410):
        raise VlmqError(ErrorCode.IMAGE_NOT_FOUND, f"{shown} answered {status}")
    if status in (401, 403):
        raise VlmqError(ErrorCode.IMAGE_ACCESS_DENIED, f"{shown} answered {status}")
    if status == 429 or status >= 500:
        raise Transient(f"HTTP {status}")
    raise VlmqError(ErrorCode.IMAGE_FETCH_FAILED, f"{shown} answered {status}")


def _check_type(content_type: str, url: str, kind: _Kind) -> None:
    given = content_type.split(";", 1)[0].strip().lower()
    if not (given.startswith(f"{kind.name}/") or given in _GENERIC_TYPES):
        raise VlmqError(ErrorCode.IMAGE_CORRUPT, f"{_short(url)} is {given}, not {article(kind.name)}")


def _check_magic(head: bytes, url: str, kind: _Kind) -> None:
    if not kind.looks_right(head):
        raise VlmqError(ErrorCode.IMAGE_CORRUPT, f"{_short(url)} does not start like {article(kind.name)}")


def article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _host_matches(host: str, allowed: str) -> bool:
    """`example.com` is itself; `.example.com` or `*.example.com` its subdomains too."""
    allowed = allowed.lower().lstrip("*")
    return host == allowed.lstrip(".") or (allowed.startswith(".") and host.endswith(allowed))


def _short(url: str) -> str:
    """The URL as errors show it: without its query (a presigned URL's signature)."""
    shown = url.split("?", 1)[0]
    return shown if len(shown) <= 120 else shown[:117] + "..."
