"""The API's records in Redis: API keys and tenants, file and batch objects, leases, the
online queue. Jobs themselves stay where they always are (core/state.py).

Every key is `vlmq:{api}:<kind>:<id>`: one hash tag, so on a Redis Cluster all of them
share a slot and the few multi-key scripts here are single-slot. They are small (one
record per file and per batch, not per request); the per-request keys of a batch's jobs
spread over the cluster as before.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import msgspec

from vlmq.api.objects import TERMINAL, Batch, FileObject, Page
from vlmq.core.topology import AnyRedis

P = "vlmq:{api}"
# zset: "<replica>/<online job id>" -> when its lease runs out (renewed while it waits)
ONLINE = f"{P}:online"
Scope = Literal["read", "write"]
T = TypeVar("T", FileObject, Batch)

# Status compare-and-set: a batch moves on only from the status its writer read, so two
# replicas (a cancel on one, the driver on another) never overwrite each other's move.
_TRANSITION = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st or not string.find(',' .. ARGV[1] .. ',', ',' .. st .. ',', 1, true) then return 0 end
local delta, limit = tonumber(ARGV[6]), tonumber(ARGV[7])
if delta > 0 and limit > 0 and tonumber(redis.call('HGET', KEYS[3], 'queued') or '0') + delta > limit then
  return -1
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'obj', ARGV[3])
if ARGV[4] == '1' then redis.call('SREM', KEYS[2], ARGV[5]) end
if delta ~= 0 then redis.call('HINCRBY', KEYS[3], 'queued', delta) end
return 1
"""
# A tenant's quota: add `n` to a counter unless that would pass the limit (0: none).
_RESERVE = """
local now = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local n, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
if n > 0 and limit > 0 and now + n > limit then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], n)
return 1
"""
# Take a batch's lease, or renew it when this replica holds it.
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# One more online request, unless `limit` are waiting already (entries whose lease ran out,
# a dead replica's, leave first).
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
return 1
"""


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def hash_key(api_key: str) -> str:
    # The keys are 32 random bytes: a plain hash cannot be brute-forced, no salt needed.
    return hashlib.sha256(api_key.encode()).hexdigest()


class Tenant(msgspec.Struct, frozen=True):
    name: str
    scope: Scope
    admin: bool = False  # an operator's key: every batch (bulk ones too) and the workers

    @property
    def may_write(self) -> bool:
        return self.scope == "write"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Records:
    def __init__(self, redis: AnyRedis, bucket: str = "") -> None:
        self.redis = redis
        # The batches not yet ended whose files live in `bucket`: what this deployment
        # drives (another deployment on the same Redis has its own bucket and batches).
        self.active_key = f"{P}:active:{bucket}"
        self._transition = redis.register_script(_TRANSITION)
        self._reserve = redis.register_script(_RESERVE)
        self._lease = redis.register_script(_LEASE)
        self._admit = redis.register_script(_ADMIT)

    # -- API keys ------------------------------------------------------------------------

    async def create_key(self, tenant: str, scope: Scope = "write", admin: bool = False) -> str:
        """A new API key for `tenant`; only its hash is stored, so this is the one time it is seen."""
        api_key = f"sk-vlmq-{secrets.token_urlsafe(32)}"
        await self.redis.hset(
            f"{P}:key:{hash_key(api_key)}",
            mapping={"tenant": tenant, "scope": scope, "admin": int(admin), "created_at": int(time.time())},
        )
        return api_key

    async def revoke_key(self, api_key: str) -> bool:
        return bool(await self.redis.delete(f"{P}:key:{hash_key(api_key)}"))

    async def tenant(self, api_key: str) -> Tenant | None:
        return await self._tenant_of(hash_key(api_key))

    async def _tenant_of(self, key_hash: str) -> Tenant | None:
        row = await self.redis.hgetall(f"{P}:key:{key_hash}")
        if not row:
            return None
        r = {_s(k): _s(v) for k, v in row.items()}
        return Tenant(r["tenant"], "write" if r.get("scope") == "write" else "read", r.get("admin") == "1")

    # -- dashboard sessions: the browser holds a random id, never the key -------------------

    async def open_session(self, api_key: str, ttl_s: int) -> str | None:
        """A session for a valid key: its id (random, shown once; Redis keeps its hash and
        the key's hash). Revoking the key ends its sessions too. None for an unknown key."""
        if await self.tenant(api_key) is None:
            return None
        session = secrets.token_urlsafe(32)
        await self.redis.set(f"{P}:session:{hash_key(session)}", hash_key(api_key), ex=ttl_s)
        return session

    async def session_tenant(self, session: str) -> Tenant | None:
        key_hash = await self.redis.get(f"{P}:session:{hash_key(session)}")
        return await self._tenant_of(_s(key_hash)) if key_hash else None

    async def close_session(self, session: str) -> None:
        await self.redis.delete(f"{P}:session:{hash_key(session)}")

    async def reserve(self, tenant: str, counter: str, n: int, limit: int) -> bool:
        """Count `n` more against the tenant's `counter` unless it would pass `limit`."""
        return bool(await self._reserve(keys=[f"{P}:usage:{tenant}"], args=[counter, n, limit]))

    async def release(self, tenant: str, counter: str, n: int) -> None:
        await self.redis.hincrby(f"{P}:usage:{tenant}", counter, -n)

    # -- objects (files and batches) -----------------------------------------------------

    async def put_file(self, tenant: str, obj: FileObject, s3_key: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(
            f"{P}:file:{obj.id}",
            mapping={"obj": msgspec.json.encode(obj), "tenant": tenant, "s3_key": s3_key},
        )
        pipe.zadd(f"{P}:files:{tenant}", {obj.id: obj.created_at})
        if obj.expires_at:
            pipe.zadd(f"{P}:expiring", {f"{tenant}/{obj.id}": obj.expires_at})
        await pipe.execute()

    async def file(self, tenant: str, file_id: str) -> tuple[FileObject, str] | None:
        """The file and its S3 key, if it is this tenant's (another's is as good as missing)."""
        row = await self._row(f"{P}:file:{file_id}", tenant)
        return (msgspec.json.decode(row["obj"], type=FileObject), row["s3_key"]) if row else None

    async def drop_file(self, tenant: str, file_id: str) -> str | None:
        """Remove the record (once, whoever asks twice); its S3 key, to delete the bytes."""
        got = await self.file(tenant, file_id)
        if got is None or not await self.redis.delete(f"{P}:file:{file_id}"):
            return None
        obj, s3_key = got
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(f"{P}:files:{tenant}", file_id)
        pipe.zrem(f"{P}:expiring", f"{tenant}/{file_id}")
        pipe.hincrby(f"{P}:usage:{tenant}", "file_bytes", -obj.bytes)
        await pipe.execute()
        return s3_key

    async def expired_files(self, now: float, limit: int = 100) -> list[tuple[str, str]]:
        """(tenant, file id) of files whose `expires_at` has passed."""
        due = await self.redis.zrangebyscore(f"{P}:expiring", "-inf", now, start=0, num=limit)
        return [tuple(_s(d).split("/", 1)) for d in due]  # type: ignore[misc]

    async def put_batch(self, tenant: str, obj: Batch) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(
            f"{P}:batch:{obj.id}",
            mapping={"obj": msgspec.json.encode(obj), "status": obj.status, "tenant": tenant},
        )
        pipe.zadd(f"{P}:batches:{tenant}", {obj.id: obj.created_at})
        pipe.sadd(self.active_key, obj.id)
        await pipe.execute()

    async def batch(self, batch_id: str, tenant: str | None = None) -> tuple[str, Batch] | None:
        """(tenant, batch); `tenant` given: only that tenant's batch."""
        row = await self._row(f"{P}:batch:{batch_id}", tenant)
        return (row["tenant"], msgspec.json.decode(row["obj"], type=Batch)) if row else None

    async def move(
        self, tenant: str, obj: Batch, came_from: Sequence[str], queued: int = 0, limit: int = 0
    ) -> bool | None:
        """Write `obj` (its new status) if the batch's status is still one of `came_from`;
        `queued` changes the tenant's count of queued requests in the same step, unless
        that passes `limit` (0: none): then nothing is written and the answer is None."""
        done = await self._transition(
            keys=[f"{P}:batch:{obj.id}", self.active_key, f"{P}:usage:{tenant}"],
            args=[
                ",".join(came_from),
                obj.status,
                msgspec.json.encode(obj),
                "1" if obj.status in TERMINAL else "",
                obj.id,
                queued,
                limit,
            ],
        )
        return None if done == -1 else bool(done)

    async def progress(self, batch_id: str) -> dict[str, int]:
        """The driver's own counters of a batch (lines, submitted, next_offset...)."""
        row = await self.redis.hgetall(f"{P}:progress:{batch_id}")
        return {_s(k): int(v) for k, v in row.items()}

    async def set_progress(self, batch_id: str, **fields: int) -> None:
        await self.redis.hset(f"{P}:progress:{batch_id}", mapping=fields)  # type: ignore[arg-type]

    async def active(self) -> list[str]:
        return sorted(_s(b) for b in await self.redis.smembers(self.active_key))

    async def page(
        self, kind: type[T], tenant: str, after: str | None, limit: int, newest_first: bool = True
    ) -> Page:
        """A page of a tenant's files or batches, OpenAI-style: `after` an id, `has_more`."""
        one, many = ("file", "files") if kind is FileObject else ("batch", "batches")
        index = f"{P}:{many}:{tenant}"
        start = 0
        if after:
            rank = await (self.redis.zrevrank if newest_first else self.redis.zrank)(index, after)
            start = 0 if rank is None else int(rank) + 1  # type: ignore[arg-type]  # withscore=False: an int
        window = self.redis.zrevrange if newest_first else self.redis.zrange
        ids = [_s(i) for i in await window(index, start, start + limit)]
        pipe = self.redis.pipeline(transaction=False)
        for i in ids[:limit]:
            pipe.hget(f"{P}:{one}:{i}", "obj")
        objs = [msgspec.json.decode(o, type=kind) for o in await pipe.execute() if o]
        return Page(objs, objs[0].id if objs else None, objs[-1].id if objs else None, len(ids) > limit)

    async def _row(self, key: str, tenant: str | None) -> dict[str, Any] | None:
        row = {_s(k): v for k, v in (await self.redis.hgetall(key)).items()}
        if not row or (tenant is not None and _s(row["tenant"]) != tenant):
            return None
        return {k: (v if k == "obj" else _s(v)) for k, v in row.items()}

    # -- leases and the online queue -----------------------------------------------------

    async def lease(self, batch_id: str, replica: str, lease_s: float) -> bool:
        """Take or renew this replica's lease on driving a batch."""
        return bool(await self._lease(keys=[f"{P}:lease:{batch_id}"], args=[replica, int(lease_s * 1000)]))

    async def admit_online(self, owner: str, job_id: str, lease_s: float, limit: int) -> bool:
        """Take a slot among the fleet's online requests for `lease_s` (renew_online keeps it)."""
        now = time.time()
        return bool(await self._admit(keys=[ONLINE], args=[now, limit, now + lease_s, f"{owner}/{job_id}"]))

    async def renew_online(self, owner: str, job_ids: Sequence[str], lease_s: float) -> None:
        """Push the leases of this replica's waiting requests on (only those still there: XX)."""
        until = time.time() + lease_s
        for i in range(0, len(job_ids), 1000):
            chunk = {f"{owner}/{j}": until for j in job_ids[i : i + 1000]}
            await self.redis.zadd(ONLINE, chunk, xx=True)

    async def online_done(self, owner: str, job_id: str) -> None:
        await self.redis.zrem(ONLINE, f"{owner}/{job_id}")

    async def online_depth(self) -> int:
        """Online requests holding a slot now (leases that ran out do not count)."""
        return int(await self.redis.zcount(ONLINE, time.time(), "+inf"))
