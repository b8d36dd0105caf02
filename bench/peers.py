"""vlmq against the job queues people wrap around an engine by hand: arq, Celery (Redis
broker and result backend) and Taskiq (Redis Streams broker, Redis results), on this
machine, in one run, with the same no-op job whose result is stored.

For each queue, two runs on a private redis-server (and, for vlmq, tansu):
- throughput: N jobs submitted as fast as the client can while one warm worker drains
  them; jobs/s from the first submit to the last result, and submit -> result latency
  p50/p99 (under that burst: mostly time in the queue);
- kill -9: M jobs, the worker killed with SIGKILL a third of the way through, a new one
  started; then every job must have a result (lost = those without), and a job that ran to
  completion twice is duplicated (peers: the task counts its runs; vlmq: terminal writes,
  which is what a client sees; jobs vlmq ran again after the kill are reported apart).

Each queue runs with its recommended at-least-once settings (bench/peer_apps/*: Celery
acks_late + reject_on_worker_lost + prefetch 1, prefork with a process per core; arq's
defaults with max_jobs 64; Taskiq acknowledging once the result is saved; vlmq's
defaults, max_in_flight 64). Their redelivery timeouts are shortened to 10 s so a kill
resolves within the run. Peers run from their own venvs (`bash bench/peer_apps/venvs.sh`).

    python bench/peers.py --jobs 20000 --kill-jobs 5000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

import redis as sync_redis

from bench.common import start_stack, write_result
from bench.latency import start_worker
from vlmq.core.settings import Connection
from vlmq.core.state import StateStore
from vlmq.core.topology import connect_redis
from vlmq.producer import Client
from vlmq.schemas import Job, Message, keys

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / ".venv-peers"
WORKERS = {
    "arq": ["arq", "bench.peer_apps.arq_app.WorkerSettings"],
    "celery": ["celery", "-A", "bench.peer_apps.celery_app", "worker", "-c", "2", "--loglevel", "WARNING"],
    "taskiq": [
        "taskiq", "worker", "bench.peer_apps.taskiq_app:broker", "--ack-type", "when_saved",
        "--workers", "1", "--max-async-tasks", "64", "--log-level", "WARNING",
    ],
}  # fmt: skip


def summary(pairs: list[list[float]], n: int) -> dict[str, Any]:
    done = [p for p in pairs if p]
    lat = sorted(f - s for s, f in done)
    wall = max(f for _, f in done) - min(s for s, _ in done) if done else 0.0
    pct = (lambda q: round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 1)) if lat else (lambda q: None)
    return {
        "jobs": n,
        "done": len(done),
        "seconds": round(wall, 2),
        "jobs_per_s": round(len(done) / wall, 1) if wall else 0.0,
        "latency_ms": {
            "p50": pct(0.5),
            "p99": pct(0.99),
            "mean": round(1000 * statistics.fmean(lat), 1) if lat else None,
        },
    }


class Peer:
    """One peer queue: its app's submit/collect commands and its worker, in its own venv."""

    def __init__(self, name: str, url: str) -> None:
        self.name, self.url = name, url
        self.bin = PEERS / name / "bin"
        self.procs: list[subprocess.Popen[bytes]] = []

    def _env(self, count_runs: bool) -> dict[str, str]:
        return {**os.environ, "PEERS_REDIS_URL": self.url, "PEERS_COUNT_RUNS": "1" if count_runs else "0"}

    def app(self, *args: str, count_runs: bool = False) -> str:
        cmd = [str(self.bin / "python"), f"bench/peer_apps/{self.name}_app.py", *args]
        return subprocess.run(
            cmd, env=self._env(count_runs), cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout

    def start_worker(self, count_runs: bool) -> None:
        cmd = [str(self.bin / WORKERS[self.name][0]), *WORKERS[self.name][1:]]
        log = open(f"/tmp/peers-{self.name}.log", "ab")  # noqa: SIM115 - lives as long as the worker
        self.procs.append(
            subprocess.Popen(
                cmd,
                env=self._env(count_runs),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()

    def collect(self, n: int, prefix: str = "j") -> list[Any]:
        return list(json.loads(self.app("collect", str(n), prefix)))

    def run(self, n: int, kill: bool) -> dict[str, Any]:
        r = sync_redis.Redis.from_url(self.url)
        r.flushdb()
        self.start_worker(count_runs=kill)
        self.app("submit", "1", "warm")  # a warm worker: its first job's answer says it is up
        _until(lambda: self.collect(1, "warm") != [None], f"{self.name} worker", 120)
        r.flushdb()
        self.app("submit", str(n), count_runs=kill)
        if kill:
            _until(lambda: r.hlen("peers:runs") >= n // 3, "a third", 300)
            self.kill()
            self.start_worker(count_runs=True)
        deadline = time.monotonic() + (300 if not kill else 120)
        while sum(1 for x in self.collect(n) if x) < n and time.monotonic() < deadline:
            time.sleep(1.0)
        out = summary(self.collect(n), n)
        if kill:
            runs = {int(k): int(v) for k, v in r.hgetall("peers:runs").items()}
            out |= {
                "lost": n - out["done"],
                "duplicated": sum(v > 1 for v in runs.values()),
                "ran_again": sum(v > 1 for v in runs.values()),
            }
        self.kill()
        return out


def _until(check: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout:.0f} s (see /tmp/peers-*.log)")
        time.sleep(0.2)


async def vlmq_run(env: dict[str, str], n: int, kill: bool) -> dict[str, Any]:
    proc, topic = await start_worker(env, 0, None)
    tag = f"peers-{uuid.uuid4().hex[:6]}"
    conn = Connection.load(
        {"redis_url": env["VLMQ_REDIS_URL"], "kafka_bootstrap": env["VLMQ_KAFKA_BOOTSTRAP"]}
    )
    redis = connect_redis(conn)
    store = StateStore(redis)
    try:
        async with Client(settings=conn, topic=topic) as client:
            jobs = (
                Job(job_id=f"{tag}-{i}", batch_id=tag, messages=[Message("user", "ping")]) for i in range(n)
            )
            submitting = asyncio.create_task(client.submit_many(jobs, chunk=500))
            if kill:
                while (await store.batch_counts(tag)).finished < n // 3:
                    await asyncio.sleep(0.05)
                proc.kill()  # SIGKILL: the fake-engine worker has no children
                await proc.wait()
                proc, _ = await start_worker(env, 0, None, topic=topic)
            await submitting
            deadline = time.monotonic() + 300
            while (await store.batch_counts(tag)).finished < n and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
        results = [r async for r in store.iter_batch(tag)]
        pairs = [
            [r.timings.submitted_at, r.timings.finished_at]
            for r in results
            if r.timings and r.timings.submitted_at and r.timings.finished_at
        ]
        out = summary(pairs, n)
        if kill:
            pipe = redis.pipeline(transaction=False)
            for i in range(n):
                pipe.hget(keys.job_key(f"{tag}-{i}"), "terminal_writes")
            writes = [int(w or 0) for w in await pipe.execute()]
            out |= {
                "lost": n - sum(r.state.value == "succeeded" for r in results),
                "duplicated": sum(w > 1 for w in writes),
                "ran_again": sum(r.attempt > 1 for r in results),
            }
        return out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await redis.aclose()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--kill-jobs", type=int, default=5_000)
    ap.add_argument("--peers", default="arq,celery,taskiq")
    args = ap.parse_args()
    stack, env = await asyncio.to_thread(start_stack)
    try:
        rows: dict[str, Any] = {"vlmq": {"throughput": await vlmq_run(env, args.jobs, False)}}
        rows["vlmq"]["kill_9"] = await vlmq_run(env, args.kill_jobs, True)
        print("vlmq", rows["vlmq"], flush=True)
        base = env["VLMQ_REDIS_URL"].rsplit("/", 1)[0]
        for db, name in enumerate(args.peers.split(","), 1):
            peer = Peer(name, f"{base}/{db}")
            try:
                rows[name] = {
                    "throughput": peer.run(args.jobs, False),
                    "kill_9": peer.run(args.kill_jobs, True),
                }
            finally:
                peer.kill()
            print(name, rows[name], flush=True)
        best = max((n for n in rows if n != "vlmq"), key=lambda n: rows[n]["throughput"]["jobs_per_s"])
        write_result(
            "peers",
            "jobs/s",
            rows[best]["throughput"]["jobs_per_s"],
            rows["vlmq"]["throughput"]["jobs_per_s"],
            {
                "jobs": args.jobs,
                "kill_jobs": args.kill_jobs,
                "job": "no-op, result stored (vlmq: fake engine, zero latency, 1 token)",
                "baseline": f"the best peer: {best}",
                "peers": {"arq": "0.28.0", "celery": "5.7.0", "taskiq": "0.13.0 + taskiq-redis 1.2.4"},
                "settings": "bench/peer_apps/*; redelivery after 10 s for every peer",
            },
            rows=rows,
        )
    finally:
        stack.down()


if __name__ == "__main__":
    asyncio.run(main())
