"""One trace from submit to result (core/tracing.py), exported by real vlmq processes over
OTLP/HTTP to a receiver the test starts: a caller's span in this process, `vlmq api serve`,
`vlmq submit` / `vlmq bulk submit` and a fake-engine worker, on tansu, redis-server and
moto_server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator

import httpx2 as httpx
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tests.helpers import Env, log_text, put_images, start_worker
from tests.integration.test_api import Api
from tests.servers.otlp import Got, Receiver, otlp_receiver
from vlmq.api.records import Records
from vlmq.core.settings import Connection
from vlmq.core.topology import connect_redis
from vlmq.deploy.stack import wait_until
from vlmq.producer.builders import batch_job_id

SERVER, PRODUCER, CONSUMER = 2, 4, 5  # OTLP's SpanKind numbers
ERROR = 2
PROMPT = "Describe the secret garden in one line."


@pytest.fixture
def otlp(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dict[str, str], Receiver]]:
    """The receiver, and the variables that point a vlmq process at it."""
    with otlp_receiver() as (endpoint, got):
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)  # Api.start and the CLI runs copy this process's env
        yield env, got


def _worker(e: Env, otel: dict[str, str]) -> None:
    start_worker(e, "w", env=otel)
    wait_until(lambda: "partitions assigned" in log_text(e, "w"), "the worker's partitions", 60)


def _one(spans: list[Got], name: str) -> Got:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def _children(spans: list[Got], parent: Got) -> set[str]:
    return {s.name for s in spans if s.parent_id == parent.span_id}


def test_a_job_through_the_api_is_one_trace_across_three_processes(
    e: Env, otlp: tuple[dict[str, str], Receiver]
) -> None:
    otel, got = otlp
    _worker(e, otel)
    api = Api(e)
    base = api.start(trace_url="https://traces.example/trace/{trace_id}")
    uri = put_images(e, 1, prefix="traced")[0]
    # The caller: its own tracer provider (never the global one of this test process).
    caller_spans = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "caller"}))
    provider.add_span_processor(SimpleSpanProcessor(caller_spans))
    with provider.get_tracer("test").start_as_current_span("caller", kind=SpanKind.CLIENT) as caller:
        headers = {"Authorization": f"Bearer {api.key('acme')}"}
        TraceContextTextMapPropagator().inject(headers)
        body = {
            "model": "gpt-4o-mini",
            "max_tokens": 8,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": PROMPT},
                        {"type": "image_url", "image_url": {"url": uri}},
                    ],
                }
            ],
        }
        answer = httpx.post(f"{base}/chat/completions", json=body, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    trace_id = format(caller.get_span_context().trace_id, "032x")
    commit = f"commit {e.jobs_topic}"
    wait_until(lambda: any(s.name == commit for s in got.trace(trace_id)), "the job's commit span", 30)
    spans = got.trace(trace_id)

    assert {s.service for s in spans} == {"vlmq-api", "vlmq-worker"}  # + the caller: three processes
    server = _one(spans, "POST /v1/chat/completions")
    assert (server.service, server.kind, server.parent_id) == (
        "vlmq-api",
        SERVER,
        format(caller.get_span_context().span_id, "016x"),
    )
    assert server.attributes["http.response.status_code"] == 200
    send = _one(spans, f"send {e.jobs_topic}")
    assert (send.kind, send.parent_id) == (PRODUCER, server.span_id)
    job_id = send.attributes["messaging.message.id"]
    process = _one(spans, f"process {e.jobs_topic}")
    assert (process.service, process.kind, process.parent_id) == ("vlmq-worker", CONSUMER, send.span_id)
    assert process.attributes["vlmq.job_id"] == job_id and process.attributes["vlmq.job.state"] == "succeeded"
    assert process.status != ERROR
    wait = _one(spans, f"wait {e.jobs_topic}")
    assert wait.parent_id == send.span_id and wait.start_ns <= process.start_ns
    assert {"redis claim", "vlmq.fetch", "vlmq.engine", "redis finish", commit} <= _children(spans, process)
    engine = _one(spans, "vlmq.engine")
    assert {"vlmq.engine.prefill", "vlmq.engine.generate"} <= _children(spans, engine)
    assert engine.attributes["gen_ai.usage.output_tokens"] > 0
    assert _one(spans, "redis claim").attributes["db.system.name"] == "redis"
    # No content unless VLMQ_TRACE_CONTENT: neither the prompt nor the image's URL.
    values = json.dumps([s.attributes for s in spans])
    assert PROMPT not in values and uri not in values and "url.full" not in values
    # The job's page links its trace; its log lines lead there too.
    page = _dashboard_page(e, base, f"/dashboard/jobs/{job_id}")
    assert f'href="https://traces.example/trace/{trace_id}"' in page
    lines = [json.loads(x) for x in log_text(e, "w").splitlines() if job_id in x and x.startswith("{")]
    assert lines and all(x.get("trace_id") == trace_id for x in lines if x.get("event") == "job ended")


def _dashboard_page(e: Env, base: str, path: str) -> str:
    """`path` as an operator sees it (an admin key's session)."""

    async def admin_key() -> str:
        redis = connect_redis(Connection.load({"redis_url": e.redis, "redis_topology": e.topology}))
        try:
            return await Records(redis).create_key(f"ops-{e.tag}", admin=True)
        finally:
            await redis.aclose()

    root = base.removesuffix("/v1")
    with httpx.Client(base_url=root, timeout=30) as browser:
        browser.post("/dashboard/login", data={"key": asyncio.run(admin_key()), "next": path})
        answer = browser.get(path)
        assert answer.status_code == 200, answer.text
        return answer.text


def test_cli_submits_continue_into_the_worker_with_errors_and_batch_links(
    e: Env, otlp: tuple[dict[str, str], Receiver]
) -> None:
    otel, got = otlp
    _worker(e, otel)
    env = e.worker_env() | otel
    missing = f"s3://{e.bucket}/nothing-here.jpg"
    run = [sys.executable, "-m", "vlmq.cli", "submit", missing, "--job-id", f"bad-{e.tag}", "--wait", "60"]
    failed = subprocess.run(run, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1, failed.stderr
    manifest = e.tmp / "m.jsonl"
    manifest.write_text(
        "".join(json.dumps({"key": f"b{i}", "image": u}) + "\n" for i, u in enumerate(put_images(e, 2)))
    )
    bulk = [sys.executable, "-m", "vlmq.cli", "bulk", "submit", f"batch-{e.tag}", "--manifest", str(manifest)]
    sent = subprocess.run(bulk, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr

    process = f"process {e.jobs_topic}"
    wait_until(lambda: len(got.named(process)) >= 3, "three processed jobs' spans", 60)
    by_job = {s.attributes["vlmq.job_id"]: s for s in got.named(process)}

    bad = by_job[f"bad-{e.tag}"]
    spans = got.trace(bad.trace_id)
    send = _one(spans, f"send {e.jobs_topic}")
    assert send.service == "vlmq-submit" and bad.parent_id == send.span_id
    assert bad.status == ERROR and bad.attributes["error.type"] == "image_not_found"
    fetch = _one(spans, "vlmq.fetch")
    assert fetch.status == ERROR and fetch.attributes["error.type"] == "image_not_found"
    assert f"send {e.dlq_topic}" in _children(spans, bad)

    batch_span = _one(got.named("vlmq.submit_many"), "vlmq.submit_many")
    assert batch_span.service == "vlmq-bulk"
    for i in range(2):
        job = by_job[batch_job_id(f"batch-{e.tag}", f"b{i}")]
        assert job.trace_id != batch_span.trace_id  # a trace per job ...
        create = _one(got.trace(job.trace_id), f"create {e.jobs_topic}")
        assert create.links == [batch_span.trace_id]  # ... linked to the batch's submit
        assert job.parent_id == create.span_id and job.attributes["vlmq.batch_id"] == f"batch-{e.tag}"
