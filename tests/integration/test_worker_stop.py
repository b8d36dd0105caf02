"""A worker always stops (issue 40): with jobs in flight and its Kafka and Redis gone (the
stack went down first), SIGTERM drains within the drain timeout plus the close budget, a
second signal stops it at once, and nothing it prints is a traceback or a plain-text line."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from vlmq.deploy.stack import Stack, free_port, wait_until
from vlmq.producer import Client, caption
from vlmq.worker.samples import photo
from vlmq.worker.service import CLOSE_S

DRAIN_S = 3.0
WORKER = [sys.executable, "-m", "vlmq.cli", "worker", "--engine", "fake"]


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[tuple[Stack, dict[str, str]]]:
    """A stack of this test's own: the test takes it down under a busy worker."""
    st = Stack(tmp_path / "stack", partitions=2)
    try:
        yield st, st.up()
    finally:
        st.down()


def busy_worker(tmp_path: Path, env: dict[str, str], jobs: int = 4) -> tuple[subprocess.Popen[bytes], Path]:
    """A worker holding `jobs` jobs that never end (the fake engine's 1,000 steps of 2 s)."""
    log, port = tmp_path / "worker.log", free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*WORKER, "-e", "step_ms=2000", "-e", "completion_tokens=1000"],
            env={
                **os.environ,
                **env,
                "VLMQ_METRICS_PORT": str(port),
                "VLMQ_LOG_FORMAT": "json",
                "VLMQ_MAX_IN_FLIGHT": "4",
                "VLMQ_DRAIN_TIMEOUT_S": str(DRAIN_S),
            },
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    s3 = boto3.client(
        "s3",
        endpoint_url=env["VLMQ_S3_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    s3.create_bucket(Bucket="photos")
    s3.put_object(Bucket="photos", Key="a.jpg", Body=photo(64, 64, seed=1))

    async def submit() -> None:
        async with Client(kafka_bootstrap=env["VLMQ_KAFKA_BOOTSTRAP"], redis_url=env["VLMQ_REDIS_URL"]) as c:
            for _ in range(jobs):
                await c.submit(caption("s3://photos/a.jpg"))

    asyncio.run(submit())
    wait_until(lambda: '"worker ready"' in log.read_text(), "the worker ready", 60)
    wait_until(lambda: in_flight(port) == jobs, f"{jobs} jobs in flight", 60)
    return proc, log


def in_flight(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            text = resp.read().decode()
    except OSError:
        return 0
    match = re.search(r"^vlmq_in_flight (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else 0


def stop(proc: subprocess.Popen[bytes], *signals: signal.Signals) -> tuple[int, float]:
    start = time.monotonic()
    for i, sig in enumerate(signals):
        if i:
            time.sleep(0.5)
        proc.send_signal(sig)
    try:
        return proc.wait(60), time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def assert_clean(log: Path) -> None:
    lines = log.read_text(errors="replace").splitlines()
    assert "Traceback" not in "\n".join(lines)
    plain = [ln for ln in lines if not ln.startswith("{")]
    assert plain == [], plain[:5]
    assert len(lines) < 150, f"{len(lines)} lines"
    for ln in lines:
        json.loads(ln)


def test_sigterm_drains_in_time_with_the_stack_gone(
    own_stack: tuple[Stack, dict[str, str]], tmp_path: Path
) -> None:
    st, env = own_stack
    proc, log = busy_worker(tmp_path, env)
    st.down()  # Kafka, Redis and S3 gone under 4 jobs in flight
    code, took = stop(proc, signal.SIGTERM)
    assert code == 0, log.read_text()[-3000:]
    assert took < DRAIN_S + CLOSE_S + 3, took
    assert '"handing unfinished jobs back"' in log.read_text()
    assert_clean(log)


def test_a_second_signal_stops_at_once(own_stack: tuple[Stack, dict[str, str]], tmp_path: Path) -> None:
    st, env = own_stack
    proc, log = busy_worker(tmp_path, env)
    st.down()
    code, took = stop(proc, signal.SIGTERM, signal.SIGINT)
    assert code == 0
    assert took < DRAIN_S, took  # did not wait out the drain timeout
    assert '"stopping at once' in log.read_text()
    assert_clean(log)


def test_an_idle_worker_stops_quietly(own_stack: tuple[Stack, dict[str, str]], tmp_path: Path) -> None:
    """Stopped while its broker is gone: no CancelledError / NodeNotReadyError traceback."""
    st, env = own_stack
    proc, log = busy_worker(tmp_path, env, jobs=0)
    st.down()
    code, _ = stop(proc, signal.SIGTERM)
    assert code == 0
    assert_clean(log)


def test_a_signal_while_starting_is_a_clean_stop(
    own_stack: tuple[Stack, dict[str, str]], tmp_path: Path
) -> None:
    """SIGTERM while the worker still waits for its broker (a socket that accepts and never
    answers): an orchestrator's ordinary stop, exit 0 in seconds, nothing taken."""
    import socket

    _, env = own_stack
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(16)  # connections queue here; nothing ever answers them
        log = tmp_path / "worker.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                WORKER,
                env={
                    **os.environ,
                    **env,
                    "VLMQ_KAFKA_BOOTSTRAP": f"127.0.0.1:{mute.getsockname()[1]}",
                    "VLMQ_METRICS_PORT": "0",
                    "VLMQ_LOG_FORMAT": "json",
                },
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(lambda: '"worker starting"' in log.read_text(errors="replace"), "the worker to start", 30)
        code, took = stop(proc, signal.SIGTERM)
    assert code == 0, log.read_text()[-2000:]
    assert took < CLOSE_S + 5, took
    assert '"worker stopped before it served"' in log.read_text()
