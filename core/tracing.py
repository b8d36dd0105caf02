"""OpenTelemetry traces across producer, Kafka, worker, engine and Redis (docs/operations.md
"Traces"). Off unless the standard `OTEL_*` variables ask for an exporter; then one trace
follows a job from its submit (or the HTTP request that made it) through the worker.

Off costs nothing but a flag test: every helper here checks `ON` first and hands back a
shared no-op, and opentelemetry is never imported. The context travels in W3C `traceparent`
/ `tracestate` Kafka headers, which are outside the submit digest (schemas.codec), so a
producer that sends none is served as before and starts a new trace at the worker.

Attributes follow OpenTelemetry's semantic conventions (messaging for Kafka, db for Redis,
http for fetches) and never carry prompts, image URLs or results unless `VLMQ_TRACE_CONTENT`
says so (even then URL credentials are redacted)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextvars import ContextVar
from functools import wraps
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

from vlmq.core.settings import SettingsError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanContext, Tracer

ON = False  # set once by `setup` (a vlmq process) or `use_host_provider` (the SDK in an app)
CONTENT = False  # VLMQ_TRACE_CONTENT: prompts, redacted URLs and results as attributes
MAX_CONTENT = 1024  # characters of a prompt or result kept on a span
PROPAGATED = frozenset({"traceparent", "tracestate", "baggage"})
MAX_PENDING_COMMITS = 100_000  # jobs whose commit span waits; past this, none is kept
_tracer: Tracer | None = None
# Whether the current job's trace is recorded: set by `consumed` from its sampler's decision,
# so the spans of a job the sampler left out are not made at all (a context variable: each
# job runs in tasks of its own). True outside a job: the SDK's sampler decides there.
_recording: ContextVar[bool] = ContextVar("vlmq_trace_recording", default=True)
_pending: dict[tuple[str, int, int], tuple[SpanContext, int]] = {}

P = ParamSpec("P")
T = TypeVar("T")


class TracingError(SettingsError):
    """Tracing was asked for (OTEL_* variables) but cannot run: a settings mistake (the
    CLI's boundary prints it in one line, exit 2)."""

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)  # SettingsError words msgspec's errors; this is ours


# -- setup ------------------------------------------------------------------------------


def wanted(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The exporters the OTEL_* variables ask for: none unless an exporter or an OTLP
    endpoint is named (the spec's default exporter would make every install trace)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if named:
        return [] if named == ["none"] else [e for e in named if e != "none"]
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return ["otlp"] if any(environ.get(k) for k in endpoints) else []


def setup(service: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Install the global tracer provider of a vlmq process (`vlmq worker`, `vlmq api
    serve`, `vlmq submit` ...) when the environment asks for traces. The sampler
    (OTEL_TRACES_SAMPLER), the batch processor (OTEL_BSP_*), the resource
    (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES) and the exporter's endpoint, headers and
    timeout come from the same variables, read by OpenTelemetry itself."""
    global CONTENT
    if ON:  # `vlmq worker` sets up in the root command and again in the worker's own
        return True
    exporters = wanted(environ)
    CONTENT = environ.get("VLMQ_TRACE_CONTENT", "").strip().lower() in ("1", "true", "yes", "on")
    if not exporters:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise TracingError(
            "traces are asked for (OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT) but "
            "OpenTelemetry is not installed: pip install 'vlmq[otel]', or unset those variables"
        ) from None
    named = "OTEL_SERVICE_NAME" in environ or "service.name=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    own = {"process.pid": os.getpid()} | ({} if named else {SERVICE_NAME: service})
    provider = TracerProvider(resource=Resource.create(own))
    for name in exporters:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, environ)))
    trace.set_tracer_provider(provider)
    _enable(provider.get_tracer("vlmq"))
    return True


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise TracingError(f"OTEL_TRACES_EXPORTER={name!r}: vlmq sends traces by otlp or console")
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

        return Grpc()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

        return Http()
    raise TracingError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: vlmq sends grpc or http/protobuf")


def use_host_provider() -> bool:
    """For the SDK inside an application: trace when the application installed an SDK
    tracer provider before making its Client (a library never installs one itself)."""
    if ON:
        return True
    try:
        from opentelemetry import trace
    except ImportError:
        return False
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return False
    _enable(provider.get_tracer("vlmq"))
    return True


def _enable(tracer: Tracer) -> None:
    global ON, _tracer
    _tracer, ON = tracer, True


# -- spans ------------------------------------------------------------------------------


def span(
    name: str, attributes: Mapping[str, Any] | None = None, kind: str = "internal"
) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one (a no-op when off). An exception escaping it is
    recorded, with `error.type` set to its vlmq error code when it has one."""
    if not ON or _unsampled():
        return contextlib.nullcontext()
    return _span(name, kind, attributes or {})


@contextlib.contextmanager
def _span(
    name: str,
    kind: str,
    attributes: Mapping[str, Any],
    context: Context | None = None,
) -> Iterator[Span]:
    from opentelemetry.trace import SpanKind

    assert _tracer is not None
    with _tracer.start_as_current_span(
        name,
        context=context,
        kind=SpanKind[kind.upper()],
        attributes=_clean(attributes),
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except BaseException as exc:
            if not _cancelled(exc):
                fail(_code(exc), str(exc), current)
            raise


class Traced(Protocol):
    """What `traced` returns: a decorator that keeps the function's signature."""

    def __call__(self, fn: Callable[P, Coroutine[Any, Any, T]], /) -> Callable[P, Coroutine[Any, Any, T]]: ...


def traced(name: str, attributes: Mapping[str, Any] | None = None, kind: str = "internal") -> Traced:
    """`span` around every call of an async function (nothing added when off)."""

    def wrap(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        async def spanned(*args: P.args, **kwargs: P.kwargs) -> T:
            with _span(name, kind, attributes or {}):
                return await fn(*args, **kwargs)

        @wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T]:
            if not ON or _unsampled():  # the function's own coroutine: no frame added
                return fn(*args, **kwargs)
            return spanned(*args, **kwargs)

        return call

    return wrap


def timed(
    name: str,
    start_s: float,
    end_s: float,
    attributes: Mapping[str, Any] | None = None,
    context: Context | None = None,
) -> None:
    """A span for a stretch already over, measured elsewhere (Kafka's wait from the
    produce timestamp, the engine's own first-token time): a child of the current span,
    or of `context`."""
    if not ON or end_s < start_s or (context is None and _unsampled()):
        return
    assert _tracer is not None
    done = _tracer.start_span(
        name, context=context, attributes=_clean(attributes or {}), start_time=_ns(start_s)
    )
    done.end(end_time=_ns(end_s))


def _unsampled() -> bool:
    """Inside a job whose trace the sampler left out: its children would be left out too
    (the parent-based and trace-id-ratio samplers decide alike for one trace), so none is
    made. Making and dropping them cost the worker more than the rest of tracing."""
    return not _recording.get()


def annotate(attributes: Mapping[str, Any]) -> None:
    """Attributes on the current span (a no-op when off or outside a span)."""
    if ON:
        from opentelemetry import trace

        trace.get_current_span().set_attributes(_clean(attributes))


def fail(code: str, message: str, target: Span | None = None) -> None:
    """Mark the current span (or `target`) failed with a vlmq error code."""
    if not ON:
        return
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    current = target or trace.get_current_span()
    current.set_attribute("error.type", code)
    current.set_status(Status(StatusCode.ERROR, message[:MAX_CONTENT]))


def content(attributes: Mapping[str, Any]) -> None:
    """Attributes that carry user content: only with VLMQ_TRACE_CONTENT, cut to MAX_CONTENT."""
    if ON and CONTENT:
        annotate({k: str(v)[:MAX_CONTENT] for k, v in attributes.items()})


def trace_id() -> str | None:
    """The current trace's id (32 hex digits), for the job's record; None when off or
    when the sampler left the trace out (no collector would have it to link to)."""
    return ids().get("trace_id") if ON and _recording.get() else None


def ids() -> dict[str, str]:
    """The current trace and span ids as log fields (empty when off or outside a span)."""
    if not ON:
        return {}
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


# -- Kafka headers ----------------------------------------------------------------------


def inject(headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """`headers` plus the current context's W3C headers (unchanged when off)."""
    if not ON:
        return headers
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return headers + [(k, v.encode("ascii", "replace")) for k, v in carrier.items()]


def extract(headers: Sequence[tuple[str, bytes]] | None) -> Context | None:
    """The context a message carries (None: off, or a message without one). A malformed
    header is ignored by the propagator: the job starts a new trace."""
    if not ON or not headers:
        return None
    from opentelemetry import propagate

    carrier = {k.lower(): v.decode("latin-1") for k, v in headers if k.lower() in PROPAGATED}
    return propagate.extract(carrier) if carrier else None


def consumed(
    topic: str, partition: int, offset: int, headers: Any, produced_ms: int, group: str
) -> contextlib.AbstractContextManager[Any]:
    """The span of one Kafka message's processing, continuing the producer's trace, with
    the message's wait in the topic (from its produce timestamp) as its first child."""
    if not ON:
        return contextlib.nullcontext()
    return _consumed(topic, partition, offset, headers, produced_ms, group)


@contextlib.contextmanager
def _consumed(
    topic: str, partition: int, offset: int, headers: Any, produced_ms: int, group: str
) -> Iterator[None]:
    now = time.time()
    attributes = _messaging(topic, "process", "process") | {
        "messaging.destination.partition.id": str(partition),
        "messaging.kafka.offset": offset,
        "messaging.consumer.group.name": group,
    }
    parent = extract(headers)
    with _span(f"process {topic}", "consumer", attributes, context=parent) as current:
        recording = _recording.set(current.is_recording())
        try:
            if produced_ms > 0 and current.is_recording():  # beside it under the producer's, or inside
                timed(f"wait {topic}", produced_ms / 1000, now, {"messaging.destination.name": topic}, parent)
            yield
        finally:
            _recording.reset(recording)


def producing(topic: str, job_id: str, batch_id: str | None = None) -> contextlib.AbstractContextManager[Any]:
    """The span of one job's submit (`send`): inject inside it, so the worker's spans are
    its children."""
    if not ON:
        return contextlib.nullcontext()
    return _span(f"send {topic}", "producer", _message(topic, "send", job_id, batch_id))


def created(topic: str, job_id: str, batch_id: str | None = None) -> contextlib.AbstractContextManager[Any]:
    """One job of a batch submit (`create`): the first span of a trace of its own, linked
    to the current span (the batch's submit), so a million-job batch is not one trace."""
    if not ON:
        return contextlib.nullcontext()
    from opentelemetry import context, trace

    links = [trace.Link(here)] if (here := trace.get_current_span().get_span_context()).is_valid else []
    assert _tracer is not None
    attributes = _clean(_message(topic, "create", job_id, batch_id))
    root = context.Context()  # no parent: a new trace
    return _tracer.start_as_current_span(
        f"create {topic}", context=root, kind=trace.SpanKind.PRODUCER, attributes=attributes, links=links
    )


def _messaging(topic: str, kind: str, name: str) -> dict[str, Any]:
    """Kafka's attributes in the messaging conventions (`kind`: operation type)."""
    return {
        "messaging.system": "kafka",
        "messaging.operation.type": kind,
        "messaging.operation.name": name,
        "messaging.destination.name": topic,
    }


def _message(topic: str, operation: str, job_id: str, batch_id: str | None) -> dict[str, Any]:
    return _messaging(topic, operation, operation) | {
        "messaging.message.id": job_id,
        "vlmq.job_id": job_id,
        "vlmq.batch_id": batch_id,
    }


def redis(script: str) -> Traced:
    """A db span around a StateStore call (one Lua script or pipeline)."""
    attributes = {
        "db.system.name": "redis",
        "db.operation.name": "EVALSHA",
        "db.stored_procedure.name": script,
    }
    return traced(f"redis {script}", attributes, "client")


# -- offset commits ---------------------------------------------------------------------


def awaiting_commit(topic: str, partition: int, offset: int) -> None:
    """This message is done; its commit span starts now and ends when its offset is."""
    if ON and _recording.get() and len(_pending) < MAX_PENDING_COMMITS:
        from opentelemetry import trace

        current = trace.get_current_span()
        if current.is_recording():
            _pending[(topic, partition, offset)] = (current.get_span_context(), time.time_ns())


def committed(offsets: Mapping[Any, int], group: str) -> None:
    """Each waiting message below a committed offset (keys: aiokafka's TopicPartition)
    gets its commit span."""
    if not ON or not _pending:
        return
    from opentelemetry import trace

    assert _tracer is not None
    now = time.time_ns()
    ends = {(tp.topic, tp.partition): off for tp, off in offsets.items()}
    for key in [k for k in _pending if k[2] < ends.get(k[:2], -1)]:
        ctx, start = _pending.pop(key)
        parent = trace.set_span_in_context(trace.NonRecordingSpan(ctx))
        attributes = _messaging(key[0], "settle", "commit") | {"messaging.consumer.group.name": group}
        span_ = _tracer.start_span(
            f"commit {key[0]}", context=parent, attributes=attributes, start_time=start
        )
        span_.end(end_time=now)


def forget(partitions: Any) -> None:
    """Revoked partitions (aiokafka's TopicPartitions): their uncommitted messages get no
    commit span here."""
    gone = {(tp.topic, tp.partition) for tp in partitions}
    for key in [k for k in _pending if k[:2] in gone]:
        del _pending[key]


# -- helpers ----------------------------------------------------------------------------


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes OpenTelemetry takes: no None, enums as their value."""
    out: dict[str, Any] = {}
    for k, v in attributes.items():
        if v is None:
            continue
        if isinstance(v, list | tuple):
            out[k] = [str(x) for x in v]
        else:
            out[k] = v if isinstance(v, str | bool | int | float) else str(getattr(v, "value", v))
    return out


def _code(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return str(getattr(code, "value", code)) if code is not None else type(exc).__name__


def _cancelled(exc: BaseException) -> bool:
    import asyncio

    return isinstance(exc, asyncio.CancelledError | GeneratorExit)
