"""Tracing's cost: jobs/s of one worker (fake engine, zero latency: the worst case, where
the worker's own work is everything) with tracing off and on, against the same worker
built without the tracing code (a checkout of an earlier commit, `--baseline-tree`), in
the same run on the same pre-produced topic: `--rounds` interleaved runs of each, medians
compared (2 shared cores are noisy).

    git worktree add /tmp/untraced 87a5088
    python bench/tracing.py --baseline-tree /tmp/untraced --jobs 20000 --rounds 3

Costs are the worker's CPU time per job (from its first finished jobs to its last: its
start-up, imports included, left out), as a fraction: `cost_off` = off / untraced - 1;
`cost_on` = on / off - 1, with every job sampled and its spans exported over OTLP/HTTP to a
local sink that reads and drops them (a collector's work is not the worker's);
`cost_on_1pct` the same with 1 % of traces sampled. Throughput is kept beside them, but on
two cores shared with Kafka, Redis and this script it swings by 2x between identical runs,
and the CPU per job by 10-20 %: so the microseconds tracing's calls add when off are also
timed in-process (`off_path_us_per_job`) and set against the untraced CPU per job
(`off_path_fraction`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

from bench.common import flush_masters, start_stack, write_result
from bench.plumbing import produce, vlmq_worker


@contextmanager
def otlp_sink() -> Iterator[tuple[str, list[int]]]:
    """An OTLP/HTTP endpoint that answers 200 and keeps only the bytes it got."""
    got = [0, 0]  # requests, bytes

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            size = int(self.headers.get("Content-Length", 0))
            self.rfile.read(size)
            got[0], got[1] = got[0] + 1, got[1] + size
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", got
    finally:
        server.shutdown()
        server.server_close()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-tree", required=True, help="a checkout of vlmq without the tracing code")
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--max-in-flight", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--name", default="tracing")
    args = ap.parse_args()
    args.baseline_tree = str(Path(args.baseline_tree).resolve())
    return args


async def off_path_us(jobs: int = 200_000) -> float:
    """Microseconds per job that tracing's calls add when it is off, in this process: a
    job's consumed span, three traced Redis calls, two spans, inject, trace id, commit
    note; against the same three calls undecorated (noise-free, unlike the runs)."""
    from vlmq.core import tracing

    assert not tracing.ON

    async def redis_call() -> int:
        return 1

    traced_call = tracing.traced("redis claim", kind="client")(redis_call)
    headers = [("content-type", b"application/msgpack")]

    async def job(with_tracing: bool) -> None:
        if not with_tracing:
            for _ in range(3):
                await redis_call()
            return
        with tracing.consumed("jobs", 1, 5, headers, 1, "g"):
            for _ in range(3):
                await traced_call()
            with tracing.span("vlmq.preprocess", {"vlmq.media.count": 1}):
                pass
            with tracing.span("vlmq.engine", {"gen_ai.request.model": "m"}):
                pass
            tracing.inject(headers)
            tracing.trace_id()
            tracing.awaiting_commit("jobs", 1, 5)

    took: dict[bool, list[float]] = {False: [], True: []}
    for with_tracing in (False, True) * 3:
        t0 = time.perf_counter()
        for _ in range(jobs // 6):
            await job(with_tracing)
        took[with_tracing].append((time.perf_counter() - t0) / (jobs // 6) * 1e6)
    return round(min(took[True]) - min(took[False]), 2)


async def main(args: argparse.Namespace) -> None:
    untraced = args.baseline_tree
    off_us = await off_path_us()
    print(f"tracing off adds {off_us} us per job (in-process)", flush=True)
    stack, env = await asyncio.to_thread(start_stack)
    off = {k: "" for k in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT")}
    try:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        await produce(env["VLMQ_KAFKA_BOOTSTRAP"], topic, args.jobs, args.partitions)
        with otlp_sink() as (endpoint, got):
            on = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                "OTEL_TRACES_SAMPLER": "always_on",
                # Thousands of spans a second: a queue that holds them (the default 2,048
                # drops spans, which would make "on" look cheaper than it is).
                "OTEL_BSP_MAX_QUEUE_SIZE": "200000",
                "OTEL_BSP_SCHEDULE_DELAY": "1000",
            }
            setups: dict[str, tuple[dict[str, str], str | None]] = {
                "untraced": (env | off, untraced),
                "off": (env | off, None),
                "on_1pct": (
                    env | on | {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
                    None,
                ),
                "on": (env | on, None),
            }
            runs: dict[str, list[float]] = {k: [] for k in setups}
            cpu: dict[str, list[float]] = {k: [] for k in setups}  # worker CPU ms per job
            for n in range(args.rounds):
                # Every other round in reverse: the first run after a flush is not always the same one.
                for name, (wenv, cwd) in list(setups.items())[:: 1 if n % 2 == 0 else -1]:
                    await asyncio.to_thread(flush_masters, [env["VLMQ_REDIS_URL"]])  # the same ids again
                    jobs_s, _, cpu_s = await vlmq_worker(
                        wenv, topic, args.jobs, args.max_in_flight, cwd=cwd, steady=True
                    )
                    runs[name].append(round(jobs_s, 1))
                    cpu[name].append(round(cpu_s * 1000 / args.jobs, 4))
                    print(f"{name:9} {jobs_s:8,.0f} jobs/s {cpu[name][-1]:.3f} CPU ms/job", flush=True)
            exported = {
                "otlp_requests": got[0],
                "otlp_bytes_per_job": round(got[1] / (args.jobs * args.rounds)),
            }
    finally:
        stack.down()
    median = {k: sorted(v)[(len(v) - 1) // 2] for k, v in runs.items()}
    cpu_ms = {k: sorted(v)[(len(v) - 1) // 2] for k, v in cpu.items()}
    write_result(
        args.name,
        "jobs/s",
        median["untraced"],
        median["off"],
        {
            "jobs": args.jobs,
            "partitions": args.partitions,
            "engine": "fake step_ms=0",
            "max_in_flight": args.max_in_flight,
            "rounds": args.rounds,
            "baseline": f"the worker without tracing code ({untraced})",
            "value": "the worker with tracing off",
            "on": "every job sampled, spans exported by OTLP/HTTP to a local sink",
            "on_1pct": "the same, 1 % of traces sampled (traceidratio 0.01)",
            "compared": "the median run of each",
        },
        # The worker's CPU per job: what tracing adds to its work. Throughput on two cores
        # shared with Kafka, Redis and this script swings by 2x between identical runs.
        cost_off=round(cpu_ms["off"] / cpu_ms["untraced"] - 1, 4),
        cost_on=round(cpu_ms["on"] / cpu_ms["off"] - 1, 4),
        cost_on_1pct=round(cpu_ms["on_1pct"] / cpu_ms["off"] - 1, 4),
        cpu_ms_per_job=cpu_ms,
        off_path_us_per_job=off_us,
        off_path_fraction=round(off_us / (cpu_ms["untraced"] * 1000), 4),
        throughput_cost_off=round(1 - median["off"] / median["untraced"], 4),
        throughput_cost_on=round(1 - median["on"] / median["off"], 4),
        median=median,
        runs=runs,
        cpu_runs=cpu,
        **exported,
    )


if __name__ == "__main__":
    os.environ.setdefault("VLMQ_CACHE", "false")
    asyncio.run(main(parse_args()))
