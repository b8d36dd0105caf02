"""Failover bench: a Redis Cluster master killed twice under load, a worker killed meanwhile,
a broker stall, and a master restarted without persistence.

On a 3-master + 3-replica Redis Cluster (bench/chaos.py's stack), two workers run the fake
engine at a fixed pace through N jobs submitted in a few batches with the SDK:

1. at 25 % done the master owning most of the jobs' shards is killed -9; 8 s later one
   worker is killed -9 and restarted (so it starts while a master has no replica); the dead
   node comes back after `--down-s`, as the replica of its successor;
2. once it is in sync, the new master of those slots is killed -9, and comes back as well;
3. tansu is stopped (SIGSTOP) for `--stall-s` under load, then continued.

Then every job must have ended once, succeeded, with the engine's answer, and every batch's
counters must equal its jobs' states. `max_stall_unaffected_s` is the longest gap between
two completions of jobs whose shard's master was not the one killed, during the outage
windows (a kill until its node is back in sync; the gap from the kill to the first
completion counts, and a gap that runs past the window's end counts whole). It is split by
cause: `max_stall_unaffected_worker_kill_s` over the worker kill's window (from the kill -9
until the restarted worker's first completion: its consumer group's rebalance), and
`max_stall_unaffected_failover_s` over the rest (the Redis failover alone).

4. Separately (a documented non-guarantee, docs/operations.md "Durability"): M more jobs, and
at 25 % of them done their busiest master is killed -9 and restarted at once, with neither
AOF nor RDB, before its replica could take over: it comes back empty, and its replica
resyncs from it. Reported under `persistence_off`, not in the targets above.

    python bench/failover.py                   # 20,000 jobs, 60 s outages (the committed result)
    python bench/failover.py --jobs 2000 --down-s 10 --persistence-off-jobs 600 --name failover-ci
Exit status 1 when a target is missed: anything lost, duplicated, wrongly failed or
miscounted, an unaffected shard stalled longer than `--max-stall-s` by the failover, or
longer than `--max-kill-stall-s` by the worker kill.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from bench.chaos import N_IMAGES, Chaos, finished, prepare, read_jobs, verify
from bench.common import hardware, write_result
from vlmq.producer import Client, caption
from vlmq.schemas import keys
from vlmq.schemas.job import Job

Window = tuple[float, float]  # (start, end), the bench's wall clock


class Completions:
    """When each job ended, as a client sees it: finish.lua publishes on the job's done
    channel with its terminal write, and a cluster relays that to every node; heard on a
    node this bench never kills, stamped with the bench's clock (the same as the outages')."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.prefix = keys.done_channel("").encode()

    async def listen(self, url: str) -> asyncio.Task[None]:
        """Subscribed once this returns; the task hears until cancelled."""
        client = Redis.from_url(url)
        pubsub = client.pubsub()
        await pubsub.psubscribe(keys.done_channel("*"))
        return asyncio.create_task(self._hear(client, pubsub))

    async def _hear(self, client: Redis, pubsub: PubSub) -> None:
        try:
            async for msg in pubsub.listen():
                if msg["type"] == "pmessage":
                    self.at.setdefault(msg["channel"].removeprefix(self.prefix).decode(), time.time())
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py
            await client.aclose()


class Failover(Chaos):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.tag = f"failover-{int(time.time())}"
        # Slow enough that the faults happen under load: each job takes completion_tokens
        # steps of step_ms, max_num_seqs at a time per worker.
        self.engine_args = f"step_ms={args.step_ms},max_num_seqs=32,completion_tokens=8"
        # Redis's default stops every slot while one master is down and not yet replaced
        # (CLUSTERDOWN): no client can keep the other shards flowing then.
        coverage = "yes" if args.require_full_coverage else "no"
        self.cluster_args = ["--cluster-require-full-coverage", coverage]
        self.affected: set[int] = set()  # shards whose master is killed
        self.outages: list[Window] = []
        self.stall: Window = (0.0, 0.0)
        self.kills: list[tuple[str, float]] = []  # (worker, when it was killed -9)
        self.log: list[str] = []  # the faults, each with when and how far the run was
        self.done = Completions()

    def note(self, what: str, done: int | None = None) -> None:
        self.faults.append(what)
        self.log.append(
            f"{time.strftime('%H:%M:%S')} {what}" + (f" ({done} done)" if done is not None else "")
        )
        print(self.log[-1], flush=True)

    async def until_done(self, n: int) -> int:
        while (done := await finished(self, self.batches) or 0) < n:
            await asyncio.sleep(0.2)
        return done

    async def in_sync(self, name: str) -> None:
        """Until the restarted node `name` is a replica whose link to its master is up."""
        url = self.stack.services[name].url
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            client = Redis.from_url(url)
            try:
                info = await client.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") == "up":
                    return
            except (RedisError, OSError):
                pass  # still loading
            finally:
                await client.aclose()
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{name} never came back in sync")

    async def failover(self, address: str, kill_worker_after: float | None) -> None:
        """kill -9 the master at `address`; bring it back after --down-s; wait until it is
        its successor's replica in sync. Meanwhile, if asked, kill -9 a worker."""
        name = self.node_at(address)
        t0 = time.time()
        self.stack.kill(name)
        self.note(f"Redis master {name} ({address}, {len(self.affected)} of 256 shards) killed -9")
        if kill_worker_after:
            await asyncio.sleep(kill_worker_after)
            at = time.time()
            await self._kill()
            what = self.faults.pop()  # "kill -9 <worker>"
            self.kills.append((what.split()[-1], at))
            self.note(f"{what} (restarted 1 s later, {kill_worker_after:.0f} s into the outage)")
        await asyncio.sleep(self.a.down_s - (time.time() - t0))
        await asyncio.to_thread(self.stack.restart, name)
        await self.in_sync(name)
        self.outages.append((t0, time.time()))
        self.note(
            f"{name} back after {self.a.down_s:.0f} s and in sync as a replica",
            await finished(self, self.batches),
        )

    async def scenario(self, n: int) -> None:
        done = await self.until_done(n // 4)
        owners = await self.shard_masters()
        busiest, _ = await self.busiest_master(self.job_ids)
        self.affected = {s for s, a in owners.items() if a == busiest}
        self.note("25 % done", done)
        await self.failover(busiest, kill_worker_after=self.a.worker_kill_s)
        # The second failover: the master those slots have now (the first one's successor).
        successor = (await self.shard_masters())[min(self.affected)]
        await self.failover(successor, kill_worker_after=None)
        t0 = time.time()
        await self._stall()
        self.stall = (t0, time.time())
        self.note(self.faults.pop(), await finished(self, self.batches))


def max_gap(times: Iterable[float], windows: list[Window], skip: list[Window] | None = None) -> float:
    """The longest gap between consecutive completion times that overlaps a window; the
    window's start counts as a completion (a stall from the very start shows). Gaps that
    overlap a `skip` window are left out."""
    done = sorted(times)
    worst = 0.0
    for start, end in windows:
        points = [start, *(t for t in done if t > start)]
        for a, b in itertools.pairwise(points):
            if a < end and not any(a < k_end and b > k_start for k_start, k_end in skip or []):
                worst = max(worst, b - a)
    return round(worst, 2)


async def stalls(f: Failover, jobs: list[Job]) -> dict[str, Any]:
    """Stalls of the unaffected shards, split by cause: a worker killed -9 costs its
    group a rebalance (from the kill until the restarted worker's first completion: the
    `worker_kill` windows); the rest of the outage windows is the Redis failover alone."""
    results, _ = await read_jobs(f, jobs)
    ends = [
        (keys.shard(j.job_id), f.done.at[j.job_id], r.worker if r else None)
        for j, r in zip(jobs, results, strict=True)
        if j.job_id in f.done.at
    ]
    # Kept beside the workers' logs, to find what a stall was: (shard, affected, when, worker).
    timeline = [(s, s in f.affected, round(t, 3), w) for s, t, w in sorted(ends, key=lambda e: e[1])]
    (f.tmp / "completions.json").write_text(json.dumps({"outages": f.outages, "ends": timeline}))
    kills = [(at, min((t for _, t, w in ends if w == name and t > at), default=at)) for name, at in f.kills]
    unaffected = [t for s, t, _ in ends if s not in f.affected]
    return {
        "max_stall_unaffected_s": max_gap(unaffected, f.outages),
        "max_stall_unaffected_failover_s": max_gap(unaffected, f.outages, skip=kills),
        "max_stall_unaffected_worker_kill_s": max_gap(unaffected, kills),
        "max_stall_unaffected_per_outage_s": [max_gap(unaffected, [w]) for w in f.outages],
        "worker_kill_until_rejoined_s": [round(b - a, 2) for a, b in kills],
        "max_stall_affected_s": max_gap([t for s, t, _ in ends if s in f.affected], f.outages),
        "affected_shards": len(f.affected),
        "outage_s": [round(b - a, 1) for a, b in f.outages],
        "kafka_stall_max_gap_s": max_gap([t for _, t, _ in ends], [f.stall]),
    }


async def persistence_off(f: Failover, m: int, expected: dict[int, str]) -> dict[str, Any]:
    """M jobs in a batch of their own; at 25 % done their busiest master is killed -9 and
    restarted at once, empty (no AOF, no RDB), before a failover: what is lost then."""
    batch = f"{f.tag}-persistence-off"
    jobs = [
        caption(f"s3://chaos/{i % N_IMAGES}.jpg", job_id=f"{f.tag}-p{i}", batch_id=batch) for i in range(m)
    ]
    async with Client(topic=f.tag, settings=f.conn) as client:
        await client.submit_many(jobs)
    while (await finished(f, [batch]) or 0) < m // 4:
        await asyncio.sleep(0.2)
    busiest, shards = await f.busiest_master([j.job_id for j in jobs])
    name = f.node_at(busiest)
    await asyncio.to_thread(f.stack.restart, name)
    f.note(
        f"{name} ({busiest}, {shards} shards) killed -9 and restarted at once, empty",
        await finished(f, [batch]),
    )
    ended = await settle(f, jobs)
    report = await verify(f, jobs, expected)
    keep = ("lost", "duplicated", "wrong", "failed", "failed_codes", "counter_mismatches")
    return {"jobs": m, "shards_of_restarted_master": shards, "ended": ended, **{k: report[k] for k in keep}}


async def settle(f: Failover, jobs: list[Job]) -> int:
    """Until every job has ended or none has for --settle-s (what was lost stays lost)."""
    last, since = -1, time.monotonic()
    while time.monotonic() - since < f.a.settle_s:
        results, _ = await read_jobs(f, jobs)
        ended = sum(1 for r in results if r and r.state.terminal)
        if ended == len(jobs):
            return ended
        if ended != last:
            last, since = ended, time.monotonic()
        await asyncio.sleep(1)
    return last


async def run(f: Failover) -> dict[str, Any]:
    a = f.a
    jobs, expected = await prepare(f, a.jobs, a.batches)
    for w in range(a.workers):
        f.worker(f"w{w}")
    # Listen on a master that is not killed: the busiest is, then its replica.
    busiest, _ = await f.busiest_master(f.job_ids)
    calm = next(m for m in sorted(set((await f.shard_masters()).values())) if m != busiest)
    listener = await f.done.listen(f"redis://{calm}/0")
    async with Client(topic=f.tag, settings=f.conn) as client:
        for b in f.batches:
            await client.submit_many([j for j in jobs if j.batch_id == b])
    scenario = asyncio.create_task(f.scenario(a.jobs))
    await f.until_done(a.jobs)
    f.note("all done")
    await scenario
    listener.cancel()
    report = await verify(f, jobs, expected)
    row = {
        "jobs": a.jobs,
        "lost": report["lost"],
        "duplicated": report["duplicated"],
        "wrongly_failed": report["failed"],
        "wrong_answers": report["wrong"] - report["failed"],
        "failed_codes": report["failed_codes"],
        "counter_mismatches": report["counter_mismatches"],
        **await stalls(f, jobs),
        "completions_heard": len(f.done.at),
        "partitions_committed_past_end": report["partitions_committed_past_end"],
    }
    if a.persistence_off_jobs:
        row["persistence_off"] = await persistence_off(f, a.persistence_off_jobs, expected)
    return row


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--step-ms", type=int, default=100, help="the fake engine's step (8 steps a job)")
    ap.add_argument("--down-s", type=float, default=60, help="a killed master comes back after")
    ap.add_argument(
        "--worker-kill-s", type=float, default=8, help="a worker is killed this far into the outage (0: none)"
    )
    ap.add_argument("--stall-s", type=float, default=5, help="tansu is stopped this long")
    ap.add_argument(
        "--max-stall-s", type=float, default=2, help="the target for unaffected shards through a failover"
    )
    ap.add_argument(
        "--max-kill-stall-s",
        type=float,
        default=5,
        help="the bound for unaffected shards through a worker kill (a group rebalance; tansu pauses 3 s)",
    )
    ap.add_argument("--persistence-off-jobs", type=int, default=2000, help="0: skip that part")
    ap.add_argument("--settle-s", type=float, default=30, help="no job ended this long: the rest is lost")
    ap.add_argument("--require-full-coverage", action="store_true", help="Redis's default (see docs)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--name", default="failover")
    args = ap.parse_args()
    args.redis_cluster = True  # what Chaos.up reads
    return args


async def main() -> int:
    args = parse()
    f = Failover(args)
    t0 = time.perf_counter()
    try:
        await asyncio.to_thread(f.up)
        row = await run(f)
    finally:
        f.stop()
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    print("\n" + " | ".join(f"{k}: {v}" for k, v in row.items()))
    bad = row["lost"] + row["duplicated"] + row["wrongly_failed"] + row["wrong_answers"]
    ok = bad == row["counter_mismatches"] == row["partitions_committed_past_end"] == 0
    ok = ok and row["max_stall_unaffected_failover_s"] <= args.max_stall_s
    ok = ok and row["max_stall_unaffected_worker_kill_s"] <= args.max_kill_stall_s
    settings = {k: v for k, v in vars(args).items() if k not in ("name", "redis_cluster")}
    write_result(
        args.name,
        "jobs correct",
        args.jobs,
        args.jobs - bad,
        settings | {"device": hardware()},
        **row,
        faults=f.log,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
