"""One Redis client for the configured topology: a single Redis, a Cluster or Sentinel.

Everyone (SDK, CLI, worker, bulk) gets its client here, so `VLMQ_REDIS_TOPOLOGY` is the one
setting that points vlmq at a cluster. The key layout (schemas/keys.py) keeps every script
call inside one slot; the state store groups multi-job calls per slot on a cluster.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import AskError, NoPermissionError, RedisClusterException, ResponseError

from vlmq.core.retry import is_transient
from vlmq.core.settings import Connection, redact_url

AnyRedis = Redis | RedisCluster


class TopologyError(Exception):
    """The Redis at the configured URL is not the configured topology."""


def connect_redis(conn: Connection, **options: Any) -> AnyRedis:
    """The client for `conn.redis_topology`; `options` go to redis-py (timeouts...)."""
    if conn.redis_topology == "cluster":  # several nodes may be named: any one that answers
        first, hosts = _hosts(conn.redis_url)
        nodes = [ClusterNode(h, p) for h, p in hosts]
        return RedisCluster.from_url(first, startup_nodes=nodes, **options)
    if conn.redis_topology == "sentinel":
        return _sentinel_master(conn, options)
    if "," in urlsplit(conn.redis_url).netloc:
        where = redact_url(conn.redis_url)
        raise TopologyError(
            f"VLMQ_REDIS_URL {where} names several hosts: set VLMQ_REDIS_TOPOLOGY=cluster or sentinel"
        )
    return Redis.from_url(conn.redis_url, **options)


def _sentinel_master(conn: Connection, options: dict[str, Any]) -> Redis:
    """`redis_url` names the sentinels (`redis://[user:pw@]host:26379[,host:26379]/db`); the
    master is discovered by `redis_sentinel_master` and re-discovered after a failover."""
    _, sentinels = _hosts(conn.redis_url, default_port=26379)
    parts = urlsplit(conn.redis_url)
    user, _, password = parts.netloc.rpartition("@")[0].partition(":")
    db = int(parts.path.strip("/") or 0)
    auth = {"username": unquote(user) or None, "password": unquote(password) or None}
    ssl = {"ssl": True} if parts.scheme == "rediss" else {}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        sentinels, sentinel_kwargs={**auth, **ssl}, **auth, **ssl, **options
    )
    master: Redis = sentinel.master_for(conn.redis_sentinel_master, db=db)
    return master


def _hosts(url: str, default_port: int = 6379) -> tuple[str, list[tuple[str, int]]]:
    """`redis://[cred@]h1:p1,h2:p2/db` -> (the URL with the first host only, [(h1, p1), ...])."""
    parts = urlsplit(url)
    cred, at, hostlist = parts.netloc.rpartition("@")
    hosts = []
    for h in hostlist.split(","):
        host, _, port = h.rpartition(":") if ":" in h else (h, "", "")
        hosts.append((host, int(port or default_port)))
    first = parts._replace(netloc=f"{cred}{at}{hostlist.split(',')[0]}")
    return first.geturl(), hosts


async def wait_replicas(redis: AnyRedis, conn: Connection) -> int:
    """Replicas that must acknowledge a worker's terminal writes (WAIT) before its Kafka
    commit: `redis_wait_replicas` when set (refused in one line if a master has fewer),
    else 1 when every master has a replica and 0 when one has none."""
    fewest = await _fewest_replicas(redis)
    wanted = conn.redis_wait_replicas
    if wanted is None:
        if fewest is None:  # INFO refused to this user: go by the topology
            return 0 if conn.redis_topology == "single" else 1
        return min(1, fewest)
    if fewest is not None and fewest < wanted:
        raise TopologyError(
            f"VLMQ_REDIS_WAIT_REPLICAS is {wanted}, but a master of {redact_url(conn.redis_url)} has "
            f"{fewest} replica(s): add replicas, or set VLMQ_REDIS_WAIT_REPLICAS={fewest}"
        )
    return wanted


# The fleet's replica requirement once seen (auto mode): a worker started while a master has
# lost its replica reads it here instead of settling for none.
DURABILITY_KEY = "vlmq:{workers}:wait_replicas"


class Durability:
    """The replicas a worker's terminal writes wait for (WAIT), kept current as the topology
    changes: `refresh()` re-reads every master's replicas. An operator's
    `redis_wait_replicas` is never lowered; auto mode is 1 once every master had a replica
    (here or, read from Redis, anywhere in the fleet) and never goes back to 0 by itself.
    `short` names the masters that have fewer replicas than required right now: their
    shards' terminal writes wait (and their offsets stay uncommitted) until they are back."""

    def __init__(self, redis: AnyRedis, conn: Connection, required: int) -> None:
        self.redis, self.conn, self.required = redis, conn, required
        self.short: dict[str, int] = {}  # master (with its slots) -> replicas it has now

    async def refresh(self) -> list[str]:
        """Re-read the topology; returns one line per change (for the log)."""
        masters = await _replicas_per_master(self.redis)
        if masters is None:
            return []
        changes = []
        if self.conn.redis_wait_replicas is None:
            wanted = await self._fleet(max(self.required, min(1, min(masters.values(), default=0))))
            if wanted != self.required:
                changes.append(f"terminal writes now wait for {wanted} replica(s) of every master")
                self.required = wanted
        short = {m: n for m, n in masters.items() if n < self.required}
        for m in short.keys() - self.short.keys():
            changes.append(
                f"master {m} has {short[m]} of {self.required} replica(s): its terminal writes wait"
            )
        for m in self.short.keys() - short.keys():
            changes.append(f"master {m} has its replica(s) again")
        self.short = short
        return changes

    async def _fleet(self, mine: int) -> int:
        """The fleet's requirement, raised to `mine` where lower. While the key's own master
        does not answer (it may be the very one failing over), `mine`: the masters' replicas
        are still re-read, rather than the whole check failing until the failover ends."""
        try:
            seen = int(await self.redis.get(DURABILITY_KEY) or 0)
            if mine > seen:
                await self.redis.set(DURABILITY_KEY, mine)
        except Exception as exc:
            if not is_transient(exc):
                raise
            return mine
        return max(seen, mine)


async def _replicas_per_master(redis: AnyRedis) -> dict[str, int] | None:
    """Connected replicas of each master that answers, named with its slots on a cluster;
    None when INFO is not allowed."""
    try:
        if not isinstance(redis, RedisCluster):
            info = await redis.info("replication")
            return {"redis": int(info.get("connected_slaves", 0))}
        primaries = redis.get_primaries()
        infos = await asyncio.gather(
            *(redis.info("replication", target_nodes=n) for n in primaries), return_exceptions=True
        )
    except NoPermissionError:
        return None
    if any(isinstance(i, NoPermissionError) for i in infos):
        return None
    slots = _slot_ranges(redis)
    # A master that does not answer is being failed over: its replica, once promoted, is
    # counted on the next refresh.
    return {
        f"{n.name} (slots {slots.get(n.name, '-')})": int(i.get("connected_slaves", 0))
        for n, i in zip(primaries, infos, strict=True)
        if isinstance(i, dict)
    }


def _slot_ranges(cluster: RedisCluster) -> dict[str, str]:
    """node name -> its slots as ranges (`0-5460`), from the client's slot map."""
    owner: dict[str, list[int]] = {}
    for slot, nodes in cluster.nodes_manager.slots_cache.items():
        if nodes:
            owner.setdefault(nodes[0].name, []).append(slot)
    out = {}
    for name, slots in owner.items():
        slots.sort()
        ranges, start = [], slots[0]
        for prev, cur in zip(slots, [*slots[1:], None], strict=True):
            if cur != prev + 1:
                ranges.append(f"{start}-{prev}" if prev != start else f"{start}")
                start = cur if cur is not None else start
        out[name] = ",".join(ranges)
    return out


async def _fewest_replicas(redis: AnyRedis) -> int | None:
    """The fewest connected replicas of any master; None when INFO is not allowed."""
    try:
        if isinstance(redis, RedisCluster):
            per_node = await redis.info("replication", target_nodes=RedisCluster.PRIMARIES)
            return min(int(info.get("connected_slaves", 0)) for info in per_node.values())
        return int((await redis.info("replication")).get("connected_slaves", 0))
    except NoPermissionError:
        return None


async def check_topology(redis: AnyRedis, conn: Connection) -> None:
    """Raise TopologyError when the server is not the configured topology (at start-up:
    a single-Redis client of a cluster node would only fail at its first job)."""
    try:
        info = await redis.info("cluster")
    except NoPermissionError:
        return  # a user without INFO: the first job's command will tell instead
    except RedisClusterException as exc:
        raise wrong_topology(exc, conn) or exc from exc
    if not isinstance(redis, RedisCluster) and info.get("cluster_enabled"):
        raise TopologyError(
            _wrong(redact_url(conn.redis_url), "a Redis Cluster", conn.redis_topology, "cluster")
        )


def wrong_topology(exc: BaseException, conn: Connection) -> TopologyError | None:
    """The one-line error, naming the setting, for a client of the wrong topology: a
    single-Redis client gets MOVED/CROSSSLOT from a cluster node; a cluster client cannot
    start against a Redis without cluster mode. None for any other error."""
    where, text = redact_url(conn.redis_url), str(exc)
    if isinstance(exc, AskError) or (isinstance(exc, ResponseError) and text.startswith("CROSSSLOT")):
        return TopologyError(_wrong(where, "a Redis Cluster", conn.redis_topology, "cluster"))
    if isinstance(exc, RedisClusterException) and "cluster mode is not enabled" in text.lower():
        return TopologyError(_wrong(where, "not a cluster", conn.redis_topology, "single"))
    return None


def _wrong(where: str, actual: str, configured: str, wanted: str) -> str:
    return (
        f"Redis at {where} is {actual}, but VLMQ_REDIS_TOPOLOGY is {configured!r}: "
        f"set VLMQ_REDIS_TOPOLOGY={wanted}"
    )
