"""The dashboard as a person uses it: Debian's Chromium driven by Playwright against a real
`vlmq api` (the dashboard on), tansu, redis-server, moto_server and fake-engine workers.
Any error in a page's console, or an uncaught script error, fails the test.

Set VLMQ_SCREENSHOTS=docs/dashboard to refresh the screenshots the docs show."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx2 as httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.helpers import Env, put_images, start_worker, stop_worker
from tests.integration.test_api import Api, line, start_batch, wait_status
from vlmq.core.settings import Connection
from vlmq.producer import Client
from vlmq.producer.builders import caption

T = TypeVar("T")
# As the machine's probe starts it: no sandbox as root, nothing reaching out to the network.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser(e: Env) -> Iterator[Browser]:
    """Chromium, started after the stack's fixtures (Playwright's sync API holds this
    thread's event loop while it runs: asyncio.run must come before it, or off_loop)."""
    exe = os.environ.get("VLMQ_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(exe).exists(), "no Chromium: `make browser` installs Debian's chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=FLAGS)
        yield b
        b.close()


class Console:
    """A page whose console errors and uncaught exceptions are collected."""

    def __init__(self, browser: Browser) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.set_default_timeout(30_000)

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"errors in the browser console: {self.errors}"


@pytest.fixture
def console(browser: Browser) -> Iterator[Callable[[], Console]]:
    made: list[Console] = []

    def new() -> Console:
        made.append(Console(browser))
        return made[-1]

    yield new
    for c in made:
        c.close()


def shot(page: Page, name: str) -> None:
    """A screenshot for the docs, when asked for (VLMQ_SCREENSHOTS=docs/dashboard)."""
    if out := os.environ.get("VLMQ_SCREENSHOTS"):
        Path(out).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=f"{out}/{name}.png", full_page=True)


def login(page: Page, base: str, key: str) -> None:
    page.goto(f"{base}/dashboard/batches")
    page.fill("input[name=key]", key)
    page.click("form.login button")
    page.wait_for_url(f"{base}/dashboard/batches")


def off_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end: in a thread, as Playwright's sync API holds this one's loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def in_thread(fn: Callable[..., T], *args: Any) -> T:
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def until(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return got


def number(page: Page, testid: str) -> int:
    return int(page.get_by_test_id(testid).first.inner_text())


def submit(e: Env, batch: str, n: int, flaky_every: int = 0) -> None:
    uris = put_images(e, n, prefix=batch, w=320, h=240)
    jobs = [
        caption(
            uri,
            job_id=f"{batch}-{i}",
            batch_id=batch,
            prompt="a flaky caption" if flaky_every and i % flaky_every == 0 else "describe the photo",
            max_tokens=8,
        )
        for i, uri in enumerate(uris)
    ]

    async def go() -> None:
        client = Client(settings=_conn(e))
        try:
            await client.submit_many(jobs)
        finally:
            await client.close()

    off_loop(go())


def terminal_writes(e: Env, job_ids: list[str]) -> Counter[int]:
    async def go() -> Counter[int]:
        client = Client(settings=_conn(e))
        try:
            return Counter([await client.store.terminal_writes(j) for j in job_ids])
        finally:
            await client.close()

    return off_loop(go())


def _conn(e: Env) -> Connection:
    return Connection.load(
        {
            "kafka_bootstrap": e.kafka,
            "redis_url": e.redis,
            "redis_topology": e.topology,
            "jobs_topic": e.jobs_topic,
            "dlq_topic": e.dlq_topic,
        }
    )


def test_an_operator_watches_retries_and_cancels(e: Env, console: Callable[[], Console]) -> None:
    """Every console action, each through its confirmation page and into the audit log."""
    api = Api(e, sample_s=0.5, worker_group=e.group)
    base = api.start().removesuffix("/v1")
    admin = _admin_key(api)
    flaky = start_worker(e, "flaky", engine_args="fail_on=flaky,step_ms=25,max_num_seqs=2", heartbeat_s=1)
    batch, n = f"{e.tag}-captions", 40
    submit(e, batch, n, flaky_every=5)

    c = console()
    page = c.page
    login(page, base, admin)
    row = page.locator(f"tr[data-batch='{batch}']")
    first = until(lambda: _progress(row), "progress to start")
    until(lambda: (_progress(row) or 0) > first, "progress to move while the batch runs")
    shot(page, "batches")

    page.click(f"a:text-is('{batch}')")
    until(lambda: page.get_by_test_id("status").inner_text() == "completed", "the first pass to end")
    assert number(page, "failed") == n // 5 and number(page, "succeeded") == n - n // 5
    group = page.locator(".group[data-code='engine_error']")
    assert group.get_by_test_id("group-count").inner_text() == str(n // 5)
    assert page.get_by_test_id("cancel").is_disabled()  # ended: a cancel would only block retries
    late = httpx.post(
        f"{base}/dashboard/batches/{batch}/cancel", data={"confirm": "yes"}, headers=_bearer(admin)
    )  # a stale page's or a script's: refused, audited, and the failures stay retryable
    assert late.status_code == 303 and late.headers["location"].endswith("done=no-cancel-ended")
    _stops_polling(page)
    shot(page, "batch-failures")

    group.get_by_test_id("group-jobs").click()  # the failed jobs of that code, a page of them
    rows = page.locator("table.jobs tbody tr")
    assert rows.count() == n // 5 and "engine_error" in rows.first.inner_text()
    shot(page, "jobs")
    stop_worker(flaky)  # the fix is deployed: then the failed items are retried
    start_worker(e, "fixed", engine_args="step_ms=25,max_num_seqs=2", heartbeat_s=1)
    one = page.locator(f"tr[data-job='{batch}-0']")
    one.get_by_test_id("job-retry").click()
    assert f"Retry job {batch}-0" in page.get_by_test_id("what").inner_text()
    page.get_by_test_id("confirm").click()
    assert "sent again" in page.get_by_test_id("flash").inner_text()
    until(
        lambda: page.reload() and page.get_by_test_id("state").inner_text() == "succeeded", "the retried job"
    )

    page.goto(f"{base}/dashboard/batches/{batch}")
    page.get_by_test_id("retry").click()
    assert f"Retry the {n // 5 - 1} failed job(s)" in page.get_by_test_id("what").inner_text()
    page.get_by_test_id("confirm").click()  # runs in the background: its progress page
    until(lambda: page.get_by_test_id("action-state").inner_text() == "done", "the background retry")
    assert number(page, "action-resent") == n // 5 - 1 and number(page, "action-done") == n // 5 - 1
    page.goto(f"{base}/dashboard/batches/{batch}")
    until(
        lambda: number(page, "succeeded") == n and number(page, "failed") == 0, "the retried items to succeed"
    )
    writes = terminal_writes(e, [f"{batch}-{i}" for i in range(n)])
    assert writes == Counter({1: n - n // 5, 2: n // 5})  # one more terminal write each, exactly
    shot(page, "batch-retried")

    page.goto(f"{base}/dashboard/jobs/{batch}-0")  # it failed first (every 5th is flaky)
    assert page.get_by_test_id("state").inner_text() == "succeeded"
    assert "retried 1×" in page.inner_text("main") and "engine_error" in page.inner_text("main")
    shot(page, "job")

    slow = f"{e.tag}-backlog"
    submit(e, slow, 80)
    page.goto(f"{base}/dashboard/batches/{slow}/jobs?state=queued")
    queued = page.locator("table.jobs tbody tr").last  # the oldest queued job: the next page has more
    victim = queued.get_attribute("data-job") or ""
    queued.get_by_test_id("job-cancel").click()
    page.get_by_test_id("confirm").click()
    assert "Cancel requested" in page.get_by_test_id("flash").inner_text()
    until(
        lambda: page.reload() and page.get_by_test_id("state").inner_text() == "cancelled",
        "the one job's cancel",
    )

    page.goto(f"{base}/dashboard/batches/{slow}")
    until(lambda: number(page, "succeeded") > 0, "the backlog to start")
    page.get_by_test_id("cancel").click()
    page.get_by_test_id("confirm").click()
    until(lambda: page.get_by_test_id("status").inner_text() == "cancelled", "the cancel to stop the batch")
    assert number(page, "cancelled") > 1 and number(page, "queued") == 0 and number(page, "running") == 0
    done = number(page, "succeeded")
    time.sleep(1)
    assert number(page, "succeeded") == done  # nothing more runs

    page.goto(f"{base}/dashboard/workers")
    until(lambda: page.locator("tr[data-worker='fixed']").count() == 1, "the live worker")
    assert page.locator("tr[data-worker='flaky']").count() == 0  # stopped: gone at once
    fixed = page.locator("tr[data-worker='fixed']")
    for action, shown in (("pause", "paused"), ("resume", "running")):
        fixed.get_by_test_id(action).click()
        page.get_by_test_id("confirm").click()
        until(lambda: fixed.get_by_test_id("control").inner_text() == shown, f"the worker {shown}")  # noqa: B023
    shot(page, "workers")
    fixed.get_by_test_id("drain").click()
    page.get_by_test_id("confirm").click()
    until(lambda: fixed.count() == 0, "the drained worker to stop")

    page.goto(f"{base}/dashboard/audit")
    actions = [r.get_attribute("data-action") for r in page.locator("table.audit tbody tr").all()]
    assert actions == [
        *(
            "drain",
            "resume",
            "pause",
            "cancel-batch",
            "cancel-job",
            "retry-batch",
            "retry-job",
            "cancel-batch",
        )
    ]
    assert "refused: completed" in page.locator("table.audit tbody tr").last.inner_text()
    assert f"ops-{e.tag}" in page.inner_text("table.audit") and victim in page.inner_text("table.audit")
    shot(page, "audit")
    c.close()


def _stops_polling(page: Page) -> None:
    """An ended batch's page asks for nothing more (htmx stops on the 286 it gets)."""
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if r.headers.get("hx-request") else None)
    page.reload()
    time.sleep(2.5)
    assert asked == [] and page.get_by_test_id("live").get_attribute("data-polling") == "no"


def _admin_key(api: Api) -> str:
    from vlmq.api.records import Records
    from vlmq.core.topology import connect_redis

    async def go() -> str:
        redis = connect_redis(_conn(api.e))
        try:
            return await Records(redis).create_key(f"ops-{api.e.tag}", "write", admin=True)
        finally:
            await redis.aclose()

    return off_loop(go())


def _progress(row: Any) -> int | None:
    if row.count() == 0:
        return None
    return int(row.locator("progress").get_attribute("value") or 0)


def test_a_tenant_sees_only_its_own(e: Env, console: Callable[[], Console], tmp_path: Path) -> None:
    api = Api(e, sample_s=0.5, batch_window=2)  # lines go in a window at a time
    base = api.start().removesuffix("/v1")
    start_worker(e, "w", engine_args="step_ms=1")
    acme = in_thread(api.client, base + "/v1", "acme")
    uris = put_images(e, 5, w=64, h=48)
    b = start_batch(acme, tmp_path, [line(f"req-{i}", uris[i]) for i in range(5)])
    wait_status(acme, b.id, {"completed"})
    time.sleep(1)  # the sampler's next pass (its summary is what the list shows)

    c = console()
    login(c.page, base, acme.api_key)
    row = c.page.locator(f"tr[data-batch='{b.id}']")
    until(lambda: row.count() == 1, "acme's own batch")
    assert "OpenAI" in row.inner_text() and "completed" in row.inner_text()
    assert _progress(row) == 5 and row.locator("progress").get_attribute("max") == "5"  # not 2/2
    c.page.click(f"a:text-is('{b.id}')")
    assert number(c.page, "succeeded") == 5
    api_said = in_thread(acme.batches.retrieve, b.id).request_counts
    assert api_said is not None and (api_said.total, api_said.completed, api_said.failed) == (5, 5, 0)
    assert c.page.get_by_test_id("api-counts").inner_text() == "5 requests · 5 completed · 0 failed"
    c.page.get_by_test_id("jobs-link").click()
    assert (
        c.page.locator("table.jobs tbody tr").count() == 5 and c.page.get_by_test_id("job-retry").count() == 0
    )
    c.page.fill("input[name=q]", "req-3")  # a custom_id finds its request
    c.page.get_by_test_id("apply").click()
    assert c.page.locator("table.jobs tbody tr").count() == 1 and "req-3" in c.page.inner_text("table.jobs")
    answer = in_thread(lambda: acme.chat.completions.create(**json.loads(line("online"))["body"]))
    c.page.goto(f"{base}/dashboard/online")  # jobs outside batches: acme's online request
    online = c.page.locator("table.jobs tbody tr")
    assert online.count() == 1 and answer.id.removeprefix("chatcmpl-") in online.inner_text()
    assert c.page.get_by_test_id("retry").count() == 0  # OpenAI batches are final once completed
    c.close()

    other = in_thread(api.key, "globex")
    c = console()
    login(c.page, base, other)
    assert c.page.get_by_test_id("no-batches").is_visible()
    assert c.page.locator("a:text-is('Workers')").count() == 0
    c.page.goto(f"{base}/dashboard/online?tenant=acme")  # not an admin: its own, whatever it asks
    assert c.page.get_by_test_id("no-jobs").is_visible()
    c.close()

    reader = in_thread(api.key, "acme", "read")
    c = console()
    login(c.page, base, reader)
    c.page.goto(f"{base}/dashboard/batches/{b.id}")
    assert c.page.get_by_test_id("cancel").count() == 0 and "read-only" in c.page.inner_text("header")
    c.close()

    job_id = _a_job_of(e, b.id)
    for path in (
        f"/dashboard/batches/{b.id}",
        f"/dashboard/jobs/{job_id}",
        f"/dashboard/jobs/{job_id}/images/0",
        f"/dashboard/batches/{b.id}/export?format=openai",
        "/dashboard/workers",
    ):
        got = httpx.get(base + path, headers=_bearer(other), follow_redirects=False)
        assert got.status_code == 404 and b.id not in got.text, path
        raw_key = httpx.get(base + path, cookies={"vlmq_session": acme.api_key}, follow_redirects=False)
        assert raw_key.status_code == 303, path  # a cookie holds a session id, never a key
    for path in (f"/dashboard/batches/{b.id}/cancel", f"/dashboard/batches/{b.id}/retry"):
        assert httpx.post(base + path, headers=_bearer(other)).status_code == 404
        assert httpx.post(base + path, headers=_bearer(reader)).status_code == 404
    assert httpx.get(base + "/dashboard/batches", follow_redirects=False).status_code == 303  # no key


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _a_job_of(e: Env, batch_id: str) -> str:
    async def go() -> str:
        client = Client(settings=_conn(e))
        try:
            async for r in client.store.iter_batch(batch_id):
                return r.job_id
            raise AssertionError("the batch has no ended job")
        finally:
            await client.close()

    return off_loop(go())
