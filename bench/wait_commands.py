"""Redis commands a waiter spends on `as_completed` while jobs end one by one.

The jobs end 2 ms apart (claim + finish, as a worker does); the waiter follows them all
with `StateStore.as_completed`. Its commands are Redis's `total_commands_processed` over the
run minus those of the same run without a waiter. Baseline: the StateStore of an earlier
commit (`--baseline-rev`), loaded from git, in the same run. Lower is better.

    python bench/wait_commands.py --jobs 300 --baseline-rev b21b840~1
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis.asyncio import Redis

from bench.common import start_stack, write_result
from vlmq.schemas.job import JobState, Result, Timings


def state_module(rev: str | None) -> ModuleType:
    """core/state.py as it is now, or as it was at `rev` (a revision after the state machine
    moved from producer/ to core/: older ones load their Lua scripts from vlmq.schemas)."""
    path = Path(__file__).resolve().parents[1] / "core" / "state.py"
    if rev:
        path = Path(tempfile.mkdtemp()) / "state.py"
        path.write_text(
            subprocess.run(
                ["git", "show", f"{rev}:core/state.py"], check=True, capture_output=True, text=True
            ).stdout
        )
    spec = importlib.util.spec_from_file_location(f"state_{rev or 'now'}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def commands(url: str, st: ModuleType | None, n: int) -> int:
    """Commands Redis processed while n jobs ended, with a waiter from `st` (None: none)."""
    r = Redis.from_url(url)
    await r.flushdb()
    store = state_module(None).StateStore(r, ttl_s=600)
    ids = [f"j{i}" for i in range(n)]
    await store.enqueue_many([(j, None, time.time(), {}, "") for j in ids])

    async def end_all() -> None:
        await asyncio.sleep(0.5)  # the waiter subscribes first
        for j in ids:
            await store.claim(j, None, "w")
            await store.finish(
                Result(job_id=j, state=JobState.SUCCEEDED, text="x", timings=Timings(finished_at=time.time()))
            )
            await asyncio.sleep(0.002)

    before = int((await r.info("stats"))["total_commands_processed"])
    ender = asyncio.create_task(end_all())
    if st is not None:
        waiter = st.StateStore(Redis.from_url(url), ttl_s=600)
        got = [x async for x in waiter.as_completed(ids, timeout=120)]
        assert len(got) == n
    await ender
    after = int((await r.info("stats"))["total_commands_processed"])
    await r.aclose()
    return after - before


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--baseline-rev", default="b21b840~1")
    args = ap.parse_args()
    stack, env = await asyncio.to_thread(start_stack)
    try:
        url = env["VLMQ_REDIS_URL"]
        alone = await commands(url, None, args.jobs)
        old = await commands(url, state_module(args.baseline_rev), args.jobs) - alone
        new = await commands(url, state_module(None), args.jobs) - alone
    finally:
        stack.down()
    write_result(
        "wait-commands",
        "Redis commands by the waiter (lower is better)",
        old,
        new,
        {
            "jobs": args.jobs,
            "ending": "one every ~2 ms",
            "baseline": f"StateStore at {args.baseline_rev}",
            "value": "StateStore now",
        },
        per_job={"baseline": round(old / args.jobs, 1), "value": round(new / args.jobs, 1)},
    )


if __name__ == "__main__":
    asyncio.run(main())
