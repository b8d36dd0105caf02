"""Worker heartbeats in Redis: who is alive and what each is doing, for the dashboard.

Each worker writes its `Beat` every few seconds to a key that expires after three missed
beats, and notes itself in a sorted set by time; a reader takes the members seen within
the TTL and reads their keys (an expired key is a worker that is gone).
"""

from __future__ import annotations

import socket
from typing import Any

import msgspec

from vlmq.core.topology import AnyRedis
from vlmq.schemas import keys

MISSED_BEATS = 3  # a worker is gone once this many beats did not come


class Beat(msgspec.Struct, kw_only=True, omit_defaults=True):
    worker: str
    host: str = socket.gethostname()
    pid: int = 0
    engine: str = ""
    model: str | None = None
    started_at: float = 0.0
    at: float = 0.0  # when this beat was written
    interval_s: float = 5.0
    in_flight: int = 0  # jobs held (fetching, decoding, in the engine)
    engine_running: int = 0
    engine_waiting: int = 0  # the engine's own queue
    jobs_per_s: float = 0.0  # ended jobs over the last interval
    ended: int = 0  # ended jobs since it started
    gpu_busy: float | None = None  # mean NVML utilisation of its GPUs, 0-1; None without NVML
    partitions: list[int] = []  # the jobs topic's partitions it holds
    control: str = ""  # what an operator asked of it and it does: "paused", "draining"


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(Beat)


async def beat(redis: AnyRedis, b: Beat) -> None:
    ttl = max(int(b.interval_s * MISSED_BEATS), 1)
    pipe = redis.pipeline(transaction=False)
    pipe.set(keys.worker_key(b.worker), _enc.encode(b), ex=ttl)
    pipe.zadd(keys.WORKERS_KEY, {b.worker: b.at})
    pipe.zremrangebyscore(keys.WORKERS_KEY, "-inf", b.at - 24 * 3600)  # gone a day: forgotten
    await pipe.execute()


async def gone(redis: AnyRedis, worker: str) -> None:
    """A worker that stops says so at once, instead of waiting out its TTL."""
    pipe = redis.pipeline(transaction=False)
    pipe.delete(keys.worker_key(worker))
    pipe.zrem(keys.WORKERS_KEY, worker)
    await pipe.execute()


async def alive(redis: AnyRedis, limit: int = 1000) -> list[Beat]:
    """The workers whose last beat has not expired, busiest first."""
    ids = [_s(w) for w in await redis.zrevrange(keys.WORKERS_KEY, 0, limit - 1)]
    if not ids:
        return []
    pipe = redis.pipeline(transaction=False)
    for w in ids:
        pipe.get(keys.worker_key(w))
    beats = [_dec.decode(v) for v in await pipe.execute() if v]
    return sorted(beats, key=lambda b: (-b.in_flight, b.worker))


COMMANDS = ("pause", "resume", "drain")


async def command(redis: AnyRedis, worker: str, what: str) -> None:
    """An operator's command to a worker (pause, resume, drain): kept in its control key
    (a worker that missed the message reads it at its next beat) and announced at once.
    A pause holds until a resume, across restarts; a drain is taken once (the worker
    removes it as it starts to drain)."""
    assert what in COMMANDS, what
    pipe = redis.pipeline(transaction=False)
    if what == "resume":
        pipe.delete(keys.worker_control_key(worker))
    else:
        pipe.set(keys.worker_control_key(worker), what, ex=7 * 24 * 3600)
    pipe.publish(keys.WORKER_CONTROL_CHANNEL, worker)
    await pipe.execute()


async def commanded(redis: AnyRedis, worker: str) -> str:
    """The command a worker is under now: "pause", "drain" or "" (run)."""
    got = await redis.get(keys.worker_control_key(worker))
    return _s(got) if got else ""


async def take_drain(redis: AnyRedis, worker: str) -> None:
    """The worker starts its drain: the command is spent (a restart runs again)."""
    await redis.delete(keys.worker_control_key(worker))


def gpu_busy() -> float | None:
    """Mean GPU utilisation (0-1) of the GPUs this process may use, when NVML is there."""
    try:
        import os

        import pynvml  # nvidia-ml-py: only on GPU hosts (the vllm wheel brings it)

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        count = pynvml.nvmlDeviceGetCount()
        idx = [int(i) for i in visible.split(",") if i.strip().isdigit()] if visible else range(count)
        util = [pynvml.nvmlDeviceGetUtilizationRates(pynvml.nvmlDeviceGetHandleByIndex(i)).gpu for i in idx]
        return sum(util) / len(util) / 100 if util else None
    except Exception:  # no NVML, no driver, no GPU: not an error for a heartbeat
        return None


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
