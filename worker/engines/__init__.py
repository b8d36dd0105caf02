"""Engines behind one protocol. `make_engine` builds one from the worker's settings."""

from __future__ import annotations

from typing import Any

from vlmq.worker.engines.base import Engine, EngineConfigError, EngineDead, EngineOutput, EngineRequest

__all__ = [
    "ENGINES",
    "Engine",
    "EngineConfigError",
    "EngineDead",
    "EngineOutput",
    "EngineRequest",
    "check_installed",
    "make_engine",
]


def _coerce(value: str) -> Any:
    """`--engine-arg` values arrive as strings: give ints, floats, bools and JSON their type."""
    import json

    try:
        return json.loads(value)
    except ValueError:
        return value


# name -> "module:class"; imported only when chosen (each engine brings heavy dependencies).
_CLASSES = {
    "fake": "fake:FakeEngine",
    "vllm": "vllm:VllmEngine",
    "lmdeploy": "lmdeploy:LmdeployEngine",
    "hf": "hf:HfEngine",
    "openai": "openai:OpenAIEngine",
}
ENGINES = tuple(_CLASSES)
# What each engine imports when it starts, and the extra that installs it.
_NEEDS = {"vllm": ("vllm",), "lmdeploy": ("lmdeploy",), "hf": ("torch", "transformers", "xgrammar")}
_EXTRAS = {"vllm": "vllm", "lmdeploy": "lmdeploy", "hf": "hf"}


def check_installed(name: str) -> None:
    """EngineConfigError now, naming the extra to install, rather than an ImportError from
    inside the engine when it starts."""
    import importlib.util

    for module in _NEEDS.get(name, ()):
        if importlib.util.find_spec(module) is None:
            extra = _EXTRAS.get(name, "worker")
            raise EngineConfigError(
                f"engine {name!r} needs {module}, which is not installed: pip install 'vlmq[{extra}]'"
            )


def make_engine(name: str, model: str | None, args: dict[str, str]) -> Engine:
    """The engine `name` for `model`; a wrong name, a missing model or an option the engine
    does not take is an EngineConfigError that says which."""
    import importlib

    if name not in _CLASSES:
        raise EngineConfigError(f"engine {name!r} is not one of {', '.join(ENGINES)}")
    if not model and name != "fake":
        raise EngineConfigError(f"engine {name!r} needs --model (a path or HF id)")
    module, cls = _CLASSES[name].split(":")
    engine_cls = getattr(importlib.import_module(f"vlmq.worker.engines.{module}"), cls)

    try:
        engine: Engine = engine_cls(model or "fake", **{k: _coerce(v) for k, v in args.items()})
    except TypeError as exc:  # an unexpected keyword: an option this engine does not have
        raise EngineConfigError(f"engine {name!r}: {exc}") from None
    return engine
