"""Engines behind one protocol. `make_engine` builds one from the worker's settings."""

from __future__ import annotations

import importlib
import os
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
# vlmq[hf] brings torch, PyPI's CUDA build on Linux (gigabytes); on a machine without a GPU:
TORCH_CPU = " (it brings torch; for the CPU-only build, first: pip install torch --index-url https://download.pytorch.org/whl/cpu)"


def check_installed(name: str) -> None:
    """EngineConfigError now, naming the extra to install, rather than an ImportError from
    inside the engine when it starts."""
    import importlib.util

    for module in _NEEDS.get(name, ()):
        if importlib.util.find_spec(module) is None:
            extra = _EXTRAS.get(name, "worker")
            raise EngineConfigError(
                f"engine {name!r} needs {module}, which is not installed: pip install 'vlmq[{extra}]'"
                + (TORCH_CPU if name == "hf" else "")
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


# Engines that load a model folder or a Hugging Face id themselves.
_LOCAL_MODELS = ("hf", "vllm", "lmdeploy")
HUB_TIMEOUT_S = 10.0


def check_model(engine: str, model: str | None) -> None:
    """EngineConfigError now for a model that cannot load: a folder that is not there, or
    an id the hub does not know (transformers would retry the hub for minutes, then print a
    traceback). An id already in the local cache is not looked up."""
    if engine not in _LOCAL_MODELS or not model:
        return
    if os.path.exists(os.path.expanduser(model)):
        return
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise EngineConfigError(
            f"--model {model}: no such folder here; give a model folder or a Hugging Face id (org/name)"
        )
    _check_hub_id(model)


def _check_hub_id(model: str) -> None:
    try:  # by name: the dev venv (mypy's) has no huggingface_hub, the engine venvs do
        hub = importlib.import_module("huggingface_hub")
        not_found = importlib.import_module("huggingface_hub.errors").RepositoryNotFoundError
    except ImportError:  # not installed: the engine's own import says which extra
        return
    if isinstance(hub.try_to_load_from_cache(model, "config.json"), str):
        return
    where = f"download it first (hf download {model}) or give its folder"
    if hub.constants.HF_HUB_OFFLINE:
        raise EngineConfigError(
            f"model {model!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: {where}"
        )
    try:
        hub.model_info(model, timeout=HUB_TIMEOUT_S)
    except not_found:
        raise EngineConfigError(
            f"no model {model!r} on the Hugging Face hub (misspelled? a private one needs HF_TOKEN), "
            "and no folder of that name here"
        ) from None
    except Exception as exc:  # no network, a proxy, a 5xx: one line, not minutes of retries
        raise EngineConfigError(
            f"model {model!r} is not in the Hugging Face cache and the hub cannot be reached "
            f"({type(exc).__name__}): {where}"
        ) from None
