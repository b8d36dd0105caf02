"""The GGUF lane: a llama.cpp server (llama-server, built from llama.cpp's source by
tests/cpu_engines/llama_server.sh) serving a GGUF Qwen2-VL and its mmproj, made from a
random-weight checkpoint by llama.cpp's own converter, behind a real `vlmq worker
--engine openai -e structured=llama.cpp` fed through Kafka with S3 images: the path of
GPUStack's llama-box. Part of `make test` (engines lane); alone: `make gguf-test`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Env, http_server, log_text, put_images, read_topic, start_worker, stop_worker
from vlmq.deploy.stack import free_port, wait_until, worker_ready
from vlmq.producer import Client, caption, moderate
from vlmq.schemas import (
    ErrorCode,
    ImageRef,
    Job,
    JobState,
    JsonSchemaFormat,
    Message,
    Part,
    RegexFormat,
    Sampling,
    TextPart,
)

PYTHON = os.environ.get("VLMQ_TEST_ENGINES_PYTHON", "")
LLAMA = Path(os.environ.get("VLMQ_TEST_LLAMA_CPP", "/nonexistent"))
ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (PYTHON and (LLAMA / "bin" / "llama-server").exists()),
        reason="needs llama.cpp's server and the CPU engines venv: run `make gguf-test`",
    ),
]
SCHEMA = {"type": "object", "properties": {"safe": {"type": "boolean"}}, "required": ["safe"]}


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random Qwen2-VL (make_model.py) as GGUF + mmproj (make_gguf.py)."""
    root = tmp_path_factory.mktemp("gguf")
    model = root / "tiny-qwen2-vl"
    run = [PYTHON, "bench/gpu/make_model.py", "tiny-qwen2-vl", str(model), "--random-weights"]
    subprocess.run(run, cwd=ROOT, check=True, capture_output=True, timeout=300)
    made = []
    for extra in ([], ["--mmproj"]):
        convert = [PYTHON, "bench/gpu/make_gguf.py", str(LLAMA / "llama.cpp"), str(model), str(root), *extra]
        out = subprocess.run(convert, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
        made.append(Path(out.stdout.strip().splitlines()[-1]))
    return made[0], made[1]


@contextlib.contextmanager
def llama_server(e: Env, model: Path, mmproj: Path) -> Iterator[str]:
    port = free_port()
    argv = [str(LLAMA / "bin" / "llama-server"), "--model", str(model), "--mmproj", str(mmproj)]
    argv += ["--alias", "tiny", "--jinja", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--ctx-size", "8192", "--parallel", "4", "--threads", "2"]
    with http_server(e, "llama-server", argv, port, 120) as url:
        yield url


async def test_gguf_qwen2_vl_through_llama_server(e: Env, gguf: tuple[Path, Path]) -> None:
    """One- and two-image jobs (the second image reaches the model: the prompt grows by an
    image's tokens), a choice as a GBNF grammar, JSON schema; a regex job fails
    `unsupported_input` and is dead-lettered; the worker serves on."""
    uris = put_images(e, 2, w=320, h=240)
    port = free_port()
    with llama_server(e, *gguf) as server:
        proc = start_worker(
            e,
            "gguf",
            metrics_port=port,
            max_in_flight=8,
            args=(
                "--engine",
                "openai",
                "--model",
                "tiny",
                "-e",
                f"base_url={server}/v1",
                "-e",
                "structured=llama.cpp",
            ),
        )
        await asyncio.to_thread(
            wait_until, lambda: worker_ready(port) or proc.poll() is not None, "the worker", 120
        )
        assert proc.poll() is None, log_text(e, "gguf")[-3000:]
        t = e.tag
        two: list[Part] = [ImageRef(uris[0]), TextPart("And this?"), ImageRef(uris[1])]
        jobs = {
            "one": caption(uris[0], job_id=f"{t}-one", max_tokens=8),
            "two": Job(job_id=f"{t}-two", messages=[Message("user", two)], sampling=Sampling(max_tokens=8)),
            "choice": moderate(uris[1], ["safe", "unsafe"], job_id=f"{t}-choice"),
            "json": Job(
                job_id=f"{t}-json",
                messages=[Message("user", [ImageRef(uris[0]), TextPart("Safe?")])],
                response_format=JsonSchemaFormat(SCHEMA),
                sampling=Sampling(max_tokens=48),
            ),
            "regex": Job(
                job_id=f"{t}-regex",
                messages=[Message("user", "Three letters.")],
                response_format=RegexFormat("[a-z]{3}"),
            ),
        }
        async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
            await client.submit_many(list(jobs.values()))
            done = await client.wait_many([j.job_id for j in jobs.values()], timeout=300)
        r = dict(zip(jobs, done, strict=True))
        for name in ("one", "two", "choice", "json"):
            assert r[name].state is JobState.SUCCEEDED and r[name].usage is not None, (name, r[name].error)
        one, two_usage = r["one"].usage, r["two"].usage
        assert one is not None and two_usage is not None
        # Qwen2-VL's 336x252 crop of a 320x240 photo is 12x9 = 108 merged tokens, at least.
        assert two_usage.prompt_tokens - one.prompt_tokens >= 100, (one, two_usage)
        assert r["choice"].text in ("safe", "unsafe"), r["choice"].text
        assert isinstance(r["json"].parsed, dict) and isinstance(r["json"].parsed.get("safe"), bool), r[
            "json"
        ].text
        error = r["regex"].error
        assert error is not None and error.code is ErrorCode.UNSUPPORTED_INPUT, r["regex"]
        dead = await read_topic(e, e.dlq_topic, expect=1)
        assert [m.key.decode() for m in dead] == [r["regex"].job_id]
        print(f"gguf: one {one}, two {two_usage}, choice {r['choice'].text!r}, json {r['json'].text!r}")
        assert stop_worker(proc, timeout=60) == 0
