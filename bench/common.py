"""Shared by the benchmarks: the local stack, hardware description, result files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from vlmq.deploy.stack import Stack

# Where result files go (VLMQ_BENCH_RESULTS: elsewhere, e.g. outside a synced checkout).
RESULTS = Path(os.environ.get("VLMQ_BENCH_RESULTS") or Path(__file__).parent / "results")


def hardware() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.machine()}"


def hardware_tag() -> str:
    return os.environ.get("VLMQ_BENCH_TAG", f"cpu{os.cpu_count()}")


def peak_rss_mib(pid: int) -> int:
    """A live process's peak resident memory (VmHWM), in MiB; -1 where /proc does not say."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return -1


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_fake_worker(env: dict[str, str], topic: str, log: Path, **settings: str) -> subprocess.Popen[bytes]:
    """A real `vlmq worker` process with the fake engine on `topic` (its dead letters on
    `<topic>.dlq`, its group named after it), JSON logs to `log`; `settings` are more
    `VLMQ_*` variables (name: value)."""
    worker_env = {
        **os.environ,
        **env,
        "VLMQ_JOBS_TOPIC": topic,
        "VLMQ_DLQ_TOPIC": f"{topic}.dlq",
        "VLMQ_GROUP_ID": topic,
        "VLMQ_METRICS_PORT": "0",
        "VLMQ_LOG_FORMAT": "json",
        **{f"VLMQ_{k.upper()}": v for k, v in settings.items()},
    }
    return subprocess.Popen(
        [sys.executable, "-m", "vlmq.worker", "--engine", "fake"],
        env=worker_env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def api_up(base: str, proc: subprocess.Popen[bytes]) -> bool:
    """Whether a starting `vlmq api serve` at `base` answers /healthz (it must not have exited)."""
    import httpx2 as httpx

    assert proc.poll() is None, "vlmq api exited at start (see its log)"
    try:
        return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_stack() -> tuple[Stack, dict[str, str]]:
    """A private stack (Kafka, Redis, S3) in a temp dir, unless VLMQ_* URLs are given."""
    stack = Stack(Path(tempfile.mkdtemp(prefix="vlmq-bench-")))
    env = stack.up(
        kafka=os.environ.get("VLMQ_KAFKA_BOOTSTRAP"),
        redis_url=os.environ.get("VLMQ_BENCH_REDIS_URL"),
        s3=os.environ.get("VLMQ_S3_ENDPOINT_URL"),
    )
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    return stack, env


def redis_commands(urls: list[str]) -> dict[str, int]:
    """Commands processed so far by the masters among these Redis servers: `all` (Lua's
    inner commands included), `evalsha` (script calls) and `wait`. Replicas are left out:
    they re-run every write they receive."""
    out = {"all": 0, "evalsha": 0, "wait": 0}
    for client in _masters(urls):
        stats = client.info("commandstats")
        out["all"] += int(client.info("stats")["total_commands_processed"])
        out["evalsha"] += int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
        out["wait"] += int(stats.get("cmdstat_wait", {}).get("calls", 0))
    return out


def per_job(before: dict[str, int], after: dict[str, int], n: int) -> dict[str, float]:
    return {f"redis_{k}_per_job": round((after[k] - before[k]) / n, 2) for k in before}


def flush_masters(urls: list[str]) -> None:
    """Empty every master among these servers (between runs that reuse the same job ids)."""
    for client in _masters(urls):
        client.flushall()


def _masters(urls: list[str]) -> Iterator[redis.Redis]:
    """A client for each server among `urls` that is a master (closed after its turn)."""
    for url in urls:
        with redis.Redis.from_url(url) as client:
            if client.info("replication")["role"] == "master":
                yield client


def start_cluster(replicas: bool = True) -> tuple[Stack, list[str]]:
    """A private Redis Cluster, 3 masters (+ 3 replicas): (its stack, each node's URL)."""
    cluster = Stack(Path(tempfile.mkdtemp(prefix="vlmq-cluster-")))
    cluster._up_redis_cluster([], replicas=replicas)
    return cluster, [s.url for s in cluster.redis_nodes()]


def redis_pids(stack: Stack) -> list[int]:
    return [s.pid for n, s in stack.services.items() if n.startswith("redis") and s.pid]  # one or all


def write_result(
    name: str, unit: str, baseline: float, value: float, settings: dict[str, Any], **extra: Any
) -> Path:
    """bench/results/<name>-<hardware>.json in DESIGN.md's form; prints it too."""
    row = {
        "name": name,
        "unit": unit,
        "baseline": round(baseline, 3),
        "value": round(value, 3),
        "ratio": round(value / baseline, 3) if baseline else None,
        "hardware": hardware(),
        "settings": settings,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **extra,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{hardware_tag()}.json"
    path.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row, indent=2))
    return path
