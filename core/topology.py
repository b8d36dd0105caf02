"""One Redis client for the configured topology: a single Redis, a Cluster or Sentinel.

Everyone (SDK, CLI, worker, bulk) gets its client here, so `VLMQ_REDIS_TOPOLOGY` is the one
setting that points vlmq at a cluster. The key layout (schemas/keys.py) keeps every script
call inside one slot; the state store groups multi-job calls per slot on a cluster.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import AskError, NoPermissionError, RedisClusterException, ResponseError

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
