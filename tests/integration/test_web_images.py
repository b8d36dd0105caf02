"""Images by URL against real local HTTP and HTTPS servers: what must work works (TLS with
the host name checked, redirects, retries, presigned S3 URLs) and every server-side
request forgery and abuse ends as a typed failure before anything internal is reached.

The "public" servers listen on 127.0.0.2 (exempt through `url_allowed_networks`); the
"internal" one on 127.0.0.1 counts the requests that reach it: none may. Host names come
from a test resolver, so a name can resolve to anything, and change its answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import trustme
from aiohttp import web

from tests.helpers import Env, start_worker
from tests.integration.test_bulk import _openai_line, vlmq
from vlmq.schemas.errors import ErrorCode, VlmqError
from vlmq.worker.embeds import safetensors_file
from vlmq.worker.samples import clip, photo
from vlmq.worker.settings import WorkerSettings
from vlmq.worker.web import WebFetcher

JPEG = photo(seed=1, w=64, h=48)
CLIP = clip(seconds=1)
EMBEDS = safetensors_file(bytes(4 * 8 * 4), (4, 8))
PUBLIC, INTERNAL = "127.0.0.2", "127.0.0.1"


@dataclass
class Servers:
    http: str  # http://127.0.0.2:port
    https_port: int
    internal: str  # http://127.0.0.1:port
    internal_hits: list[str]
    ca: trustme.CA
    calls: dict[str, int] = field(default_factory=dict)


def routes(hits: list[str], flaky: dict[str, int]) -> web.Application:
    async def image(_: web.Request) -> web.Response:
        return web.Response(body=JPEG, content_type="image/jpeg")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    async def hops(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        raise web.HTTPFound(f"/hops/{n - 1}" if n > 1 else "/cat.jpg")  # n redirects in all

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await resp.prepare(request)
        for b in JPEG:
            await resp.write(bytes([b]))
            await asyncio.sleep(0.3)
        return resp

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        if "length" in request.query:
            resp.content_length = 10 * 1024 * 1024
        await resp.prepare(request)
        await resp.write(JPEG[:3])
        for _ in range(200):
            await resp.write(b"\0" * 64 * 1024)
        return resp

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]))

    async def flaky_image(request: web.Request) -> web.Response:
        key = request.path
        flaky[key] = flaky.get(key, 0) + 1
        if flaky[key] <= 2:
            return web.Response(status=503)
        return web.Response(body=JPEG, content_type="image/jpeg")

    async def html(_: web.Request) -> web.Response:
        return _html("text/html")

    async def lying(_: web.Request) -> web.Response:
        return _html("image/jpeg")

    async def secret(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=JPEG, content_type="image/jpeg")

    async def movie(_: web.Request) -> web.Response:
        return web.Response(body=CLIP, content_type="video/mp4")

    async def not_a_movie(_: web.Request) -> web.Response:
        return web.Response(body=JPEG, content_type="video/mp4")

    async def embeds(_: web.Request) -> web.Response:
        return web.Response(body=EMBEDS, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/cat.jpg", image)
    app.router.add_get("/clip.mp4", movie)
    app.router.add_get("/e.safetensors", embeds)
    app.router.add_get("/photo.mp4", not_a_movie)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/hops/{n}", hops)
    app.router.add_get("/slow.jpg", slow)
    app.router.add_get("/big.jpg", big)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/flaky.jpg", flaky_image)
    app.router.add_get("/html", html)
    app.router.add_get("/lying.jpg", lying)
    app.router.add_get("/{tail:.*}", secret)
    return app


def _html(content_type: str) -> web.Response:
    return web.Response(body=b"<html><body>not an image</body></html>", content_type=content_type)


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    ca = trustme.CA()
    cert = ca.issue_cert("images.test", PUBLIC)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(tls)
    hits: list[str] = []
    flaky: dict[str, int] = {}
    runners = []
    ports = []
    for host, ctx in ((PUBLIC, None), (PUBLIC, tls), (INTERNAL, None)):
        runner = web.AppRunner(routes(hits, flaky))
        await runner.setup()
        site = web.TCPSite(runner, host, 0, ssl_context=ctx)
        await site.start()
        runners.append(runner)
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    yield Servers(f"http://{PUBLIC}:{ports[0]}", ports[1], f"http://{INTERNAL}:{ports[2]}", hits, ca)
    for runner in runners:
        await runner.cleanup()


def fake_dns(
    answers: dict[str, list[list[str]]],
) -> tuple[Callable[[str], Awaitable[list[str]]], dict[str, int]]:
    """A resolver: each name's answers in turn (the last one repeats), and how often asked."""
    asked: dict[str, int] = {}

    async def resolve(host: str) -> list[str]:
        n = asked[host] = asked.get(host, 0) + 1
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")  # as getaddrinfo
        seq = answers[host]
        return seq[min(n, len(seq)) - 1]

    return resolve, asked


async def fetch(
    servers: Servers,
    url: str,
    dns: dict[str, list[list[str]]] | None = None,
    kind: str = "image",
    **settings: Any,
) -> bytes:
    with servers.ca.cert_pem.tempfile() as ca_file:
        s = WorkerSettings(
            url_schemes=settings.pop("url_schemes", ["https", "http"]),
            url_allowed_networks=[f"{PUBLIC}/32"],
            url_ca_file=ca_file,
            fetch_retry_s=settings.pop("fetch_retry_s", 3.0),
            **settings,
        )
        resolve, _ = fake_dns(dns or {"images.test": [[PUBLIC]]})
        async with WebFetcher(s, resolve) as w:
            return await w.fetch(url, lambda _: None, kind=kind)


async def refused(code: ErrorCode, coro: Awaitable[bytes]) -> str:
    with pytest.raises(VlmqError) as err:
        await coro
    assert err.value.code is code, err.value
    return err.value.message


async def test_https_with_the_host_checked_and_http_when_enabled(servers: Servers) -> None:
    assert await fetch(servers, f"https://images.test:{servers.https_port}/cat.jpg") == JPEG
    assert await fetch(servers, f"https://{PUBLIC}:{servers.https_port}/cat.jpg") == JPEG
    assert await fetch(servers, f"{servers.http}/hops/3") == JPEG  # three redirects: the default
    assert await fetch(servers, f"{servers.http}/flaky.jpg") == JPEG  # 503, 503, then the image
    await refused(ErrorCode.URI_NOT_ALLOWED, fetch(servers, f"{servers.http}/cat.jpg", url_schemes=["https"]))
    # A certificate for another name: TLS refuses it (the pinned address does not weaken it).
    dns = {"other.test": [[PUBLIC]]}
    msg = await refused(
        ErrorCode.IMAGE_FETCH_FAILED,
        fetch(servers, f"https://other.test:{servers.https_port}/cat.jpg", dns, fetch_retry_s=0.2),
    )
    assert "certificate" in msg.lower() or "ssl" in msg.lower()


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/secret",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[::1]:{port}/secret",
        "http://[::ffff:127.0.0.1]:{port}/secret",
        "http://0.0.0.0:{port}/secret",
        "http://10.0.0.1/secret",
        "http://100.100.100.200/latest/meta-data",
        "http://[fd00:ec2::254]/latest/meta-data",
        "http://224.0.0.1/secret",
    ],
)
async def test_redirects_to_internal_addresses_are_refused(servers: Servers, target: str) -> None:
    port = servers.internal.rsplit(":", 1)[1]
    to = target.format(port=port)
    await refused(ErrorCode.URI_NOT_ALLOWED, fetch(servers, f"{servers.http}/redirect?to={to}"))
    await refused(ErrorCode.URI_NOT_ALLOWED, fetch(servers, to))  # and asked for directly
    assert servers.internal_hits == []


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("ten.test", ["10.1.2.3"]),
        ("loop.test", ["127.0.0.1"]),
        ("mapped.test", ["::ffff:127.0.0.1"]),
        ("v6.test", ["::1"]),
        ("ula.test", ["fd12:3456::1"]),
        ("linklocal.test", ["fe80::1"]),
        ("metadata.test", ["169.254.169.254"]),
        ("mixed.test", [PUBLIC, "10.0.0.7"]),  # one bad answer refuses the name
    ],
)
async def test_names_that_resolve_to_internal_addresses_are_refused(
    servers: Servers, name: str, answer: list[str]
) -> None:
    port = servers.internal.rsplit(":", 1)[1]
    msg = await refused(
        ErrorCode.URI_NOT_ALLOWED, fetch(servers, f"http://{name}:{port}/x.jpg", {name: [answer]})
    )
    assert "non-public" in msg
    assert servers.internal_hits == []


async def test_dns_rebinding_changes_nothing(servers: Servers) -> None:
    """The name answers a public address when checked, then 127.0.0.1: the connection goes
    to the checked address, and the name is looked up once per hop."""
    port = servers.http.rsplit(":", 1)[1]
    with servers.ca.cert_pem.tempfile() as ca_file:
        s = WorkerSettings(url_schemes=["http"], url_allowed_networks=[f"{PUBLIC}/32"], url_ca_file=ca_file)
        resolve, asked = fake_dns({"rebind.test": [[PUBLIC], [INTERNAL]]})
        async with WebFetcher(s, resolve) as w:
            assert await w.fetch(f"http://rebind.test:{port}/cat.jpg", lambda _: None) == JPEG
    assert asked == {"rebind.test": 1} and servers.internal_hits == []


async def test_videos_and_embeddings_by_url_are_checked_for_their_kind(servers: Servers) -> None:
    base = f"https://images.test:{servers.https_port}"
    assert await fetch(servers, f"{base}/clip.mp4", kind="video") == CLIP
    assert await fetch(servers, f"{base}/e.safetensors", kind="image_embeds") == EMBEDS
    await refused(ErrorCode.IMAGE_CORRUPT, fetch(servers, f"{base}/clip.mp4"))  # video/mp4 is no image
    not_a_video = await refused(ErrorCode.IMAGE_CORRUPT, fetch(servers, f"{base}/photo.mp4", kind="video"))
    assert "does not start like a video" in not_a_video
    await refused(ErrorCode.IMAGE_CORRUPT, fetch(servers, f"{base}/cat.jpg", kind="image_embeds"))
    too_long = fetch(servers, f"{base}/clip.mp4", kind="video", max_video_bytes=100)
    await refused(ErrorCode.IMAGE_TOO_LARGE, too_long)
    assert servers.internal_hits == []


async def test_abuse_ends_as_typed_failures(servers: Servers) -> None:
    h = servers.http
    await refused(ErrorCode.URI_NOT_ALLOWED, fetch(servers, f"{h}/hops/4"))  # past url_max_redirects
    await refused(ErrorCode.URI_NOT_ALLOWED, fetch(servers, f"{h}/hops/1", url_max_redirects=0))
    slow = fetch(servers, f"{h}/slow.jpg", url_timeout_s=1.0, fetch_retry_s=0.5)
    assert "TimeoutError" in await refused(ErrorCode.IMAGE_FETCH_FAILED, slow)
    cap = 1024 * 1024
    await refused(ErrorCode.IMAGE_TOO_LARGE, fetch(servers, f"{h}/big.jpg?length=1", max_image_bytes=cap))
    await refused(ErrorCode.IMAGE_TOO_LARGE, fetch(servers, f"{h}/big.jpg", max_image_bytes=cap))
    await refused(ErrorCode.IMAGE_CORRUPT, fetch(servers, f"{h}/html"))
    await refused(ErrorCode.IMAGE_CORRUPT, fetch(servers, f"{h}/lying.jpg"))
    await refused(ErrorCode.IMAGE_NOT_FOUND, fetch(servers, f"{h}/status/404"))
    await refused(ErrorCode.IMAGE_ACCESS_DENIED, fetch(servers, f"{h}/status/403"))
    await refused(ErrorCode.IMAGE_FETCH_FAILED, fetch(servers, f"{h}/status/500", fetch_retry_s=0.3))
    await refused(ErrorCode.IMAGE_NOT_FOUND, fetch(servers, "http://nowhere.test/x.jpg"))
    userinfo = h.replace("http://", "http://user:pw@") + "/cat.jpg"
    await refused(ErrorCode.URI_NOT_ALLOWED, fetch(servers, userinfo))
    tls_url = f"https://images.test:{servers.https_port}/cat.jpg"
    await refused(ErrorCode.URI_NOT_ALLOWED, fetch(servers, tls_url, url_allowed_hosts=[".example.com"]))
    assert await fetch(servers, tls_url, url_allowed_hosts=["images.test"]) == JPEG
    await refused(ErrorCode.URI_NOT_ALLOWED, fetch(servers, "ftp://images.test/x.jpg"))
    assert servers.internal_hits == []


async def test_a_presigned_s3_url(env: Env) -> None:
    s3 = boto3.client("s3", endpoint_url=env.s3)
    s3.put_object(Bucket=env.bucket, Key="cat.jpg", Body=JPEG, ContentType="image/jpeg")
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": env.bucket, "Key": "cat.jpg"}, ExpiresIn=300
    )
    host = url.split("/")[2].split(":")[0]
    s = WorkerSettings(url_schemes=["http"], url_allowed_networks=[f"{host}/32"])
    async with WebFetcher(s) as w:
        assert await w.fetch(url, lambda _: None) == JPEG
    missing = s3.generate_presigned_url("get_object", Params={"Bucket": env.bucket, "Key": "no.jpg"})
    async with WebFetcher(s) as w:
        with pytest.raises(VlmqError) as err:
            await w.fetch(missing, lambda _: None)
    assert err.value.code is ErrorCode.IMAGE_NOT_FOUND
    assert "Signature" not in err.value.message  # errors never show the query (the signature)


@contextlib.contextmanager
def serving(cert: trustme.LeafCert) -> Iterator[int]:
    """The image routes over HTTPS on 127.0.0.2, in a thread of their own (the test's own
    code is blocking: it runs the CLI and a worker process)."""
    loop = asyncio.new_event_loop()
    started: concurrent.futures.Future[tuple[web.AppRunner, int]] = concurrent.futures.Future()

    async def start() -> None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(tls)
        runner = web.AppRunner(routes([], {}))
        await runner.setup()
        site = web.TCPSite(runner, PUBLIC, 0, ssl_context=tls)
        await site.start()
        started.set_result((runner, site._server.sockets[0].getsockname()[1]))  # type: ignore[union-attr]

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop)
    runner, port = started.result(10)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_an_openai_batch_file_with_https_images_runs_end_to_end(e: Env, tmp_path: Path) -> None:
    """`vlmq bulk submit --openai` takes https:// URLs with no flag; the worker, told which
    CA to trust and that 127.0.0.2 counts as public here, fetches them; a URL that
    redirects inside fails that request alone, with its code."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with serving(ca.issue_cert(PUBLIC)) as port:
        base = f"https://{PUBLIC}:{port}"
        lines = [_openai_line(f"req-{i}", f"{base}/cat.jpg?v={i}") for i in range(3)]
        lines.append(_openai_line("inside", f"{base}/redirect?to=http://127.0.0.1:{port}/secret"))
        src = tmp_path / "batch.jsonl"
        src.write_text("\n".join(lines) + "\n")
        vlmq(e, "bulk", "submit", e.tag, "--openai", str(src))
        start_worker(
            e, "w", url_allowed_networks=f"{PUBLIC}/32", url_ca_file=str(ca_file), url_schemes="https,http"
        )
        vlmq(e, "bulk", "watch", e.tag, "--timeout", "60")
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    vlmq(e, "bulk", "export", e.tag, "--out", str(out), "--format", "openai", "--errors", str(err))
    done = {json.loads(x)["custom_id"] for x in out.read_text().splitlines()}
    failed = {json.loads(x)["custom_id"]: json.loads(x) for x in err.read_text().splitlines()}
    assert done == {"req-0", "req-1", "req-2"}
    assert failed["inside"]["response"]["body"]["error"]["code"] == "uri_not_allowed"
