"""The dashboard's pages: server-rendered Jinja2, live by htmx polling (a page asks for
its own live fragment every few seconds; no build step, one vendored script).

Auth is the API's keys: a login form opens a server-side session (Redis keeps it; the
browser holds only its random id, in an HttpOnly, SameSite=Strict cookie, `Secure` over
TLS or behind a proxy that says `X-Forwarded-Proto: https`), or a client sends
`Authorization: Bearer`. Every state-changing request made with the cookie must come from
the dashboard's own origin (`Origin`/`Sec-Fetch-Site`, else 403): no other site can act
through a logged-in browser. A tenant's key sees its own OpenAI batches; an admin key (`vlmq api key create
NAME --admin`) sees every batch and the workers. Read-only keys see, never act. Anything
not visible answers 404, as if it did not exist.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import msgspec
import structlog
from fastapi import Depends, FastAPI, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from vlmq.api.dashboard.console import (
    STATE_FILTERS,
    Actions,
    JobQuery,
    Progress,
    audit,
    audit_log,
    can_cancel,
    job_page,
    progress,
    visible_job,
)
from vlmq.api.dashboard.data import SUMMARIES, BatchRow, Board, RetryReport
from vlmq.api.dashboard.thumbs import Thumbs
from vlmq.api.objects import TERMINAL
from vlmq.api.records import P, Records, Tenant
from vlmq.api.settings import ApiSettings
from vlmq.core import workers
from vlmq.producer.bulk import export
from vlmq.producer.client import Client
from vlmq.schemas import keys
from vlmq.schemas.errors import ErrorCode
from vlmq.schemas.job import Job, JobState, Result, TextPart

log = structlog.get_logger("vlmq.dashboard")
HERE = Path(__file__).parent
COOKIE = "vlmq_session"
PAGE = 25
AUDIT_PAGE = 50
CODES = sorted(c.value for c in ErrorCode)
ENDED = f"{P}:ended"  # zset: batch_id -> when the sampler saw it end (it samples it no more)
SORTS = {
    "created": lambda r: -r.created_at,
    "progress": lambda r: r.done_pct,
    "failed": lambda r: -r.counts.failed,
    "rate": lambda r: -r.rate,
}
STATES = ("queued", "running", "completed", "cancelling", "cancelled", "failed", "expired", "in_progress")
templates = Jinja2Templates(directory=HERE / "templates")


class Login(Exception):
    """No valid key: the page sends the browser to the login form."""


class Missing(Exception):
    """Not there, or not the caller's: both look the same."""


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "—"


def _fmt_span(s: float | None) -> str:
    if s is None:
        return "—"
    s = int(s)
    return f"{s // 3600}h {s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def _fmt_ms(s: float | None) -> str:
    return f"{s * 1000:.1f} ms" if s is not None else "—"


def _prompt(job: Job | None) -> str:
    if job is None:
        return ""
    text = " ".join(p.text for m in job.messages for p in m.parts if isinstance(p, TextPart))
    return text if len(text) <= 300 else text[:300] + "…"


def _flash(done: str) -> str:
    """The one-line report of the action a page was sent back to after."""
    kind, _, rest = done.partition("-")
    if kind == "retry":
        sent, _, skipped = rest.partition("-")
        return f"Retry: {sent} failed job(s) sent again, {skipped or 0} could not be (see the log)."
    if kind == "cancel":
        return "Cancel requested: queued jobs end cancelled, running ones are aborted."
    if done == "no-retry-openai":
        return "An OpenAI batch is final once it completes: resubmit its failed lines as a new batch."
    if done == "no-retry-cancelled":
        return "The batch was cancelled: its failed jobs are not retried."
    return _FLASH.get(done, "") or (
        "Retry: the job was sent again."
        if done == "job-retry-1"
        else "Retry: the job could not be sent again (see the log)."
        if done == "job-retry-0"
        else ""
    )


_FLASH = {
    "no-cancel-ended": "The batch has ended: there is nothing to cancel (its failed jobs stay retryable).",
    "job-cancel": "Cancel requested: the job ends cancelled if it had not ended.",
    "no-retry-not-failed": "Only a failed job can be retried.",
    "no-retry-online": "An online request's caller has its answer already: it is not retried.",
    "worker-pause": "Pause sent: the worker takes no new jobs (its row says paused once it has).",
    "worker-resume": "Resume sent: the worker takes jobs again.",
    "worker-drain": "Drain sent: the worker finishes its jobs and stops.",
}


templates.env.filters.update(time=_fmt_time, span=_fmt_span, ms=_fmt_ms, prompt=_prompt, flash=_flash)


class Dashboard:
    def __init__(self, settings: ApiSettings, client: Client, records: Records) -> None:
        self.s = settings
        self.board = Board(client, records, settings.dlq_topic)
        self.thumbs = Thumbs(settings)
        self.actions = Actions(client.redis)

    async def run_sampler(self) -> None:
        """Forever, on the replica that holds the sampler's lease: one point per running
        batch every `sample_s`. A pass that fails is logged and tried again."""
        while True:
            try:
                if await self.board.records.lease("~sampler", self.s.replica_id, self.s.sample_s * 3):
                    await self._sample_pass()
            except Exception as exc:  # Redis away: the next pass tries again
                log.warning("sampler pass failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.s.sample_s)

    async def _sample_pass(self) -> None:
        redis = self.board.records.redis
        ended = {_s(b) for b in await redis.zrange(ENDED, 0, -1)}
        indexed = await self.board.store.batches()
        for batch_id, created_at in indexed:
            if batch_id in ended:
                continue
            if (await self.board.sample(batch_id, created_at)).ended:  # until a retry reopens it
                await redis.zadd(ENDED, {batch_id: time.time()})
        await redis.zremrangebyscore(ENDED, "-inf", time.time() - self.board.store.ttl_s)
        gone = {_s(b) for b in await redis.hkeys(SUMMARIES)} - {b for b, _ in indexed}
        if gone:  # batches whose jobs expired have left the index: their summaries go too
            await redis.hdel(SUMMARIES, *gone)

    async def close(self) -> None:
        await self.actions.close()
        await self.board.close()
        await self.thumbs.close()


def _trace_url(template: str | None, trace_id: str | None) -> str | None:
    """The job's trace in the operator's tracing UI (`trace_url`, `{trace_id}` replaced)."""
    return template.replace("{trace_id}", trace_id) if template and trace_id else None


def mount(app: FastAPI, dash: Dashboard) -> None:
    """The dashboard's routes under /dashboard, and its error pages."""
    app.mount("/dashboard/static", StaticFiles(directory=HERE / "static"), name="dashboard-static")

    @app.exception_handler(Login)
    async def to_login(request: Request, _: Login) -> Response:
        return RedirectResponse(f"/dashboard/login?next={quote(request.url.path)}", 303)

    @app.exception_handler(CrossOrigin)
    async def cross_origin(request: Request, _: CrossOrigin) -> Response:
        return Response("cross-origin request refused", status_code=403, media_type="text/plain")

    @app.exception_handler(Missing)
    async def missing(request: Request, _: Missing) -> Response:
        return page(request, "missing.html", {}, 404)

    _pages(app, dash)
    _actions(app, dash)


def page(
    request: Request, name: str, ctx: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> HTMLResponse:
    return templates.TemplateResponse(request, name, ctx, status_code=status, headers=headers)


async def viewer(request: Request) -> Tenant:
    records: Records = request.app.state.ctx.records
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and bearer.strip():
        found = await records.tenant(bearer.strip())
    else:
        session = request.cookies.get(COOKIE, "")
        found = await records.session_tenant(session) if session else None
    if found is None:
        raise Login()
    return found


class CrossOrigin(Exception):
    """A state-changing request from another origin through the browser's cookie."""


def same_origin(request: Request) -> None:
    """Refuse a cookie-borne request that another site made (CSRF): browsers say where a
    request comes from (`Sec-Fetch-Site`, `Origin`, else `Referer`), and a script cannot
    forge those. A bearer-key client sends no cookie and is not a browser: not checked."""
    if request.headers.get("authorization", "").lower().startswith("bearer "):
        return
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise CrossOrigin()
    source = request.headers.get("origin") or request.headers.get("referer")
    if source is None:
        return  # neither header: not a browser's cross-site form or fetch
    hosts = {request.headers.get("host", ""), request.headers.get("x-forwarded-host", "")} - {""}
    if source == "null" or urlsplit(source).netloc not in hosts:
        raise CrossOrigin()


def over_tls(request: Request) -> bool:
    """Served over https, directly or behind a proxy that says so: the cookie gets `Secure`."""
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or proto == "https"


async def actor(request: Request, t: Annotated[Tenant, Depends(viewer)]) -> Tenant:
    same_origin(request)
    if not t.may_write:
        raise Missing()  # a read-only key has no buttons; a forged post finds nothing
    return t


Viewer = Annotated[Tenant, Depends(viewer)]
Actor = Annotated[Tenant, Depends(actor)]


def _pages(app: FastAPI, dash: Dashboard) -> None:
    board = dash.board

    @app.get("/dashboard/login", response_class=HTMLResponse)
    async def login_form(request: Request, next: str = "/dashboard/batches", failed: int = 0) -> Response:
        return page(request, "login.html", {"next": next, "failed": failed})

    @app.post("/dashboard/login")
    async def login(
        request: Request, key: Annotated[str, Form()], next: Annotated[str, Form()] = ""
    ) -> Response:
        same_origin(request)
        records: Records = request.app.state.ctx.records
        target = next if next.startswith("/dashboard/") else "/dashboard/batches"
        session = await records.open_session(key.strip(), dash.s.session_s)
        if session is None:
            return RedirectResponse(f"/dashboard/login?failed=1&next={quote(target)}", 303)
        out = RedirectResponse(target, 303)
        out.set_cookie(
            COOKIE,
            session,
            max_age=dash.s.session_s,
            httponly=True,
            samesite="strict",
            secure=over_tls(request),
        )
        return out

    @app.post("/dashboard/logout")
    async def logout(request: Request) -> Response:
        same_origin(request)
        if session := request.cookies.get(COOKIE):
            await request.app.state.ctx.records.close_session(session)
        out = RedirectResponse("/dashboard/login", 303)
        out.delete_cookie(COOKIE)
        return out

    @app.get("/dashboard")
    async def home() -> Response:
        return RedirectResponse("/dashboard/batches", 303)

    @app.get("/dashboard/batches", response_class=HTMLResponse)
    async def batches(
        request: Request, t: Viewer, state: str = "", sort: str = "created", page_no: int = 1
    ) -> Response:
        rows = await board.rows(t)
        if state in STATES:
            rows = [r for r in rows if r.status == state]
        rows.sort(key=SORTS.get(sort, SORTS["created"]))
        pages = max(1, -(-len(rows) // PAGE))
        page_no = min(max(page_no, 1), pages)
        ctx = {
            "t": t,
            "rows": rows[(page_no - 1) * PAGE : page_no * PAGE],
            "state": state,
            "sort": sort,
            "page_no": page_no,
            "pages": pages,
            "states": STATES,
            "sorts": list(SORTS),
        }
        live = request.headers.get("hx-request") == "true"
        return page(request, "_batches_table.html" if live else "batches.html", ctx)

    @app.get("/dashboard/batches/{batch_id}", response_class=HTMLResponse)
    async def batch(request: Request, batch_id: str, t: Viewer, done: str = "") -> Response:
        """O(1) in the batch's size: its counters (per shard), its series and its record."""
        row = await _visible_row(board, t, batch_id)
        ctx = {
            "t": t,
            "b": row,
            "groups": board.failures(row.counts),
            "chart": _chart(await board.samples(batch_id)),
            "done": done,
        }
        if request.headers.get("hx-request") == "true":
            # htmx stops polling on 286: an ended batch has nothing more to show.
            return page(request, "_batch_live.html", ctx, 286 if row.ended else 200)
        return page(request, "batch.html", ctx)

    @app.get("/dashboard/batches/{batch_id}/jobs", response_class=HTMLResponse)
    async def batch_jobs(
        request: Request, batch_id: str, t: Viewer, q: Annotated[JobQuery, Depends(_query)]
    ) -> Response:
        row = await _visible_row(board, t, batch_id)
        found = await job_page(board.store, keys.index_group(batch_id, None), q, PAGE)
        ctx = {
            "t": t,
            "b": row,
            "q": q,
            "p": found,
            "codes": sorted(row.counts.by_code),
            "states": STATE_FILTERS,
        }
        return page(request, "jobs.html", ctx)

    @app.get("/dashboard/online", response_class=HTMLResponse)
    async def online_jobs(
        request: Request, t: Viewer, q: Annotated[JobQuery, Depends(_query)], tenant: str | None = None
    ) -> Response:
        """Jobs outside any batch (online requests), a tenant's own; an admin picks the tenant."""
        who = tenant if t.admin and tenant is not None else t.name
        found = await job_page(board.store, keys.index_group(None, who), q, PAGE)
        ctx = {"t": t, "b": None, "q": q, "p": found, "codes": CODES, "states": STATE_FILTERS, "tenant": who}
        return page(request, "jobs.html", ctx)

    @app.get("/dashboard/audit", response_class=HTMLResponse)
    async def audit_page(request: Request, t: Viewer, start: int = 0) -> Response:
        start = max(start, 0)
        entries = await audit_log(board.records.redis, t, start, AUDIT_PAGE)
        return page(request, "audit.html", {"t": t, "entries": entries, "start": start, "size": AUDIT_PAGE})

    @app.get("/dashboard/actions/{action_id}", response_class=HTMLResponse)
    async def action(request: Request, action_id: str, t: Viewer) -> Response:
        p = await progress(board.records.redis, action_id)
        if p is None or (p.who != t.name and not t.admin):
            raise Missing()
        if request.headers.get("hx-request") == "true":
            return page(request, "_action_live.html", {"t": t, "a": p}, 200 if p.state == "running" else 286)
        return page(request, "action.html", {"t": t, "a": p})

    @app.get("/dashboard/confirm", response_class=HTMLResponse)
    async def confirm(request: Request, t: Viewer, action: str, target: str, code: str = "") -> Response:
        """What an action will do, and one button to do it: every action asks first."""
        if not t.may_write:
            raise Missing()
        ctx = {"t": t, **await _what(dash, t, action, target, code)}
        return page(request, "confirm.html", ctx)

    @app.get("/dashboard/jobs/{job_id}", response_class=HTMLResponse)
    async def job(request: Request, job_id: str, t: Viewer, done: str = "") -> Response:
        view = await board.job(job_id)
        if view is None or not await _sees_job(board, t, view.result):
            raise Missing()
        ctx = {
            "t": t,
            "v": view,
            "history": _history(view),
            "done": done,
            "can_cancel": can_cancel(view.result),
            "trace_url": _trace_url(dash.s.trace_url, view.result.trace_id),
        }
        ctx["can_retry"] = await _retryable(board, view.result) is None
        return page(request, "job.html", ctx)

    @app.get("/dashboard/jobs/{job_id}/images/{n}")
    async def thumbnail(job_id: str, n: int, t: Viewer) -> Response:
        view = await board.job(job_id)
        if view is None or not await _sees_job(board, t, view.result):
            raise Missing()
        refs = view.job.images if view.job is not None else []
        body, media = await dash.thumbs.get(refs[n] if 0 <= n < len(refs) else None)
        return Response(body, media_type=media, headers={"cache-control": "private, max-age=300"})

    @app.get("/dashboard/workers", response_class=HTMLResponse)
    async def workers(request: Request, t: Viewer, done: str = "") -> Response:
        if not t.admin:
            raise Missing()
        beats = await board.workers()
        try:
            lag = await board.lag(dash.s.worker_group, dash.s.jobs_topic)
        except Exception as exc:  # Kafka away: the page still shows the workers
            log.warning("lag unavailable", error=f"{type(exc).__name__}: {exc}")
            lag = []
        ctx = {"t": t, "beats": beats, "lag": lag, "now": time.time(), "done": done}
        live = request.headers.get("hx-request") == "true"
        return page(request, "_workers_live.html" if live else "workers.html", ctx)


def _actions(app: FastAPI, dash: Dashboard) -> None:
    board = dash.board

    @app.post("/dashboard/batches/{batch_id}/cancel")
    async def cancel(batch_id: str, t: Actor, confirm: Annotated[str, Form()] = "") -> Response:
        row = await _visible_row(board, t, batch_id)
        if confirm != "yes":
            return _ask("cancel-batch", batch_id)
        back = f"/dashboard/batches/{quote(batch_id)}"
        if row.ended or row.status in TERMINAL:  # it would only make its failures unretryable
            await audit(board.records.redis, t, "cancel-batch", batch_id, outcome=f"refused: {row.status}")
            return RedirectResponse(f"{back}?done=no-cancel-ended", 303)
        found = await board.records.batch(batch_id) if row.openai else None
        if found is not None:  # as OpenAI's cancel route does: its driver winds it down
            tenant, b = found
            cancelling = msgspec.structs.replace(b, status="cancelling", cancelling_at=int(time.time()))
            await board.records.move(tenant, cancelling, ("validating", "in_progress"))
        else:
            await board.cancel(batch_id)
        left = row.counts.total - row.counts.finished
        await audit(board.records.redis, t, "cancel-batch", batch_id, n=left, outcome="requested")
        return RedirectResponse(f"{back}?done=cancel", 303)

    @app.post("/dashboard/batches/{batch_id}/retry")
    async def retry(
        batch_id: str, t: Actor, code: Annotated[str, Form()] = "", confirm: Annotated[str, Form()] = ""
    ) -> Response:
        row = await _visible_row(board, t, batch_id)
        if row.openai or row.cancelled:
            why = "openai" if row.openai else "cancelled"
            return RedirectResponse(f"/dashboard/batches/{quote(batch_id)}?done=no-retry-{why}", 303)
        if confirm != "yes":
            return _ask("retry-batch", batch_id, code)
        total = row.counts.by_code.get(code, 0) if code else row.counts.failed

        async def work(save: Callable[[Progress], Awaitable[None]], p: Progress) -> None:
            async def step(report: RetryReport) -> None:
                p.resent, p.skipped, p.unreadable = report.resent, report.skipped, report.unreadable
                p.done = report.resent + report.skipped + report.unreadable
                await save(p)

            await board.retry(batch_id, code or None, step)
            await board.records.redis.zrem(ENDED, batch_id)

        p = await dash.actions.start("retry-batch", f"{batch_id} {code}".strip(), t.name, total, work)
        await audit(
            board.records.redis,
            t,
            "retry-batch",
            batch_id,
            n=total,
            outcome=code or "all failed",
            action_id=p.id,
        )
        return RedirectResponse(f"/dashboard/actions/{p.id}", 303)

    @app.post("/dashboard/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str, t: Actor, confirm: Annotated[str, Form()] = "") -> Response:
        r = await _actionable_job(board, t, job_id)
        if confirm != "yes":
            return _ask("cancel-job", job_id)
        reply = await board.store.cancel(job_id)
        outcome = (
            "requested"
            if reply.requested
            else f"not running: {reply.ended.value if reply.ended else 'missing'}"
        )
        await audit(
            board.records.redis, t, "cancel-job", r.batch_id or "online", jobs=[job_id], n=1, outcome=outcome
        )
        return RedirectResponse(f"/dashboard/jobs/{quote(job_id)}?done=job-cancel", 303)

    @app.post("/dashboard/jobs/{job_id}/retry")
    async def retry_job(job_id: str, t: Actor, confirm: Annotated[str, Form()] = "") -> Response:
        r = await _actionable_job(board, t, job_id)
        if (why := await _retryable(board, r)) is not None:
            return RedirectResponse(f"/dashboard/jobs/{quote(job_id)}?done=no-retry-{why}", 303)
        if confirm != "yes":
            return _ask("retry-job", job_id)
        report = RetryReport()
        await board.retry_jobs([r], report)
        outcome = "sent again" if report.resent else "not sent (see the log)"
        await audit(
            board.records.redis, t, "retry-job", r.batch_id or "", jobs=[job_id], n=1, outcome=outcome
        )
        await board.records.redis.zrem(ENDED, r.batch_id or "")
        return RedirectResponse(f"/dashboard/jobs/{quote(job_id)}?done=job-retry-{report.resent}", 303)

    @app.post("/dashboard/workers/{worker}/{what}")
    async def control(worker: str, what: str, t: Actor, confirm: Annotated[str, Form()] = "") -> Response:
        if not t.admin or what not in workers.COMMANDS:
            raise Missing()
        if confirm != "yes":
            return _ask(what, worker)
        await workers.command(board.records.redis, worker, what)
        await audit(board.records.redis, t, what, worker, outcome="sent")
        return RedirectResponse(f"/dashboard/workers?done=worker-{what}", 303)

    @app.get("/dashboard/batches/{batch_id}/export")
    async def export_batch(batch_id: str, t: Viewer, format: str = "jsonl") -> Response:
        await _visible_row(board, t, batch_id)
        openai = format == "openai"

        async def lines() -> AsyncIterator[bytes]:
            buf = io.BytesIO()
            batch: list[Any] = []
            async for r in board.store.iter_batch(batch_id):
                batch.append(r)
                if len(batch) >= 500:
                    yield await _export(batch, buf, openai)
                    batch = []
            yield await _export(batch, buf, openai)

        name = f"{batch_id}{'-openai' if openai else ''}.jsonl"
        headers = {"content-disposition": f'attachment; filename="{quote(name)}"'}
        return StreamingResponse(lines(), media_type="application/jsonl", headers=headers)


async def _export(results: list[Any], buf: io.BytesIO, openai: bool) -> bytes:
    async def each() -> AsyncIterator[Any]:
        for r in results:
            yield r

    buf.seek(0)
    buf.truncate()
    await export(each(), buf, openai=openai)
    return buf.getvalue()


def _ask(action: str, target: str, code: str = "") -> Response:
    """An action posted without its confirmation: to the page that asks for it."""
    extra = f"&code={quote(code)}" if code else ""
    return RedirectResponse(f"/dashboard/confirm?action={action}&target={quote(target)}{extra}", 303)


def _query(
    state: str = "", code: str = "", since: str = "", until: str = "", q: str = "", cursor: str = ""
) -> JobQuery:
    bounded = [v[:200] for v in (state, code, since, until, q, cursor)]  # outside fields have bounds
    return JobQuery(**dict(zip(("state", "code", "since", "until", "q", "cursor"), bounded, strict=True)))


async def _sees_job(board: Board, t: Tenant, r: Result) -> bool:
    return visible_job(t, r, bool(r.batch_id) and await board.visible(t, r.batch_id or ""))


async def _actionable_job(board: Board, t: Tenant, job_id: str) -> Result:
    r = await board.store.get(job_id)
    if r is None or not await _sees_job(board, t, r):
        raise Missing()
    return r


async def _retryable(board: Board, r: Result) -> str | None:
    """Why this job cannot be retried here, or None: only a failed job of a bulk batch
    that was not cancelled (an OpenAI batch's results are final; an online caller has its
    answer already)."""
    if r.state is not JobState.FAILED:
        return "not-failed"
    if not r.batch_id:
        return "online"
    if await board.records.batch(r.batch_id) is not None:
        return "openai"
    if await board.store.batch_cancelled(r.batch_id):
        return "cancelled"
    return None


async def _what(dash: Dashboard, t: Tenant, action: str, target: str, code: str) -> dict[str, Any]:
    """The confirmation page's words and form for an action (404 for what `t` cannot act on)."""
    board = dash.board
    if action in ("cancel-batch", "retry-batch"):
        row = await _visible_row(board, t, target)
        url = f"/dashboard/batches/{quote(target)}/{action.removesuffix('-batch')}"
        if action == "cancel-batch":
            left = row.counts.total - row.counts.finished
            what = f"Cancel batch {target}: its {left} unfinished job(s) end cancelled."
        else:
            n = row.counts.by_code.get(code, 0) if code else row.counts.failed
            which = f" with error {code}" if code else ""
            what = f"Retry the {n} failed job(s){which} of batch {target}, in the background."
        return {"what": what, "url": url, "code": code, "back": f"/dashboard/batches/{quote(target)}"}
    if action in ("cancel-job", "retry-job"):
        r = await _actionable_job(board, t, target)
        verb = "Cancel" if action == "cancel-job" else "Retry"
        what = (
            f"{verb} job {target} ({r.state.value}{f', batch {r.batch_id}' if r.batch_id else ', online'})."
        )
        url = f"/dashboard/jobs/{quote(target)}/{action.removesuffix('-job')}"
        return {"what": what, "url": url, "code": "", "back": f"/dashboard/jobs/{quote(target)}"}
    if action in workers.COMMANDS and t.admin:
        what = {
            "pause": f"Pause worker {target}: it takes no new jobs; those it holds go on.",
            "resume": f"Resume worker {target}: it takes jobs again.",
            "drain": f"Drain worker {target}: it finishes the jobs it holds, then stops.",
        }[action]
        return {
            "what": what,
            "url": f"/dashboard/workers/{quote(target, safe='')}/{action}",
            "code": "",
            "back": "/dashboard/workers",
        }
    raise Missing()


async def _visible_row(board: Board, t: Tenant, batch_id: str) -> BatchRow:
    if not await board.visible(t, batch_id):
        raise Missing()
    created = await board.store.redis.zscore(keys.BATCHES_KEY, batch_id)
    row = await board.row(batch_id, float(created or 0))
    if not row.counts.total and not row.openai:
        raise Missing()
    return row


def _chart(samples: list[Any], width: int = 640, height: int = 160) -> dict[str, Any]:
    """Throughput and failures per interval as SVG polylines (no chart library)."""
    points = [
        (
            b.at,
            (b.finished - a.finished) / max(b.at - a.at, 1e-6),
            (b.failed - a.failed) / max(b.at - a.at, 1e-6),
        )
        for a, b in itertools.pairwise(samples)
    ]
    if not points:
        return {"ok": [], "bad": [], "peak": 0.0, "width": width, "height": height, "span": 0}
    t0, t1 = points[0][0], points[-1][0]
    peak = max(*(p[1] for p in points), 1e-6)

    def xy(t: float, v: float) -> str:
        x = (t - t0) / max(t1 - t0, 1e-6) * width
        return f"{x:.1f},{height - v / peak * (height - 10):.1f}"

    return {
        "ok": " ".join(xy(t, v) for t, v, _ in points),
        "bad": " ".join(xy(t, f) for t, _, f in points),
        "peak": peak,
        "width": width,
        "height": height,
        "span": t1 - t0,
    }


def _history(v: Any) -> list[tuple[str, float | None, str]]:
    """The job's states with when they happened, from its records and its dead letter."""
    r, tm = v.result, v.result.timings
    out: list[tuple[str, float | None, str]] = [("queued", tm.submitted_at if tm else None, "submitted")]
    if v.dead is not None and v.fields.get("retries"):
        out.append(("failed", v.dead.at, f"{v.dead.error.code.value}: {v.dead.error.message}"))
        out.append(("retried", None, f"retry {v.fields['retries']}"))
    if tm and tm.started_at:
        out.append(("running", tm.started_at, f"attempt {r.attempt} on {r.worker or '?'}"))
    if r.state.terminal:
        why = f"{r.error.code.value}: {r.error.message}" if r.error else ""
        out.append((r.state.value, tm.finished_at if tm else None, why))
    return out
