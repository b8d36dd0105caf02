"""The examples run against the real stack and a worker (fake engine); the worker publishes
to `result_topic`; the health and metrics endpoints answer."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.helpers import Env, put_images, read_topic, start_worker
from vlmq.deploy.stack import free_port, wait_until
from vlmq.producer import Client, caption
from vlmq.schemas.codec import decode_result_msg

ROOT = Path(__file__).resolve().parents[2]


def _run_example(e: Env, *args: str) -> str:
    env = {**e.worker_env(), "VLMQ_JOBS_TOPIC": e.jobs_topic}
    proc = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


async def test_examples_and_result_topic(e: Env) -> None:
    uris = put_images(e, 3, w=64, h=48)
    start_worker(e, "w")
    out = await asyncio.to_thread(_run_example, e, "examples/microservice.py", uris[0])
    assert out.startswith("fake:")
    out = await asyncio.to_thread(
        _run_example, e, "examples/moderation_backlog.py", f"s3://{e.bucket}/img/", e.tag
    )
    assert "3 sent" in out
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        job = caption(uris[1], job_id=f"{e.tag}-evt", result_topic=e.results_topic)
        await client.submit(job)
        await client.wait(job.job_id, timeout=30)
    (msg,) = await read_topic(e, e.results_topic, 1)
    result = decode_result_msg(msg.value)
    assert (msg.key.decode(), result.job_id, result.state.value) == (job.job_id, job.job_id, "succeeded")


def test_health_ready_and_metrics_endpoints(e: Env) -> None:
    port = free_port()
    w = start_worker(e, "w", metrics_port=port)

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, ""
        except OSError:
            return 0, ""

    wait_until(lambda: get("/readyz")[0] == 200, "worker ready", timeout=60)
    assert get("/healthz")[0] == 200
    status, text = get("/metrics")
    assert status == 200 and "vlmq_in_flight" in text and "vlmq_stage_seconds" in text
    w.terminate()
    w.wait(60)
    assert get("/healthz")[0] == 0  # gone after the drain
    assert os.path.exists(e.tmp / "w.log")
