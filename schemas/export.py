"""Write the contract's JSON Schema files (run by `vlmq schema export`). Pure: no network."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from vlmq.schemas.job import DeadLetter, Job, Result

FILES = {"job.schema.json": Job, "result.schema.json": Result, "dead-letter.schema.json": DeadLetter}


def render() -> dict[str, str]:
    """File name -> its JSON text, deterministic so a test can compare with the committed files."""
    return {
        name: json.dumps(msgspec.json.schema(tp), indent=2, sort_keys=True) + "\n"
        for name, tp in FILES.items()
    }


def export(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render().items():
        path = out_dir / name
        path.write_text(text)
        paths.append(path)
    return paths
