"""A model that cannot load is one line before the engine starts (issue 40): a folder that
is not there, an id the hub does not know, a hub that cannot be reached."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from vlmq.worker.engines import EngineConfigError, check_model


class NotFound(Exception):
    pass


def fake_hub(
    monkeypatch: pytest.MonkeyPatch, info: Any, *, cached: bool = False, offline: bool = False
) -> None:
    hub = types.ModuleType("huggingface_hub")
    hub.try_to_load_from_cache = lambda repo, name: "/cache/config.json" if cached else None  # type: ignore[attr-defined]
    hub.constants = types.SimpleNamespace(HF_HUB_OFFLINE=offline)  # type: ignore[attr-defined]
    hub.model_info = info  # type: ignore[attr-defined]
    errors = types.ModuleType("huggingface_hub.errors")
    errors.RepositoryNotFoundError = NotFound  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    monkeypatch.setitem(sys.modules, "huggingface_hub.errors", errors)


def raises(exc: Exception) -> Any:
    def info(model: str, timeout: float) -> None:
        raise exc

    return info


@pytest.mark.parametrize("engine", ["hf", "vllm", "lmdeploy"])
def test_a_missing_folder(engine: str, tmp_path: Path) -> None:
    with pytest.raises(EngineConfigError, match="no such folder here"):
        check_model(engine, str(tmp_path / "no-model"))


def test_a_folder_that_is_there_and_engines_without_models_pass(tmp_path: Path) -> None:
    check_model("hf", str(tmp_path))
    check_model("fake", "/nope")
    check_model("openai", "gpt-4o-mini")


def test_a_misspelled_id_is_not_on_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub(monkeypatch, raises(NotFound("404")))
    with pytest.raises(
        EngineConfigError, match=r"no model 'Qwen/Qwen2-VL-2B-Instrcut' on the Hugging Face hub"
    ):
        check_model("hf", "Qwen/Qwen2-VL-2B-Instrcut")


def test_an_unreachable_hub_fails_at_once_with_the_next_step(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub(monkeypatch, raises(ConnectionError("no route")))
    with pytest.raises(EngineConfigError, match=r"cannot be reached \(ConnectionError\): download it first"):
        check_model("hf", "Qwen/Qwen2-VL-2B-Instruct")


def test_offline_without_the_model_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub(monkeypatch, raises(AssertionError("no lookup offline")), offline=True)
    with pytest.raises(EngineConfigError, match="HF_HUB_OFFLINE is set"):
        check_model("hf", "Qwen/Qwen2-VL-2B-Instruct")


def test_a_cached_id_is_not_looked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub(monkeypatch, raises(AssertionError("looked up")), cached=True)
    check_model("hf", "Qwen/Qwen2-VL-2B-Instruct")
