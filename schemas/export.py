"""Write the contract's JSON Schema files (run by `vlmq schema export`). Pure: no network."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import msgspec

from vlmq.schemas.job import DeadLetter, Job, Result

FILES = {"job.schema.json": Job, "result.schema.json": Result, "dead-letter.schema.json": DeadLetter}


def render() -> dict[str, str]:
    """File name -> its JSON text, deterministic so a test can compare with the committed files."""
    return {
        name: json.dumps(_clean(msgspec.json.schema(tp)), indent=2, sort_keys=True) + "\n"
        for name, tp in FILES.items()
    }


def _clean(node: Any) -> Any:
    """Descriptions come from docstrings, which Python 3.13 dedents and 3.11 does not: the
    same text whichever Python writes the files."""
    if isinstance(node, dict):
        return {
            k: inspect.cleandoc(v) if k == "description" and isinstance(v, str) else _clean(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def export(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render().items():
        path = out_dir / name
        path.write_text(text)
        paths.append(path)
    return paths
