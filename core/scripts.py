"""Running the Lua scripts of core/lua/: pipelined, on any topology, durable when asked.

`Scripts.run` sends many script calls in one pipeline (on a cluster one per node, in
parallel, each on that node's connections only), loads a script a server lacks (a new node, a
promoted replica, a restart) and repeats those calls, and with `durable` ends each node's
part with `WAIT`: the calls' writes reached `replicas` replicas before anyone is told.
`Coalescer` gathers the calls of concurrent callers into one `run` per loop tick; `Lanes`
keeps one per node.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, NamedTuple

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import PipelineCommand
from redis.exceptions import AskError, NoScriptError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError

from vlmq.core.topology import AnyRedis

NAMES = ("enqueue", "sent", "unqueue", "cancel", "claim", "finish", "lease", "retry", "deadletter")
# The result cache's scripts (core/cache.py), registered with the ones above.
CACHE_NAMES = ("cache_take", "cache_put", "cache_drop", "cache_renew", "cache_index")
# Scripts that take many jobs in one call: (keys per job, shared leading arguments). A
# job's own arguments follow the shared ones. `now` (argument 1) may differ between calls
# of one tick: the merged call takes the first one's.
MANY = {"claim": (6, 6)}
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
        self._reload: asyncio.Task[None] | None = None  # a slot-map refresh under way

    def lane(self, call: Call) -> str | None:
        """The node a call goes to (None on a single Redis): the Coalescer keeps one queue
        per node, so a node that is slow (WAIT for a replica it lost) holds back its own."""
        return _name(self._router()(call))

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
        if self.cluster is not None and not self.cluster.nodes_manager.slots_cache:
            await self.cluster.initialize()  # the first call: learn the slot map
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
        durable_targets = [t for c, t in zip(calls, targets, strict=True) if c.script in DURABLE]
        waits = self._waits(durable_targets) if durable and self.replicas and durable_targets else []
        if self.cluster is not None and targets[0] is not None:
            replies = await self._on_node(targets[0], calls, bool(waits))
        else:
            replies = await self._client_pipeline(calls, targets, waits)
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

    async def _client_pipeline(
        self, calls: Sequence[Call], targets: list[Any], waits: list[Any]
    ) -> list[Any]:
        """Through redis-py's pipeline: on one Redis, or for calls whose node is unknown."""
        pipe = self.redis.pipeline(transaction=False)
        for c, node in zip(calls, targets, strict=True):
            routed = {"target_nodes": node} if node is not None else {}
            pipe.execute_command("EVALSHA", self.sha[c.script], len(c.keys), *c.keys, *c.args, **routed)
        for node in waits:
            pipe.execute_command("WAIT", self.replicas, WAIT_MS, **({"target_nodes": node} if node else {}))
        return list(await pipe.execute(raise_on_error=False))

    async def _on_node(self, node: Any, calls: Sequence[Call], wait: bool) -> list[Any]:
        """One node's calls (then WAIT) on a connection of that node only. Not through
        redis-py's cluster pipeline: on a connection error or CLUSTERDOWN from one node it
        closes every node's connections (other pipelines' too) and re-reads the slot map
        through the first master, which may be the dead one, so one master down stopped
        every shard. Here a failure is this node's; the slot map is re-read aside."""
        cmds = [
            PipelineCommand(i, "EVALSHA", self.sha[c.script], len(c.keys), *c.keys, *c.args)
            for i, c in enumerate(calls)
        ]
        if wait:
            cmds.append(PipelineCommand(len(cmds), "WAIT", self.replicas, WAIT_MS))
        try:
            await node.execute_pipeline(cmds)
        except AttributeError as exc:
            # redis-py closed the connection under this pipeline (its cluster client does so
            # to every node on a CLUSTERDOWN elsewhere): a dropped connection, not a bug here.
            self._reload_slots()
            raise RedisConnectionError(f"connection to {_name(node)} closed while in use") from exc
        except Exception:
            self._reload_slots()
            raise
        replies = [c.result for c in cmds]
        for i, r in enumerate(replies):
            if isinstance(r, AskError):  # MOVED too: the slot has a new master (a failover)
                self._reload_slots()
                replies[i] = TryAgainError(f"{_name(node)} no longer serves this slot: {r}")
        return replies

    def _reload_slots(self) -> None:
        """Re-read the slot map (CLUSTER SLOTS from any node that answers), once at a time."""
        if self._reload is None or self._reload.done():
            self._reload = asyncio.create_task(self._reload_now())

    async def _reload_now(self) -> None:
        assert self.cluster is not None
        with contextlib.suppress(Exception):  # a failover under way: the next error retries
            await self.cluster.nodes_manager.initialize()
        await asyncio.sleep(0.25)  # at most four reloads a second while it lasts

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


class Lanes:
    """A Coalescer per node (`lane` names a call's node): a node whose pipelines are slow (a
    master that lost its replica holds each WAIT for WAIT_MS) fills its own in-flight
    pipelines only, and the other nodes' calls go on at once."""

    def __init__(self, run: Runner, lane: Callable[[Call], str | None]) -> None:
        self.run, self.lane = run, lane
        self._lanes: dict[str | None, Coalescer] = {}

    async def call(self, call: Call) -> Any:
        lane = self.lane(call)
        if lane not in self._lanes:
            self._lanes[lane] = Coalescer(self.run)
        return await self._lanes[lane].call(call)
