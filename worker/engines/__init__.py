"""Engines behind one protocol. `make_engine` builds one from the worker's settings."""

from __future__ import annotations

from typing import Any

from vlmq.schemas.errors import ErrorCode, VlmqError
from vlmq.worker.engines.base import Engine, EngineOutput, EngineRequest

ENGINES = ("fake", "vllm", "lmdeploy", "openai")

__all__ = ["ENGINES", "Engine", "EngineOutput", "EngineRequest", "make_engine"]


def _coerce(value: str) -> Any:
    """`--engine-arg` values arrive as strings: give ints, floats, bools and JSON their type."""
    import json

    try:
        return json.loads(value)
    except ValueError:
        return value


def make_engine(name: str, model: str | None, args: dict[str, str]) -> Engine:
    options = {k: _coerce(v) for k, v in args.items()}
    if name == "fake":
        from vlmq.worker.engines.fake import FakeEngine

        return FakeEngine(model or "fake", **options)
    if not model:
        raise VlmqError(ErrorCode.UNSUPPORTED, f"engine {name!r} needs --model (a path or HF id)")
    if name == "vllm":
        from vlmq.worker.engines.vllm import VllmEngine

        return VllmEngine(model, **options)
    if name == "lmdeploy":
        from vlmq.worker.engines.lmdeploy import LmdeployEngine

        return LmdeployEngine(model, **options)
    if name == "openai":
        from vlmq.worker.engines.openai import OpenAIEngine

        return OpenAIEngine(model, **options)
    raise VlmqError(ErrorCode.UNSUPPORTED, f"engine {name!r} is not one of {', '.join(ENGINES)}")
