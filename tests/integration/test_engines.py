"""The OpenAI-compatible engine end to end over real HTTP through Kafka, the worker and Redis
against a stub server that can answer 429 and hang. The mappings and flags are unit-tested in
tests/unit/test_mapping.py; real vLLM, transformers and `vllm serve` run in
tests/engines/test_engines_cpu.py; LMDeploy has no CPU backend and was run on the GPU
(bench/gpu/, docs/performance.md)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from tests.helpers import Env, put_images, start_worker, wait_running
from vlmq.deploy.stack import free_port, wait_until
from vlmq.producer import Client, caption, moderate
from vlmq.schemas import (
    Job,
    JobState,
    Message,
)
from vlmq.worker.engines.mapping import (
    openai_messages,
)
from vlmq.worker.samples import photo


@pytest.fixture
def stub() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.servers.openai_stub", str(port)])
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/stats", timeout=1):
                return True
        except OSError:
            return False

    wait_until(up, "OpenAI stub server")
    yield url
    proc.kill()
    proc.wait(10)


def _stub_answer(job: Job, image: bytes) -> str:
    from tests.servers.openai_stub import answer
    from vlmq.worker.preprocess import load_image

    img = load_image(
        image, factor=28, min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28, max_image_pixels=64_000_000
    )
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)  # what the engine sends
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return answer({"messages": openai_messages(job.messages, [url])})


async def test_openai_engine_end_to_end_retry_cancel_and_errors(e: Env, stub: str) -> None:
    uris = put_images(e, 3, w=320, h=240)
    start_worker(
        e,
        "w",
        engine="openai",
        model="stub-model",
        engine_args=f"base_url={stub}/v1,max_concurrency=8,retries=4",
    )
    jobs = [caption(u, job_id=f"{e.tag}-{i}") for i, u in enumerate(uris)]
    retry = caption(uris[0], "please RETRY", job_id=f"{e.tag}-retry")
    mod = moderate(uris[1], ["safe", "unsafe"], job_id=f"{e.tag}-mod")
    slow = Job(job_id=f"{e.tag}-slow", messages=[Message("user", "SLOW please")])
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit_many([*jobs, retry, mod, slow])
        results = await client.wait_many([j.job_id for j in [*jobs, retry, mod]], timeout=60)
        await wait_running(client, slow.job_id)
        await asyncio.sleep(0.5)
        assert await client.cancel(slow.job_id)
        await asyncio.sleep(1.0)
    for i, r in enumerate(results[:3]):
        assert r.state is JobState.SUCCEEDED
        assert r.text == _stub_answer(jobs[i], photo(320, 240, seed=i))
        assert r.usage is not None and r.usage.completion_tokens == 3
    assert results[3].state is JobState.SUCCEEDED  # after a 429
    assert results[4].text in ("safe", "unsafe")
    stats = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(f"{stub}/stats").read()))
    assert stats == {"cancelled": 1, "retried": 1}  # the HTTP request was aborted
