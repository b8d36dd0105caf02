"""core/tracing.py without servers: when the environment turns traces on, what a message's
headers carry, and the spans a job's stages make (OpenTelemetry's in-memory exporter; the
OTLP path through real processes is tests/integration/test_tracing.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka import TopicPartition
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from vlmq.core import tracing
from vlmq.schemas.errors import ErrorCode, VlmqError


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({}, []),  # the spec's default exporter is otlp: vlmq still traces only when asked
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, []),
    ],
)
def test_traces_only_where_the_environment_asks(env: dict[str, str], exporters: list[str]) -> None:
    assert tracing.wanted(env) == exporters


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "otlp or console"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "grpc or http/protobuf",
        ),
    ],
)
def test_an_exporter_vlmq_cannot_send_by_is_a_settings_error(
    env: dict[str, str], says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracing, "ON", False)
    with pytest.raises(tracing.TracingError, match=says):
        tracing.setup("vlmq-test", env)
    assert not tracing.ON


def test_off_costs_nothing_and_changes_no_message() -> None:
    assert not tracing.ON
    headers = [("content-type", b"application/msgpack")]
    assert tracing.inject(headers) is headers
    assert tracing.extract([("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")]) is None
    assert tracing.ids() == {}
    with tracing.span("x"), tracing.producing("t", "j"), tracing.consumed("t", 0, 1, headers, 1, "g"):
        pass


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory (a provider of this test's own, never the global one)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(tracing, "ON", True)
    monkeypatch.setattr(tracing, "_pending", {})
    yield exporter
    provider.shutdown()


def _named(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    (found,) = [s for s in exporter.get_finished_spans() if s.name == name]
    return found


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_a_message_carries_its_submit_into_the_worker(spans: InMemorySpanExporter) -> None:
    headers = [("content-type", b"application/msgpack")]
    with tracing.producing("jobs", "job-1", "batch-1"):
        sent = tracing.inject(headers)
    assert [k for k, _ in sent] == ["content-type", "traceparent"]
    produced_ms = int(time.time() * 1000) - 50
    with (
        tracing.consumed("jobs", 3, 17, sent, produced_ms, "workers"),
        tracing.span("redis claim", kind="client"),
    ):
        pass
    send, process = _named(spans, "send jobs"), _named(spans, "process jobs")
    assert process.kind is SpanKind.CONSUMER and process.parent is not None
    assert process.parent.span_id == send.context.span_id
    assert process.context.trace_id == send.context.trace_id
    assert _attrs(process)["messaging.kafka.offset"] == 17
    assert _attrs(send)["vlmq.batch_id"] == "batch-1"
    wait = _named(spans, "wait jobs")  # beside the process span, from the produce time
    assert wait.parent is not None and wait.parent.span_id == send.context.span_id
    assert wait.start_time is not None and wait.start_time <= produced_ms * 1_000_000 + 1_000_000
    claim = _named(spans, "redis claim")
    assert claim.parent is not None and claim.parent.span_id == process.context.span_id


@pytest.mark.parametrize(
    "headers",
    [
        None,
        [],
        [("traceparent", b"not-a-traceparent")],
        [("traceparent", b"\xff\xfe" * 40), ("tracestate", b"=" * 9000)],
    ],
)
def test_a_message_without_a_usable_context_starts_a_trace(
    headers: list[tuple[str, bytes]] | None, spans: InMemorySpanExporter
) -> None:
    with tracing.consumed("jobs", 0, 1, headers, 0, "workers"):
        pass
    process = _named(spans, "process jobs")
    assert process.parent is None and process.context.trace_id != 0


def test_errors_carry_the_job_error_code(spans: InMemorySpanExporter) -> None:
    with pytest.raises(VlmqError), tracing.span("vlmq.fetch"):
        raise VlmqError(ErrorCode.IMAGE_NOT_FOUND, "no such key")
    fetch = _named(spans, "vlmq.fetch")
    assert fetch.status.status_code is StatusCode.ERROR
    assert _attrs(fetch)["error.type"] == "image_not_found"


def test_a_batch_submit_gives_each_job_a_trace_linked_to_the_batch(spans: InMemorySpanExporter) -> None:
    with tracing.span("vlmq.submit_many") as batch:
        for i in range(3):
            with tracing.created("jobs", f"j{i}", "b"):
                pass
    creates = [s for s in spans.get_finished_spans() if s.name == "create jobs"]
    assert len({s.context.trace_id for s in creates}) == 3
    for c in creates:
        assert c.parent is None and c.context.trace_id != batch.get_span_context().trace_id
        assert [link.context.span_id for link in c.links] == [batch.get_span_context().span_id]


def test_commit_spans_end_with_the_commit_of_their_offsets(spans: InMemorySpanExporter) -> None:
    tp = TopicPartition("jobs", 2)
    for offset in (5, 6, 7):
        with tracing.consumed("jobs", 2, offset, None, 0, "workers"):
            tracing.awaiting_commit("jobs", 2, offset)
    tracing.committed({tp: 7}, "workers")  # the next offset to read: 5 and 6 are committed
    commits = [s for s in spans.get_finished_spans() if s.name == "commit jobs"]
    processed = {
        s.context.span_id: _attrs(s)["messaging.kafka.offset"]
        for s in spans.get_finished_spans()
        if s.name == "process jobs"
    }
    assert sorted(processed[c.parent.span_id] for c in commits if c.parent) == [5, 6]
    tracing.forget([tp])  # revoked: offset 7 is the next owner's
    tracing.committed({tp: 8}, "workers")
    assert len([s for s in spans.get_finished_spans() if s.name == "commit jobs"]) == 2


def test_content_stays_off_spans_unless_asked(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tracing.span("a"):
        tracing.content({"url.full": "s3://b/k"})
    assert "url.full" not in _attrs(_named(spans, "a"))
    monkeypatch.setattr(tracing, "CONTENT", True)
    with tracing.span("b"):
        tracing.content({"vlmq.prompt": "x" * 5000})
    assert _attrs(_named(spans, "b"))["vlmq.prompt"] == "x" * tracing.MAX_CONTENT


def test_log_lines_carry_the_trace(spans: InMemorySpanExporter) -> None:
    with tracing.span("a") as current:
        ids = tracing.ids()
    assert ids["trace_id"] == format(current.get_span_context().trace_id, "032x")
    assert ids["span_id"] == format(current.get_span_context().span_id, "016x")


def test_a_trace_the_sampler_left_out_makes_no_child_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    monkeypatch.setattr(tracing, "_tracer", TracerProvider(sampler=ALWAYS_OFF).get_tracer("test"))
    monkeypatch.setattr(tracing, "ON", True)
    monkeypatch.setattr(tracing, "_pending", {})
    with tracing.consumed("jobs", 0, 1, None, 1, "workers"):
        assert tracing.ids()  # the trace is there (its id in the logs), unrecorded
        assert tracing.trace_id() is None  # but a job's record names no trace nobody has
        with tracing.span("redis claim") as child:
            assert child is None  # not even made
        tracing.awaiting_commit("jobs", 0, 1)
    assert tracing._pending == {}
