"""The rooms depend one way. Read from the source (every import, the lazy ones inside
functions too), so a new arrow fails here before anyone has to untangle it.

    cli  ->  api  ->  producer, worker (its image fetcher, for thumbnails)
    cli  ->  producer, worker, deploy  ->  core  ->  schemas

The SDK (producer) never imports the worker and the worker never imports the SDK: what
both need lives in core (state machine, settings, logging, retries)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {
    "schemas": {"schemas"},
    "core": {"core", "schemas"},
    "producer": {"producer", "core", "schemas"},
    "worker": {"worker", "core", "schemas"},
    "deploy": {"deploy", "core", "schemas"},
    "api": {"api", "producer", "worker", "core", "schemas"},  # worker: its fetch rules (thumbnails)
    "cli": {"cli", "api", "producer", "worker", "deploy", "core", "schemas"},
}


def _imports(path: Path) -> set[str]:
    """The vlmq rooms a module imports, anywhere in it."""
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        rooms |= {n.split(".")[1] for n in names if n.startswith("vlmq.") and n.count(".") >= 1}
    return rooms


def test_every_room_imports_only_the_rooms_below_it() -> None:
    wrong = []
    for room, allowed in ALLOWED.items():
        files = sorted((ROOT / room).rglob("*.py"))
        assert files, f"room {room}/ has no modules"
        for path in files:
            for target in sorted(_imports(path) - allowed):
                wrong.append(f"{path.relative_to(ROOT)} imports vlmq.{target}")
    assert not wrong, "\n".join(wrong)


def test_every_packaged_room_is_checked() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packaged = {name.split(".")[1] for name in project["tool"]["setuptools"]["packages"]}
    assert packaged == set(ALLOWED)
    # The symlinks that let tools resolve vlmq.* without an install mirror the rooms.
    assert {p.name for p in (ROOT / "vlmq").iterdir()} == set(ALLOWED)
    assert all((ROOT / "vlmq" / room).resolve() == ROOT / room for room in ALLOWED)


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from vlmq.worker.samples import photo\n    import vlmq.core.state\n")
    assert _imports(module) == {"worker", "core"}
