"""Running the Lua scripts of core/lua/: pipelined, on any topology, durable when asked.

`Scripts.run` sends many script calls in one pipeline (redis-py's cluster pipeline splits
it per node and sends those in parallel), loads a script a server lacks (a new node, a
promoted replica, a restart) and repeats those calls, and with `durable` ends each node's
part with `WAIT`: the calls' writes reached `replicas` replicas before anyone is told.
`Coalescer` gathers the calls of concurrent callers into one `run` per loop tick.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, NamedTuple

from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, SlotNotCoveredError

from vlmq.core.topology import AnyRedis

NAMES = ("enqueue", "sent", "unqueue", "cancel", "claim", "finish", "lease", "retry", "deadletter")
# The result cache's scripts (core/cache.py), registered with the ones above.
CACHE_NAMES = ("cache_take", "cache_put", "cache_drop", "cache_renew", "cache_index")
# Scripts that take many jobs in one call: (keys per job, shared leading arguments). A
# job's own arguments follow the shared ones. `now` (argument 1) may differ between calls
# of one tick: the merged call takes the first one's.
MANY = {"claim": (6, 5)}
# Scripts whose writes must reach `replicas` replicas before their callers go on (WAIT): a
# terminal write, since the job's offset is committed after it. A claim need not: one lost
# in a failover costs at most a second run of the job, whose terminal write the first
# write wins refuses (docs/operations.md, "Durability"); it is not held up by a master
# that lost its replica.
DURABLE = frozenset({"finish"})
VARYING = {1}
WAIT_MS = 5000  # how long WAIT blocks for the replicas; then the calls are retried


class Call(NamedTuple):
    script: str  # a name in NAMES
    keys: list[str]
    args: list[Any]


class NotDurable(RedisConnectionError):
    """Fewer replicas than required acknowledged a write (a replica is down or lagging, or
    a failover is under way). Transient: the caller retries, and the scripts are idempotent."""


Runner = Callable[[Sequence[Call]], Awaitable[list[Any]]]


class Scripts:
    def __init__(self, redis: AnyRedis, *, replicas: int = 0) -> None:
        self.redis = redis
        self.cluster = redis if isinstance(redis, RedisCluster) else None
        self.replicas = replicas
        self.source = {
            n: resources.files("vlmq.core.lua").joinpath(f"{n}.lua").read_text()
            for n in (*NAMES, *CACHE_NAMES)
        }
        self.sha = {n: hashlib.sha1(s.encode()).hexdigest() for n, s in self.source.items()}

    async def run(self, calls: Sequence[Call], *, durable: bool = False) -> list[Any]:
        """The replies in order; an error reply is its exception, in its place. A dropped
        connection raises (every call in the pipeline may or may not have run). Calls of a
        script that takes many jobs (claim) are merged: one call per slot."""
        if not calls:
            return []
        merged, members = self._merge(calls)
        replies = await self._run(merged, durable)
        out: list[Any] = [None] * len(calls)
        for call, reply, idx in zip(merged, replies, members, strict=True):
            if call.script not in MANY or isinstance(reply, BaseException):
                for i in idx:
                    out[i] = reply
            else:
                for n, i in enumerate(idx):
                    out[i] = reply[n]
        return out

    def _merge(self, calls: Sequence[Call]) -> tuple[list[Call], list[list[int]]]:
        """Calls of a MANY script with the same shared arguments (and slot, on a cluster) as
        one call: their keys and per-job arguments in order. The other calls as they are."""
        merged: list[Call] = []
        members: list[list[int]] = []
        group_of: dict[tuple[Any, ...], int] = {}
        for i, c in enumerate(calls):
            per_job = MANY.get(c.script)
            if per_job is None:
                merged.append(c)
                members.append([i])
                continue
            n_keys, head = per_job
            tag = c.keys[0].partition("}")[0] if self.cluster is not None else ""
            group = (c.script, tag, *(a for j, a in enumerate(c.args[:head]) if j not in VARYING))
            if group not in group_of:
                group_of[group] = len(merged)
                merged.append(Call(c.script, [], list(c.args[:head])))
                members.append([])
            g = group_of[group]
            merged[g].keys.extend(c.keys[:n_keys])
            merged[g].args.extend(c.args[head:])
            members[g].append(i)
        return merged, members

    async def _run(self, calls: Sequence[Call], durable: bool) -> list[Any]:
        replies = await self._pipeline(calls, durable)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            for name in {calls[i].script for i in missing}:
                await self.redis.script_load(self.source[name])  # every primary, on a cluster
            again = await self._pipeline([calls[i] for i in missing], durable)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def one(self, call: Call) -> Any:
        reply = (await self.run([call]))[0]
        if isinstance(reply, BaseException):
            raise reply
        return reply

    async def _pipeline(self, calls: Sequence[Call], durable: bool) -> list[Any]:
        """One pipeline per node, concurrently: a node that is down (a failover under way)
        fails its own calls only, and the other nodes' calls return as usual."""
        if self.cluster is not None:
            await self.cluster.initialize()  # a no-op once the slot map is known
        node_of = self._router()
        targets = [node_of(c) for c in calls]
        groups: dict[str | None, list[int]] = {}
        for i, node in enumerate(targets):
            groups.setdefault(_name(node), []).append(i)
        if len(groups) == 1:
            return await self._node_pipeline(calls, targets, durable)
        parts = await asyncio.gather(
            *(
                self._node_pipeline([calls[i] for i in idx], [targets[i] for i in idx], durable)
                for idx in groups.values()
            ),
            return_exceptions=True,
        )
        out: list[Any] = [None] * len(calls)
        for idx, part in zip(groups.values(), parts, strict=True):
            for n, i in enumerate(idx):
                out[i] = part if isinstance(part, BaseException) else part[n]
        return out

    async def _node_pipeline(self, calls: Sequence[Call], targets: list[Any], durable: bool) -> list[Any]:
        # On a cluster each call goes to the node of its first key (all its keys share one
        # slot): redis-py then skips hashing every key of every call.
        pipe = self.redis.pipeline(transaction=False)
        for c, node in zip(calls, targets, strict=True):
            routed = {"target_nodes": node} if node is not None else {}
            pipe.execute_command("EVALSHA", self.sha[c.script], len(c.keys), *c.keys, *c.args, **routed)
        durable_targets = [t for c, t in zip(calls, targets, strict=True) if c.script in DURABLE]
        waits = self._waits(durable_targets) if durable and self.replicas and durable_targets else []
        for node in waits:
            pipe.execute_command("WAIT", self.replicas, WAIT_MS, **({"target_nodes": node} if node else {}))
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        replies, acks = replies[: len(calls)], replies[len(calls) :]
        if not waits:
            return replies
        short = {
            _name(node)
            for node, ack in zip(waits, acks, strict=True)
            if isinstance(ack, BaseException) or int(ack) < self.replicas
        }
        node_now = self._router()
        for i, (c, node) in enumerate(zip(calls, targets, strict=True)):
            # Not durable: its node's replicas did not confirm, or it ran where no WAIT
            # looked (redirected by a failover or a slot move, or sent while unrouted).
            if c.script not in DURABLE:
                continue
            moved = self.cluster is not None and (node is None or _name(node_now(c)) != _name(node))
            if (_name(node) in short or moved) and not isinstance(replies[i], BaseException):
                replies[i] = NotDurable(
                    f"writes not confirmed by {self.replicas} replica(s) of {_name(node)}"
                )
        return replies

    def _router(self) -> Callable[[Call], Any]:
        """call -> the cluster node serving its slot now (None on a single Redis). Keys
        start with their hash tag, `vlmq:{ab}:`: one lookup per tag, not per call."""
        cluster = self.cluster
        if cluster is None:
            return lambda call: None
        nodes: dict[str, Any] = {}

        def node(call: Call) -> Any:
            if not call.keys:
                return None
            tag = call.keys[0].partition("}")[0]
            if tag not in nodes:
                try:
                    nodes[tag] = cluster.get_node_from_key(call.keys[0])
                except SlotNotCoveredError:  # a failover under way: redis-py routes it itself
                    nodes[tag] = None
            return nodes[tag]

        return node

    def _waits(self, targets: list[Any]) -> list[Any]:
        """Where to send WAIT: after each node's part of the pipeline (one connection per
        node carries that node's calls in order, and WAIT covers that connection's writes).
        [None] on a single Redis: the pipeline's one connection."""
        if self.cluster is None:
            return [None]
        return list({n.name: n for n in targets if n is not None}.values())


def _name(node: Any) -> str | None:
    return getattr(node, "name", None)


class Coalescer:
    """Sends the script calls of all concurrent callers as one pipeline per loop tick.

    A worker holds hundreds of jobs; each claims and finishes through a Lua script. One
    round trip (and one pooled connection) each would cap throughput at the pool and the
    network; batched, a tick's worth of calls costs one round trip. Up to `max_inflight`
    pipelines are under way at once, so calls made while one waits for Redis (or for the
    slowest node of a cluster, or for WAIT) need not wait for it. A failed pipeline fails
    every caller in it, and each caller retries on its own.
    """

    def __init__(self, run: Runner, max_batch: int = 1000, max_inflight: int = 4) -> None:
        self.run = run
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self._pending: list[tuple[Call, asyncio.Future[Any]]] = []
        self._scheduled = False  # a flush will pick up what is pending at the end of this tick
        self._flushes: set[asyncio.Task[None]] = set()

    async def call(self, call: Call) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((call, fut))
        if not self._scheduled and len(self._flushes) < self.max_inflight:
            self._scheduled = True
            task = asyncio.create_task(self._flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        return await fut

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let every task runnable this tick add its call
        self._scheduled = False
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            try:
                replies = await self.run([c for c, _ in batch])
            except Exception as exc:  # the connection failed: every caller sees it
                replies = [exc] * len(batch)
            for (_, fut), reply in zip(batch, replies, strict=True):
                if fut.done():
                    continue
                if isinstance(reply, BaseException):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)
