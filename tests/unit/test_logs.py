"""Libraries' stdlib log records: one structured line each, rate-limited, no traceback."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
import structlog

from vlmq.core.logs import RateLimit, configure


def record(msg: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    info = (type(exc), exc, None) if exc else None
    return logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, msg, args, info)


def test_one_line_per_template_per_interval_then_the_count_held_back() -> None:
    clock = [0.0]
    limit = RateLimit(every_s=10, clock=lambda: clock[0])
    first = [limit.filter(record("Unable connect to node %s", n)) for n in range(75)]
    assert first == [True] + [False] * 74
    assert limit.filter(record("another message"))  # templates are limited apart
    clock[0] = 10.0
    later = record("Unable connect to node %s", 1)
    assert limit.filter(later) and getattr(later, "suppressed", 0) == 74


def test_a_library_record_is_one_json_line_without_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure("json", "INFO")
    try:
        raise ConnectionError("node 111 not ready")
    except ConnectionError:
        logging.getLogger("aiokafka").error("Unexpected error in fetcher", exc_info=True)
    finally:
        root.handlers[:], root.level = handlers, level
        structlog.reset_defaults()
    lines = err.getvalue().splitlines()
    assert len(lines) == 1, lines
    line = json.loads(lines[0])
    assert line["event"] == "Unexpected error in fetcher" and line["logger"] == "aiokafka"
    assert line["error"] == "ConnectionError: node 111 not ready"
    assert "Traceback" not in lines[0]
