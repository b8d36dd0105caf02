"""Pages of a job list (a batch's jobs, or a tenant's online requests) from the indexes the
scripts keep (keys.index_key: one zset per shard and bucket, scored by submit time).

Newest first: (score, id) descending, as ZREVRANGEBYSCORE returns them, past a cursor
(`score|id`: it still holds while the list grows). On a single Redis a list is one zset per
bucket: a page is one ZREVRANGEBYSCORE, O(log n + page). On a cluster a script may write
only its job's slot, so a list is spread over the 256 shards: a page merges them, each
gives a few ids and only a shard whose every id made the page is asked for more, O(shards
+ page). Either way no read walks the list: a page costs the same at a thousand jobs and at
a million.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
from redis.asyncio import RedisCluster

from vlmq.core.topology import AnyRedis
from vlmq.schemas import keys

Entry = tuple[float, str]  # (submit time, job id)


class Window(msgspec.Struct, frozen=True):
    """Which part of a list: submitted within [since, until], strictly after `cursor`."""

    since: float = -math.inf
    until: float = math.inf
    cursor: str = ""  # "score|job_id" of the last entry of the previous page


def cursor_of(e: Entry) -> str:
    return f"{e[0]!r}|{e[1]}"


def _parse(cursor: str) -> Entry | None:
    score, sep, job_id = cursor.partition("|")
    try:
        return (float(score), job_id) if sep else None
    except ValueError:  # a hand-edited URL: the first page
        return None


def _after(e: Entry, c: Entry | None) -> bool:
    """Whether `e` comes after the cursor in newest-first order (ties: by id, descending,
    compared as bytes like Redis does)."""
    return c is None or e[0] < c[0] or (e[0] == c[0] and e[1].encode() < c[1].encode())


def _order(e: Entry) -> tuple[float, bytes]:
    return (e[0], e[1].encode())


class _Shard:
    def __init__(self, key: str, ask: int) -> None:
        self.key, self.ask = key, ask
        self.got: list[Entry] = []
        self.read = 0  # raw entries read from the top of the window (ties skipped count)
        self.done = False


async def page(
    redis: AnyRedis, group: str, bucket: str, w: Window, limit: int
) -> tuple[list[Entry], str | None]:
    """Up to `limit` entries, newest first, and the cursor of the next page (None: last)."""
    c = _parse(w.cursor)
    top = min(w.until, c[0]) if c else w.until
    shards = [
        _Shard(keys.index_key(s, group, bucket), max(2, 2 * limit // keys.SHARDS + 2))
        for s in range(keys.SHARDS)
    ]
    pending = shards
    while pending:
        pipe = redis.pipeline(transaction=False)
        for sh in pending:
            pipe.zrevrangebyscore(
                sh.key, _bound(top), _bound(w.since), start=sh.read, num=sh.ask, withscores=True
            )
        for sh, rows in zip(pending, await pipe.execute(), strict=True):
            _take(sh, rows, c)
        merged = sorted((e for sh in shards for e in sh.got), key=_order, reverse=True)[: limit + 1]
        cut = _order(merged[-1]) if len(merged) > limit else None
        # A shard whose every entry is in the page may hold more that belong there.
        pending = [
            sh for sh in shards if not sh.done and sh.got and (cut is None or _order(sh.got[-1]) >= cut)
        ]
        pending += [sh for sh in shards if not sh.done and not sh.got]  # all its reads were ties
        for sh in pending:
            sh.ask *= 4
    out = merged[:limit]
    return out, (cursor_of(out[-1]) if len(merged) > limit else None)


def index_shards(redis: AnyRedis) -> range:
    """The shards a job list lives in: one on a single Redis, all of them on a cluster."""
    return range(keys.SHARDS) if isinstance(redis, RedisCluster) else range(1)


def index_shard(redis: AnyRedis, job_id: str) -> int:
    return keys.shard(job_id) if isinstance(redis, RedisCluster) else 0


def _take(sh: _Shard, rows: list[Any], c: Entry | None) -> None:
    sh.read += len(rows)
    sh.done = len(rows) < sh.ask
    for member, score in rows:
        e = (float(score), member.decode() if isinstance(member, bytes) else str(member))
        if _after(e, c):
            sh.got.append(e)


def _bound(v: float) -> str | float:
    return "+inf" if v == math.inf else "-inf" if v == -math.inf else repr(v)
