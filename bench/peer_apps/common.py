"""What every peer app shares: the no-op task's body and the command line.

    python bench/peer_apps/<peer>_app.py submit N [PREFIX]   # enqueue jobs j0..j<N-1> (args: i, submit time)
    python bench/peer_apps/<peer>_app.py collect N [PREFIX]  # JSON: [[submitted, finished] or null, ...]
    (the worker is started by the peer's own command; bench/peers.py knows each)

PEERS_REDIS_URL says where; PEERS_COUNT_RUNS=1 makes every execution count itself in the
hash `peers:runs` (field i), to find duplicates after a kill -9.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import redis

URL = os.environ.get("PEERS_REDIS_URL", "redis://127.0.0.1:6379/1")
COUNT_RUNS = os.environ.get("PEERS_COUNT_RUNS") == "1"
_counter: Any = redis.Redis.from_url(URL) if COUNT_RUNS else None


def body(i: int, submitted: float) -> list[float]:
    """The no-op job: its result is (submitted, finished)."""
    if _counter is not None:
        _counter.hincrby("peers:runs", str(i), 1)
    return [submitted, time.time()]


def main(submit: Callable[[list[str]], None], collect: Callable[[list[str]], list[Any]]) -> None:
    """`submit N [PREFIX]` or `collect N [PREFIX]`: jobs PREFIX0..PREFIX<N-1> (PREFIX: j)."""
    command, n = sys.argv[1], int(sys.argv[2])
    prefix = sys.argv[3] if len(sys.argv) > 3 else "j"
    ids = [f"{prefix}{i}" for i in range(n)]
    if command == "submit":
        submit(ids)
    else:
        print(json.dumps(collect(ids)))
