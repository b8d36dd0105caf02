"""The online route with the official `openai` SDK: streaming, refused parameters, error
statuses the SDK does not retry into duplicates, model lookup, OpenAI-shaped validation
errors. Real `vlmq api` processes, tansu, redis-server, moto_server, a fake-engine worker."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.helpers import Env, log_text, start_worker
from tests.integration.test_api import Api, line
from vlmq.api.records import Records
from vlmq.core.settings import Connection
from vlmq.core.topology import connect_redis
from vlmq.deploy.stack import wait_until


@pytest.fixture
def api(e: Env) -> Api:
    return Api(e)


def body(text: str = "Describe it.", **more: Any) -> dict[str, Any]:
    return {**json.loads(line("x"))["body"], "messages": [{"role": "user", "content": text}], **more}


def _worker(e: Env, **settings: Any) -> None:
    start_worker(e, "w", **settings)
    wait_until(lambda: "partitions assigned" in log_text(e, "w"), "the worker's partitions", 60)


def test_stream_true_gives_chunks_the_sdk_parses(e: Env, api: Api) -> None:
    _worker(e)
    client = api.client(api.start())
    whole = client.chat.completions.create(**body())
    stream = client.chat.completions.create(**body(), stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(chunks) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    plain = list(client.chat.completions.create(**body(), stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(**body(), stream_options={"include_usage": True})
    assert bad.value.param == "stream_options"
    # Every answered request gave its slot back (the plain answer's beside its response).
    asyncio.run(_until_depth(e, 0, timeout=5))


def test_unsupported_parameters_are_refused_by_name(e: Env, api: Api) -> None:
    client = api.client(api.start())
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    cases: list[tuple[str, Any]] = [
        ("tools", [tool]),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("n", 2),
        ("frequency_penalty", 0.5),
        ("audio", {"voice": "alloy", "format": "wav"}),
    ]
    for name, value in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(**{**body(), name: value})
        assert bad.value.code == "unsupported_parameter", name
        assert bad.value.param == name and name in bad.value.message, (name, bad.value.param)
    assert _depth(e) == 0  # nothing was admitted


def test_an_engine_failure_is_one_job_and_not_retried(e: Env, api: Api) -> None:
    """engine_error is 422 (with x-should-retry: false): the SDK, left at its default
    retries, makes one job, not three."""
    _worker(e, engine_args="fail_on=EXPLODE")
    base = api.start()
    client = openai.OpenAI(base_url=base, api_key=api.key("fail"), max_retries=2, timeout=60)
    with pytest.raises(openai.UnprocessableEntityError) as failed:
        client.chat.completions.create(**body("EXPLODE now"))
    assert failed.value.code == "engine_error" and failed.value.status_code == 422
    assert failed.value.response.headers["x-should-retry"] == "false"
    # The worker logs a job's end before it publishes it: the log is complete here.
    assert log_text(e, "w").count('"error": "engine_error"') == 1
    stream = client.chat.completions.create(**body("EXPLODE again"), stream=True)
    with pytest.raises(openai.APIError, match="fake engine failure"):
        list(stream)


def test_models_by_id_and_validation_errors_in_openais_shape(e: Env, api: Api) -> None:
    client = api.client(api.start())
    assert client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    assert client.models.retrieve("fake").owned_by == "vlmq"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-9")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.batches.list(limit=101)
    assert bad.value.param == "limit" and bad.value.type == "invalid_request_error"
    raw = httpx.get(
        f"{client.base_url}batches?limit=x", headers={"Authorization": f"Bearer {client.api_key}"}
    )
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_a_stream_the_client_drops_cancels_its_job_and_frees_its_slot(e: Env, api: Api) -> None:
    _worker(e, engine_args="step_ms=200,completion_tokens=200")  # 40 s a request
    base = api.start(online_max_queued=4)
    key = api.key("drop")

    async def drop() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            request = http.build_request(
                "POST",
                f"{base}/chat/completions",
                json=body(stream=True),
                headers={"Authorization": f"Bearer {key}"},
            )
            response = await http.send(request, stream=True)
            assert response.status_code == 200
            await _until_depth(e, 1)
            await response.aclose()  # the client goes away mid-wait
            t0 = time.monotonic()
            await _until_depth(e, 0)
            print(f"a dropped stream's slot freed after {time.monotonic() - t0:.2f} s")

    asyncio.run(drop())
    wait_until(lambda: '"cancelled"' in log_text(e, "w"), "the job cancelled at the worker", 30)


async def _until_depth(e: Env, n: int, timeout: float = 20) -> None:
    redis = connect_redis(Connection.load({"redis_url": e.redis, "redis_topology": e.topology}))
    deadline = time.monotonic() + timeout
    try:
        while (depth := await Records(redis).online_depth()) != n:
            assert time.monotonic() < deadline, f"{depth} slots held, not {n}"
            await asyncio.sleep(0.05)
    finally:
        await redis.aclose()


def _depth(e: Env) -> int:
    async def go() -> int:
        redis = connect_redis(Connection.load({"redis_url": e.redis, "redis_topology": e.topology}))
        try:
            return await Records(redis).online_depth()
        finally:
            await redis.aclose()

    return asyncio.run(go())
