"""Web images from real local HTTPS and HTTP servers that compress: the fetcher asks for
`identity`, decodes a gzip or deflate body sent anyway, applies its size limit to the
decoded bytes (a gzip bomb is refused at the limit), and refuses encodings it cannot undo,
each as a typed failure."""

from __future__ import annotations

import gzip
import ssl
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trustme
from aiohttp import web

from tests.integration.test_web_images import JPEG, PUBLIC, fake_dns
from vlmq.schemas.errors import ErrorCode, VlmqError
from vlmq.worker.settings import WorkerSettings
from vlmq.worker.web import WebFetcher

MB = 1024 * 1024
CAP = MB  # max_image_bytes in these tests
BOMB = gzip.compress(JPEG[:16] + bytes(256 * MB), compresslevel=9)  # ~250 KB on the wire


def _raw_deflate(data: bytes) -> bytes:
    z = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return z.compress(data) + z.flush()


BODIES = {
    "/gzip.jpg": ("gzip", gzip.compress(JPEG)),
    "/deflate.jpg": ("deflate", zlib.compress(JPEG)),
    "/raw-deflate.jpg": ("deflate", _raw_deflate(JPEG)),
    "/bomb.jpg": ("gzip", BOMB),
    "/brotli.jpg": ("br", b"\x0b\x02\x80not really brotli"),
    "/broken.jpg": ("gzip", gzip.compress(JPEG)[:-30]),
}


@dataclass
class Server:
    http: str
    https: str
    ca: trustme.CA
    asked: list[str]  # the Accept-Encoding of each request


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    asked: list[str] = []

    async def encoded(request: web.Request) -> web.Response:
        asked.append(request.headers.get("Accept-Encoding", ""))
        coding, body = BODIES[request.path]  # whatever was asked: a misconfigured CDN
        return web.Response(body=body, headers={"Content-Type": "image/jpeg", "Content-Encoding": coding})

    async def plain(request: web.Request) -> web.Response:
        asked.append(request.headers.get("Accept-Encoding", ""))
        return web.Response(body=JPEG, content_type="image/jpeg")

    app = web.Application()
    for path in BODIES:
        app.router.add_get(path, encoded)
    app.router.add_get("/cat.jpg", plain)
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("images.test", PUBLIC).configure_cert(tls)
    runner = web.AppRunner(app)
    await runner.setup()
    ports = []
    for ctx in (None, tls):
        site = web.TCPSite(runner, PUBLIC, 0, ssl_context=ctx)
        await site.start()
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    yield Server(f"http://{PUBLIC}:{ports[0]}", f"https://images.test:{ports[1]}", ca, asked)
    await runner.cleanup()


async def fetch(server: Server, path: str, *, https: bool = True) -> bytes:
    with server.ca.cert_pem.tempfile() as ca_file:
        s = WorkerSettings(
            url_schemes=["https", "http"],
            url_allowed_networks=[f"{PUBLIC}/32"],
            url_ca_file=ca_file,
            max_image_bytes=CAP,
            fetch_retry_s=0.5,
        )
        resolve, _ = fake_dns({"images.test": [[PUBLIC]]})
        charged: list[int] = []
        async with WebFetcher(s, resolve) as w:
            data = await w.fetch(f"{server.https if https else server.http}{path}", charged.append)
        assert charged[-1] == len(data)  # the job's budget counts the decoded bytes
        return data


async def test_identity_is_asked_for(server: Server) -> None:
    assert await fetch(server, "/cat.jpg") == JPEG
    assert server.asked == ["identity"]


@pytest.mark.parametrize("path", ["/gzip.jpg", "/deflate.jpg", "/raw-deflate.jpg"])
@pytest.mark.parametrize("https", [True, False], ids=["https", "http"])
async def test_a_compressed_body_sent_anyway_is_decoded(server: Server, path: str, https: bool) -> None:
    assert await fetch(server, path, https=https) == JPEG


@pytest.mark.parametrize(
    ("path", "code", "says"),
    [
        ("/bomb.jpg", ErrorCode.IMAGE_TOO_LARGE, f"over {CAP} bytes"),
        ("/brotli.jpg", ErrorCode.IMAGE_FETCH_FAILED, "Content-Encoding 'br'"),
        ("/broken.jpg", ErrorCode.IMAGE_CORRUPT, "does not decode"),
    ],
)
async def test_what_cannot_be_decoded_within_the_limit_is_typed(
    server: Server, path: str, code: ErrorCode, says: str
) -> None:
    assert len(BODIES[path][1]) < CAP
    with pytest.raises(VlmqError) as err:
        await fetch(server, path)
    assert err.value.code is code and says in err.value.message, err.value
