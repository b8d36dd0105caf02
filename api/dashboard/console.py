"""The console's own records and reads: job lists (core/joblist.py over the indexes the
scripts keep), the audit log of every action, and long actions run in the background with
their progress in Redis (any replica's page shows it).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog

from vlmq.api.records import P, Tenant
from vlmq.core import joblist
from vlmq.core.state import StateStore
from vlmq.core.topology import AnyRedis
from vlmq.producer.builders import batch_job_id
from vlmq.schemas import keys
from vlmq.schemas.job import JobState, Result

log = structlog.get_logger("vlmq.dashboard")
AUDIT = f"{P}:audit"  # list, newest first: every action of every tenant (what admins see)
AUDIT_KEPT = 10_000
KEEP_S = 30 * 24 * 3600  # an action's progress record, and a tenant's audit list, live this long
OPEN_SCAN = 10  # pages of open jobs read at most for one page of queued (or running) ones
STATE_FILTERS = ("queued", "running", "succeeded", "failed", "cancelled", "expired")


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class JobQuery(msgspec.Struct, frozen=True, kw_only=True):
    """What a job list shows: a state, an error code (failed jobs), jobs submitted within
    [since, until] (ISO times, UTC), or the one job an id or custom_id names."""

    state: str = ""
    code: str = ""
    since: str = ""
    until: str = ""
    q: str = ""
    cursor: str = ""

    def bucket(self) -> str:
        if self.code:
            return f"e.{self.code}"
        if self.state in ("queued", "running"):
            return "open"
        return self.state if self.state in STATE_FILTERS else "all"

    def window(self) -> joblist.Window:
        return joblist.Window(_when(self.since, -math.inf), _when(self.until, math.inf), self.cursor)


def _when(text: str, default: float) -> float:
    try:
        at = datetime.fromisoformat(text) if text else None
    except ValueError:
        return default
    if at is None:
        return default
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


class JobPage(msgspec.Struct):
    rows: list[Result]
    next: str | None = None
    scanned_out: bool = False  # a queued/running filter read its bound without filling the page


async def job_page(store: StateStore, group: str, q: JobQuery, limit: int) -> JobPage:
    """One page of the job list `group` (keys.index_group): O(page), whatever its length."""
    if q.q:
        return JobPage(await _search(store, group, q.q.strip()))
    want = q.state if q.state in ("queued", "running") else None
    rows: list[Result] = []
    cursor = q.cursor
    for _ in range(OPEN_SCAN if want else 1):
        w = msgspec.structs.replace(q.window(), cursor=cursor)
        entries, nxt = await joblist.page(store.redis, group, q.bucket(), w, limit)
        got = await store.get_many([j for _, j in entries])
        rows += [
            r for r in got if r is not None and in_group(r, group) and (want is None or r.state.value == want)
        ]
        if nxt is None:
            return JobPage(rows[:limit])
        cursor = nxt
        if len(rows) >= limit:
            break
    return JobPage(rows, cursor, scanned_out=len(rows) < limit)


async def _search(store: StateStore, group: str, text: str) -> list[Result]:
    """The job whose id is `text`, or (in a batch) whose custom_id or key is: its id is
    derived from the two (producer/bulk.py), so no scan."""
    ids = [text]
    if group.startswith("b:"):
        ids.append(batch_job_id(group[2:], text))
    out: list[Result] = []
    for r in await store.get_many(ids):
        if r is not None and in_group(r, group) and r.job_id not in {o.job_id for o in out}:
            out.append(r)
    return out


def in_group(r: Result, group: str) -> bool:
    """Whether a job belongs to a list: an index may name any id (a producer writes it), so
    every row is checked against the job's own record."""
    return keys.index_group(r.batch_id, r.metadata.get(keys.CACHE_SCOPE_FIELD)) == group


# -- audit ----------------------------------------------------------------------------------


class Entry(msgspec.Struct, kw_only=True, omit_defaults=True):
    at: float
    who: str  # the API key's tenant (an operator's key is named for its holder)
    admin: bool = False
    action: str  # cancel-batch, retry-batch, cancel-job, retry-job, pause, resume, drain
    target: str  # the batch, job or worker acted on
    jobs: list[str] = []  # the jobs acted on, the first AUDIT_JOBS of them
    n: int = 0  # how many jobs in all (a background action: as it ended)
    outcome: str = ""
    action_id: str = ""  # a background action's progress record


AUDIT_JOBS = 20
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(Entry)


def _tenant_audit(tenant: str) -> str:
    return f"{AUDIT}:{tenant}"


async def audit(redis: AnyRedis, t: Tenant, action: str, target: str, **fields: Any) -> None:
    """Write down who did what, when, to which jobs: in the log every admin reads and in
    the tenant's own."""
    jobs = list(fields.pop("jobs", []))
    entry = Entry(
        at=time.time(),
        who=t.name,
        admin=t.admin,
        action=action,
        target=target,
        jobs=jobs[:AUDIT_JOBS],
        **fields,
    )
    raw = _enc.encode(entry)
    pipe = redis.pipeline(transaction=False)
    for key in (AUDIT, _tenant_audit(t.name)):
        pipe.lpush(key, raw)
        pipe.ltrim(key, 0, AUDIT_KEPT - 1)
    pipe.expire(_tenant_audit(t.name), KEEP_S)
    await pipe.execute()
    log.info("console action", who=t.name, action=action, target=target, n=entry.n, outcome=entry.outcome)


async def audit_log(redis: AnyRedis, t: Tenant, start: int, limit: int) -> list[Entry]:
    key = AUDIT if t.admin else _tenant_audit(t.name)
    return [_dec.decode(r) for r in await redis.lrange(key, start, start + limit - 1)]


# -- background actions ---------------------------------------------------------------------


class Progress(msgspec.Struct, kw_only=True):
    id: str
    kind: str
    target: str
    who: str
    state: str = "running"  # running, done, failed
    total: int = 0
    done: int = 0
    resent: int = 0
    skipped: int = 0
    unreadable: int = 0
    started_at: float = 0.0
    updated_at: float = 0.0
    error: str = ""

    @property
    def stalled(self) -> bool:
        """No word for a minute: its replica stopped (running it again is safe)."""
        return self.state == "running" and time.time() - self.updated_at > 60


def _action_key(action_id: str) -> str:
    return f"{P}:action:{action_id}"


async def progress(redis: AnyRedis, action_id: str) -> Progress | None:
    raw = await redis.get(_action_key(action_id))
    return msgspec.json.decode(raw, type=Progress) if raw else None


Work = Callable[[Callable[[Progress], Awaitable[None]], Progress], Awaitable[None]]


class Actions:
    """Long actions (retry a batch's failed jobs) run as tasks of this replica; their
    progress is written as they go, so a page anywhere shows it."""

    def __init__(self, redis: AnyRedis) -> None:
        self.redis = redis
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, kind: str, target: str, who: str, total: int, work: Work) -> Progress:
        now = time.time()
        p = Progress(
            id=secrets.token_hex(8),
            kind=kind,
            target=target,
            who=who,
            total=total,
            started_at=now,
            updated_at=now,
        )
        await self._save(p)
        task = asyncio.create_task(self._run(p, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return p

    async def _save(self, p: Progress) -> None:
        p.updated_at = time.time()
        await self.redis.set(_action_key(p.id), msgspec.json.encode(p), ex=KEEP_S)

    async def _run(self, p: Progress, work: Work) -> None:
        try:
            await work(self._save, p)
            p.state = "done"
        except Exception as exc:  # Redis or Kafka failed under it: said on its page
            log.warning("console action failed", action=p.kind, target=p.target, error=repr(exc))
            p.state, p.error = "failed", f"{type(exc).__name__}: {exc}"[:500]
        await self._save(p)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def visible_job(t: Tenant, r: Result, batch_visible: bool) -> bool:
    """A batch job: as its batch is; an online request: its tenant's (and admins')."""
    if r.batch_id:
        return batch_visible
    return t.admin or r.metadata.get(keys.CACHE_SCOPE_FIELD) == t.name


def can_cancel(r: Result) -> bool:
    return r.state in (JobState.QUEUED, JobState.RUNNING)
