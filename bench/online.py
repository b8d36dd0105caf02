"""The online door under load: `POST /v1/chat/completions` at 1, 10, 100 and 1,000
concurrent clients against real `vlmq api` replicas and one fake-engine worker (a fixed
engine time per request), on a private stack (tansu, redis-server, moto_server).

Per concurrency: each client sends requests back to back (one round at 1,000), each with a
prompt of its own (the result cache must miss); `added_ms` is each answered request's
latency minus the engine's fixed time, and `stages_ms` splits it at the job record's
timestamps (STAGES); `cpu_ms_per_answer`: CPU each process used per answer (the clients
are this process). 429s are counted (and not retried); `/healthz` is polled every 50 ms
throughout from a process of its own (`healthz_ok`: every one 200). `ttft_ms`: time to the
first streamed content chunk at 10 concurrent (`stream: true`). The kill row: 200
concurrent over two replicas, one `kill -9`ed once it holds 50 requests; the survivor's
answers, and when the dead replica's slots expire (`slots_expire_s`, from their own
expiry times) and are seen free (`slots_freed_s`).

    python bench/online.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).parent.parent))

from bench.common import cpu_s, start_stack, write_result
from vlmq.api.records import ONLINE, Records
from vlmq.core.settings import Connection
from vlmq.core.state import StateStore
from vlmq.core.topology import AnyRedis, connect_redis
from vlmq.deploy.stack import free_port, wait_until, worker_ready

STEP_MS, TOKENS = 5, 10  # the fake engine: 10 tokens, 5 ms a step: 50 ms a request
ENGINE_MS = STEP_MS * TOKENS


def body() -> dict[str, Any]:
    """A request no other is identical to: the result cache (on by default) must miss, so
    each one runs the engine, as distinct online requests do."""
    return {
        "model": "fake",
        "max_tokens": TOKENS,
        "messages": [{"role": "user", "content": uuid.uuid4().hex}],
    }


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return -1.0
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 1)


class Fleet:
    def __init__(self, env: dict[str, str], worker_env: dict[str, str], api_env: dict[str, str]) -> None:
        self.worker_env, self.api_env = worker_env, api_env
        tag = uuid.uuid4().hex[:8]
        self.env = {
            **os.environ,
            **env,
            "VLMQ_JOBS_TOPIC": f"online-{tag}",
            "VLMQ_GROUP_ID": f"g-{tag}",
            "VLMQ_LOG_LEVEL": "WARNING",
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def worker(self) -> None:
        port = free_port()
        args = ["-e", f"step_ms={STEP_MS}", "-e", f"completion_tokens={TOKENS}", "-e", "max_num_seqs=2048"]
        env = {**self.env, "VLMQ_METRICS_PORT": str(port), "VLMQ_MAX_IN_FLIGHT": "2048", **self.worker_env}
        self._spawn([sys.executable, "-m", "vlmq.worker", "--engine", "fake", *args], env)
        wait_until(lambda: worker_ready(port), "the worker", 90)

    def api(self, name: str, **settings: Any) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        env = {
            **self.env,
            "VLMQ_PORT": str(port),
            "VLMQ_REPLICA_ID": name,
            "VLMQ_MODELS": "fake",
            "VLMQ_FILES_BUCKET": f"online-{uuid.uuid4().hex[:8]}",
            "VLMQ_CREATE_BUCKET": "true",
            **{f"VLMQ_{k.upper()}": str(v) for k, v in settings.items()},
            **self.api_env,
        }
        proc = self._spawn([sys.executable, "-m", "vlmq.cli", "api", "serve"], env)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _up(url), f"vlmq api {name}", 60)
        return url, proc

    def _spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Tally:
    def __init__(self) -> None:
        self.added: list[float] = []
        self.ttft: list[float] = []
        self.status: dict[str, int] = {}
        self.refused_connections = 0
        self.answers: list[tuple[str, float, float]] = []  # job id, sent and answered (unix s)

    def count(self, key: str) -> None:
        self.status[key] = self.status.get(key, 0) + 1


async def request(http: httpx.AsyncClient, url: str, key: str, t: Tally, stream: bool) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await http.post(f"{url}/v1/chat/completions", json=body(), headers=headers)
            t.count(str(r.status_code))
            if r.status_code == 200:
                t.added.append((time.perf_counter() - t0) * 1000 - ENGINE_MS)
                sent = time.time() - (time.perf_counter() - t0)
                t.answers.append((r.json()["id"].removeprefix("chatcmpl-"), sent, time.time()))
            return
        async with http.stream(
            "POST", f"{url}/v1/chat/completions", json={**body(), "stream": True}, headers=headers
        ) as r:
            t.count(str(r.status_code))
            first = None
            async for chunk in r.aiter_lines():
                if first is None and '"content":"' in chunk and '"content":""' not in chunk:
                    first = time.perf_counter()
            if r.status_code == 200 and first is not None:
                t.ttft.append((first - t0) * 1000)
                t.added.append((time.perf_counter() - t0) * 1000 - ENGINE_MS)
    except httpx.TransportError:
        t.refused_connections += 1  # a killed replica's connections


def poll_healthz(url: str) -> None:
    """`--poll-healthz URL`: GET /healthz every 50 ms until stdin closes, one line per
    answer (its ms, -1 for a failure). A process of its own: polled from the clients'
    event loop, /healthz would wait behind 1,000 clients' HTTP work in this process."""
    import threading

    stop = threading.Event()

    def until_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=until_eof, daemon=True).start()
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                ok = http.get(f"{url}/healthz").status_code == 200
            except httpx.HTTPError:
                ok = False
            print(round((time.perf_counter() - t0) * 1000, 1) if ok else -1.0, flush=True)
            stop.wait(0.05)


class Healthz:
    """The /healthz poller process of one row."""

    def __init__(self, url: str) -> None:
        argv = [sys.executable, __file__, "--poll-healthz", url]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.first = self.proc.stdout.readline()  # polling: the row may start

    def stop(self) -> list[float]:
        out, _ = self.proc.communicate("", timeout=60)
        return [float(line) for line in (self.first + out).split()]


async def row(
    urls: list[str],
    key: str,
    concurrent: int,
    rounds: int,
    stream: bool = False,
    health_url: str = "",
    store: StateStore | None = None,
    pids: dict[str, int] | None = None,
) -> dict[str, Any]:
    t, poller = Tally(), await asyncio.to_thread(Healthz, health_url or urls[0])
    cpu0 = {name: cpu_s(pid) for name, pid in pids.items()} if pids else {}
    limits = httpx.Limits(max_connections=concurrent + 16, max_keepalive_connections=concurrent + 16)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:

        async def client(i: int) -> None:
            for _ in range(rounds):
                await request(http, urls[i % len(urls)], key, t, stream)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrent)))
        wall = time.perf_counter() - t0
    health = poller.stop()
    out = _summary(concurrent, t, health, wall, stream)
    if pids and (n := len(t.added)):
        out["cpu_ms_per_answer"] = {k: round((cpu_s(pid) - cpu0[k]) * 1000 / n, 2) for k, pid in pids.items()}
        print({"concurrent": concurrent, "cpu_ms_per_answer": out["cpu_ms_per_answer"]}, flush=True)
    if store is not None and t.answers:
        out["stages_ms"] = await stages(store, t.answers)
        print({"concurrent": concurrent, "stages_ms": out["stages_ms"]}, flush=True)
    return out


STAGES = {
    "api_in": "HTTP, key lookup, admission, subscribe: the client's send until the submit began",
    "to_worker": "Redis enqueue, Kafka produce (acks=all), tansu, the worker's fetch, decode, claim",
    "worker": "the worker's own time around the engine's (pipeline start to the result)",
    "engine_over": "the fake engine's time past its fixed ENGINE_MS (its steps run late on a busy box)",
    "back": "terminal write, completion notice, the waiter, slot release, the HTTP answer",
}


async def stages(store: StateStore, answers: list[tuple[str, float, float]]) -> dict[str, dict[str, float]]:
    """Each answered request's added time split at the job record's own timestamps (one
    machine, one clock): see STAGES."""
    split: dict[str, list[float]] = {k: [] for k in STAGES}
    records = await store.get_many([a[0] for a in answers])
    for (_, sent, got), rec in zip(answers, records, strict=True):
        tm = rec.timings if rec is not None else None
        if tm is None or None in (tm.submitted_at, tm.started_at, tm.finished_at, tm.engine_s):
            continue
        assert tm.submitted_at and tm.started_at and tm.finished_at and tm.engine_s is not None
        split["api_in"].append((tm.submitted_at - sent) * 1000)
        split["to_worker"].append((tm.started_at - tm.submitted_at) * 1000)
        split["worker"].append((tm.finished_at - tm.started_at - tm.engine_s) * 1000)
        split["engine_over"].append(tm.engine_s * 1000 - ENGINE_MS)
        split["back"].append((got - tm.finished_at) * 1000)
    return {k: {"p50": pct(v, 0.5), "p99": pct(v, 0.99)} for k, v in split.items()}


def _summary(concurrent: int, t: Tally, health: list[float], wall: float, stream: bool) -> dict[str, Any]:
    fives = sum(n for s, n in t.status.items() if s.startswith("5"))
    out: dict[str, Any] = {
        "concurrent": concurrent,
        "stream": stream,
        "requests": sum(t.status.values()) + t.refused_connections,
        "answered": t.status.get("200", 0),
        "http_429": t.status.get("429", 0),
        "http_5xx": fives,
        "statuses": t.status,
        "wall_s": round(wall, 2),
        "added_ms": {"p50": pct(t.added, 0.5), "p99": pct(t.added, 0.99)},
        "healthz_ok": bool(health) and min(health) >= 0,
        "healthz_ms": {"p50": pct(health, 0.5), "max": round(max(health), 1) if health else -1},
    }
    if stream:
        out["ttft_ms"] = {"p50": pct(t.ttft, 0.5), "p99": pct(t.ttft, 0.99)}
    if t.refused_connections:
        out["connection_errors"] = t.refused_connections
    print(out, flush=True)
    return out


async def kill_row(fleet: Fleet, conn: Connection, key: str, lease_s: float) -> dict[str, Any]:
    """200 concurrent over two replicas; one is killed once it holds 50 slots."""
    (a, pa), (b, _) = fleet.api("kill-a", online_lease_s=lease_s), fleet.api("kill-b", online_lease_s=lease_s)
    redis = connect_redis(conn)
    try:
        task = asyncio.create_task(row([a, b], key, 200, 3, health_url=b))  # the survivor's
        deadline = time.monotonic() + 60
        while len(await _held_by(redis, "kill-a")) < 50 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # until the victim holds requests
        os.killpg(pa.pid, signal.SIGKILL)
        t0, killed_at = time.perf_counter(), time.time()
        held = await _held_by(redis, "kill-a")
        # When the last of them expires, by their own expiry times (this process's clients
        # keep its loop busy: polling alone sees it later).
        expire_s = max((score for _, score in held), default=killed_at) - killed_at
        while await _held_by(redis, "kill-a"):
            await asyncio.sleep(0.05)
        freed_s = time.perf_counter() - t0
        out = await task
    finally:
        await redis.aclose()
    out.update(
        {
            "killed_replica": "kill-a",
            "slots_at_kill": len(held),
            "slots_expire_s": round(expire_s, 2),
            "slots_freed_s": round(freed_s, 2),
            "online_lease_s": lease_s,
        }
    )
    print(out, flush=True)
    return out


async def _held_by(redis: AnyRedis, replica: str) -> list[tuple[bytes, float]]:
    """Live admission slots of one replica, with their expiry times."""
    live = await redis.zrangebyscore(ONLINE, time.time(), "+inf", withscores=True)
    mine = f"{replica}/".encode()
    pairs = [row for row in live if isinstance(row, tuple | list)]  # withscores: (member, score) each
    return [(m, float(s)) for m, s in pairs if isinstance(m, bytes) and m.startswith(mine)]


async def run(env: dict[str, str], args: argparse.Namespace, servers: dict[str, int]) -> list[dict[str, Any]]:
    fleet = Fleet(
        env, dict(v.split("=", 1) for v in args.worker_env), dict(v.split("=", 1) for v in args.api_env)
    )
    conn = Connection.load({"redis_url": env["VLMQ_REDIS_URL"]})
    redis = connect_redis(conn)
    store, requests = StateStore(redis), args.requests
    try:
        fleet.worker()
        url, api = fleet.api("api-1")
        # CPU per answer of each process (the bench's clients are this process)
        pids = {"client": os.getpid(), "api": api.pid, "worker": fleet.procs[0].pid, **servers}
        key = await Records(redis).create_key("bench")
        await row([url], key, 4, 5)  # warm: connections, the producer, the worker's partitions
        rows = [
            await row([url], key, n, max(1, requests // n), store=store, pids=pids) for n in args.concurrency
        ]
        if args.stream:
            rows.append(await row([url], key, 10, max(1, requests // 10), stream=True))
        if args.kill:
            rows.append(await kill_row(fleet, conn, key, lease_s=5.0))
        return rows
    finally:
        fleet.stop()
        await redis.aclose()


def main() -> None:
    if sys.argv[1:2] == ["--poll-healthz"]:
        return poll_healthz(sys.argv[2])
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--concurrency", default="1,10,100,1000", type=lambda v: [int(n) for n in v.split(",")])
    ap.add_argument("--requests", type=int, default=200, help="per row, at least one round")
    ap.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="the streamed row")
    ap.add_argument(
        "--kill", action=argparse.BooleanOptionalAction, default=True, help="the replica-kill row"
    )
    ap.add_argument("--worker-env", action="append", default=[], help="NAME=value for the worker (repeat)")
    ap.add_argument("--api-env", action="append", default=[], help="NAME=value for the API replicas (repeat)")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True, help="the result file")
    args = ap.parse_args()
    stack, env = start_stack()
    try:
        servers = {n: svc.pid for n, svc in stack.services.items() if n in ("kafka", "redis") and svc.pid}
        rows = asyncio.run(run(env, args, servers))
    finally:
        stack.down()
    at10 = next((r for r in rows if r["concurrent"] == 10 and not r["stream"]), None)
    if not args.write or at10 is None:
        return
    write_result(
        "online",
        "ms added p50 at 10 concurrent (bound: 15)",
        15.0,
        at10["added_ms"]["p50"],
        {
            "engine_ms": ENGINE_MS,
            "online_max_queued": 256,
            "redis_max_connections": 100,
            "replicas": 1,
            "requests_per_row": args.requests,
        },
        rows=rows,
    )


if __name__ == "__main__":
    main()
