"""The result cache's Redis side (docs/cache.md): entries, leads, per-scope indexes.

An entry is one hash with a hash tag of its own, so entries spread over a cluster's slots
and every script call here is single-slot. The answer is written by one script after the
job's own terminal write (cache_put.lua), whole or not at all. While an identical job runs,
the entry holds its lead (`leader`, `lead_until`, renewed like a job's lease); jobs that
find a live lead wait for it. Each scope has an index (a zset in its own slot) that bounds
its size; it is bookkeeping: an entry whose index write was lost still expires by its TTL.
Used by the worker (worker/cache.py) and by `vlmq cache stats|purge`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from vlmq.core.scripts import Call, Scripts
from vlmq.core.topology import AnyRedis
from vlmq.schemas import keys
from vlmq.schemas.job import Usage


class Answer(msgspec.Struct, omit_defaults=True):
    """What an entry keeps of a succeeded job: the answer only (never its metadata, ids
    or timings, which are each job's own)."""

    text: str | None = None
    parsed: Any = None
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None


class Hit(msgspec.Struct, frozen=True):
    answer: Answer
    source: str  # the job that produced it
    at: float  # when it was written


class Wait(msgspec.Struct, frozen=True):
    leader: str
    lead_until: float


Lead = Literal["lead"]
Taken = Hit | Wait | Lead

_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder(Answer)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def scope_id(scope: str) -> str:
    """A scope's name as a key part: fixed width, any characters."""
    return hashlib.sha256(scope.encode()).hexdigest()[:32]


def entry_digest(scope: str, request_key: str) -> str:
    """The entry of a request key in a scope: the scope is part of the digest, so two
    scopes never share an entry (nor its lead: no tenant waits on another's job)."""
    return hashlib.sha256(f"{scope_id(scope)}:{request_key}".encode()).hexdigest()


class ScopeStats(msgspec.Struct):
    scope: str
    entries: int
    oldest_s: float | None  # age of the oldest indexed entry
    newest_s: float | None


class CacheStore:
    def __init__(self, redis: AnyRedis, *, ttl_s: int, max_entries: int, lead_s: float) -> None:
        self.redis = redis
        self.scripts = Scripts(redis)
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.lead_s = lead_s

    async def take(self, digest: str, job_id: str) -> Taken:
        """The answer, a lead to wait for, or this job's lead."""
        now = time.time()
        args = [job_id, now, self.lead_s, self.ttl_s]
        reply = await self.scripts.one(Call("cache_take", [keys.cache_entry_key(digest)], args))
        kind = _s(reply[0])
        if kind == "hit":
            return Hit(_DEC.decode(reply[1]), _s(reply[2]), float(reply[3]))
        if kind == "wait":
            return Wait(_s(reply[1]), float(reply[2]))
        return "lead"

    async def put(self, digest: str, scope: str, job_id: str, answer: Answer) -> None:
        """Write the answer (after the job's terminal write), index it in its scope and
        evict what passes the scope's bound: one round trip (two slots, one pipeline)."""
        now = time.time()
        sid = scope_id(scope)
        args = [job_id, _ENC.encode(answer), now, self.ttl_s, keys.CACHE_CHANNEL, digest]
        calls = [
            Call("cache_put", [keys.cache_entry_key(digest)], args),
            Call("cache_index", [keys.cache_index_key(sid)], [digest, now, self.ttl_s, self.max_entries]),
        ]
        replies = await self.scripts.run(calls)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        new, *evicted = replies[1]
        if int(new):  # a new (or purged) scope: list it for `vlmq cache stats|purge`
            await self.redis.hset(keys.CACHE_SCOPES_KEY, sid, scope)
        await self._delete([_s(d) for d in evicted])

    async def drop(self, digest: str, job_id: str) -> bool:
        """Give up this job's lead (it will write no answer): a waiter takes over."""
        args = [job_id, keys.CACHE_CHANNEL, digest]
        return bool(await self.scripts.one(Call("cache_drop", [keys.cache_entry_key(digest)], args)))

    async def renew(self, leads: Sequence[tuple[str, str]]) -> None:
        """Keep the leads (entry digest, job id) of jobs running here."""
        now = time.time()
        calls = [Call("cache_renew", [keys.cache_entry_key(d)], [j, now, self.lead_s]) for d, j in leads]
        for reply in await self.scripts.run(calls):
            if isinstance(reply, BaseException):
                raise reply

    async def _delete(self, digests: Sequence[str]) -> None:
        if not digests:
            return
        pipe = self.redis.pipeline(transaction=False)  # one DEL per key: entries are in many slots
        for d in digests:
            pipe.delete(keys.cache_entry_key(d))
        await pipe.execute()

    async def scopes(self) -> dict[str, str]:
        raw: dict[Any, Any] = await self.redis.hgetall(keys.CACHE_SCOPES_KEY)
        return {_s(k): _s(v) for k, v in raw.items()}

    async def stats(self) -> list[ScopeStats]:
        """Entries per scope (as indexed; expired ones leave the index first)."""
        now = time.time()
        out = []
        for sid, scope in sorted((await self.scopes()).items(), key=lambda kv: kv[1]):
            index = keys.cache_index_key(sid)
            await self.redis.zremrangebyscore(index, "-inf", now - self.ttl_s)
            n = int(await self.redis.zcard(index))
            ends: list[Any] = []
            if n:
                ends = [*await self.redis.zrange(index, 0, 0, withscores=True)]
                ends += await self.redis.zrange(index, -1, -1, withscores=True)
            ages = [round(now - float(score), 1) for _, score in ends]
            out.append(ScopeStats(scope, n, max(ages) if ages else None, min(ages) if ages else None))
        return out

    async def purge(self, scope: str | None = None) -> int:
        """Delete a scope's entries (every scope's when None); returns how many."""
        scopes = await self.scopes()
        chosen = [sid for sid, name in scopes.items() if scope is None or name == scope]
        removed = 0
        for sid in chosen:
            index = keys.cache_index_key(sid)
            members = [_s(m) for m in await self.redis.zrange(index, 0, -1)]
            await self._delete(members)
            await self.redis.delete(index)
            await self.redis.hdel(keys.CACHE_SCOPES_KEY, sid)
            removed += len(members)
        return removed
