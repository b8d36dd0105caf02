"""structlog setup: JSON lines for machines, readable lines for people at a terminal.

Libraries' own stdlib logging (aiokafka, botocore, ...) goes through the same renderer, one
line per record, never a traceback (the exception becomes an `error` field), and at most one
line per message template and logger every RATE_S: a broker that is gone makes aiokafka
log ~75 lines a second, which would drown the worker's own lines."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal, TextIO, cast

import structlog
from structlog.typing import EventDict, WrappedLogger

from vlmq.core import tracing

RATE_S = 10.0


class RateLimit(logging.Filter):
    """One record per (logger, message template) every `every_s`; the next one let through
    says how many were held back (`suppressed`)."""

    def __init__(self, every_s: float = RATE_S, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.every_s, self.clock = every_s, clock
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self.clock()
        last, held = self._seen.get(key, (-self.every_s, 0))
        if now - last < self.every_s:
            self._seen[key] = (last, held + 1)
            return False
        self._seen[key] = (now, 0)
        if held:
            record.suppressed = held
        return True


def _one_line(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """A library's record: its exception as one `error` field, not a traceback."""
    exc = event.pop("exc_info", None)
    if isinstance(exc, tuple) and exc[1] is not None:
        event["error"] = f"{type(exc[1]).__name__}: {exc[1]}"
    record = event.get("_record")  # a stdlib record: RateLimit may have noted what it held back
    held = getattr(record, "suppressed", None)
    if held:
        event["suppressed"] = held
    return event


def _trace_ids(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """The current trace and span ids, so a log line leads to its trace (core/tracing.py)."""
    if tracing.ON:
        event.update(tracing.ids())
    return event


class _Stderr:
    """sys.stderr as it is when a line is written: loggers are cached at first use, and a
    command run in-process (CliRunner, the CLI mistake sweep) swaps sys.stderr per run."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(fmt: Literal["auto", "json", "console"] = "auto", level: str = "INFO") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RateLimit())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                _one_line,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    for name in ("botocore.credentials", "aiobotocore.credentials"):  # "Found credentials in ..."
        logging.getLogger(name).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _trace_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _Stderr())),
        cache_logger_on_first_use=True,
    )
