"""The generated mistake sweep (issue 40): every command of `vlmq`, found by walking the
command tree typer builds, run in this process with each of its options and arguments
given an empty value, a value of the wrong type, an unreachable address (the options that
name one), and run as given against a stopped stack (addresses where nothing listens, no
server binaries on PATH). Each case goes through the CLI's own error boundary
(`vlmq.cli.explain`), as `vlmq` does; a case whose exception it cannot explain is a
traceback a user would see.

`python -m tests.integration.sweep DIR` prints one JSON object per case; the test
(test_cli_sweep.py) runs it in a process of its own, since commands configure logging and
signal handlers of the process they run in."""

from __future__ import annotations

import faulthandler
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from vlmq.cli import command
from vlmq.cli.errors import explain
from vlmq.deploy.stack import free_port

# Values for required arguments, by name; anything else gets "x".
ARGUMENTS = {"IMAGE": "s3://b/k.jpg", "JOB_ID": "sweep-job", "BATCH_ID": "sweep-batch", "TENANT": "t"}
# What a command needs besides its required parameters to get past "give one of ...":
# a source, an engine, a model, folders of its own.
EXTRA = {
    "bulk submit": ["--s3", "s3://b/p/"],
    "bulk export": ["--out", "{tmp}/out.jsonl"],
    "worker": ["--engine", "fake", "--metrics-port", "0"],
    "api serve": ["--model", "m"],
    "demo": ["--state-dir", "{tmp}/demo"],
    "stack up": ["--state-dir", "{tmp}/stack"],
    "stack down": ["--state-dir", "{tmp}/stack"],
    "stack status": ["--state-dir", "{tmp}/stack"],
    "schema export": ["--out", "{tmp}/schema"],
}
STARTS_STACK = ("stack up", "demo")
ADDRESSES = ("VLMQ_REDIS_URL", "VLMQ_KAFKA_BOOTSTRAP", "VLMQ_S3_ENDPOINT_URL")
ADDRESS = re.compile(r"url|bootstrap|endpoint|host")


def commands(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    subs = getattr(cmd, "commands", None)
    if subs is None:
        yield " ".join(path), cmd
        return
    for name, sub in sorted(subs.items()):
        yield from commands(sub, (*path, name))


def base_args(name: str, cmd: Any, tmp: Path) -> list[str]:
    args = [ARGUMENTS.get(p.name.upper(), "x") for p in cmd.params if p.param_type_name == "argument"]
    return [*args, *(a.format(tmp=tmp) for a in EXTRA.get(name, []))]


def unreachable(name: str) -> str:
    if "host" in name:
        return "192.0.2.1"  # TEST-NET-1: no interface here has it, nothing answers there
    if "redis" in name:
        return f"redis://127.0.0.1:{free_port()}/0"
    if "bootstrap" in name:
        return f"127.0.0.1:{free_port()}"
    return f"http://127.0.0.1:{free_port()}"


def mistakes(cmd: Any) -> Iterator[tuple[str, Any, str]]:
    """(kind, parameter, value) for each value-taking parameter of `cmd`."""
    for p in cmd.params:
        if getattr(p, "is_flag", False):
            continue
        yield "empty value", p, ""
        kind = p.bare_type()
        if kind in ("int", "float"):
            yield "wrong type", p, "not-a-number"
        elif kind == "Path":
            yield "wrong type", p, "{tmp}/a-file/x"  # under a regular file: no such file or folder
        if ADDRESS.search(p.name):
            yield "unreachable address", p, unreachable(p.name)


def with_value(base: list[str], cmd: Any, param: Any, value: str, tmp: Path) -> list[str]:
    value = value.format(tmp=tmp)
    if param.param_type_name == "option":
        return [*base, param.opts[-1], value]  # the last occurrence wins
    position = [p for p in cmd.params if p.param_type_name == "argument"].index(param)
    return [*base[:position], value, *base[position + 1 :]]


def run(args: list[str], env: dict[str, str | None]) -> dict[str, Any]:
    """`vlmq ARGS` as the entry point runs it (typer's command tree in the boundary), with
    its output captured."""
    code, bug, said, t0 = 0, None, "", time.monotonic()
    with CliRunner().isolation(env=env) as (_, _, output):
        try:
            command().main(args=args, prog_name="vlmq")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:
            explained = explain(exc)
            if explained is None:
                bug = "".join(traceback.format_exception(exc))[-3000:]
            else:
                said, code = f"error: {explained[0]}", int(explained[1])
        out = output.getvalue().decode(errors="replace") + said
    took = round(time.monotonic() - t0, 2)
    return {
        "args": args,
        "code": code,
        "bug": bug,
        "traceback": "Traceback" in out,
        "tail": out[-600:],
        "s": took,
    }


def sweep(tmp: Path) -> Iterator[dict[str, Any]]:
    empty_bin = tmp / "bin"
    empty_bin.mkdir(parents=True, exist_ok=True)
    env: dict[str, str | None] = {
        "VLMQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "VLMQ_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "VLMQ_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "VLMQ_START_WAIT_S": "0",  # a worker facing the stopped stack says so at once
        "VLMQ_TANSU_BIN": str(tmp / "no-tansu"),
        "PATH": str(empty_bin),  # no redis-server: `stack up` and `demo` start nothing
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",  # boto3 retries a dead endpoint for seconds otherwise
        "COLUMNS": "200",
    }
    (tmp / "a-file").write_text("not a folder")
    for name, cmd in commands(command()):
        base, words = base_args(name, cmd, tmp), name.split()
        # The commands that start a stack of their own ignore the addresses: for them a
        # stopped stack is one they cannot start (no binaries).
        here = {**env, **dict.fromkeys(ADDRESSES if name in STARTS_STACK else [])}
        yield {"command": name, "case": "stopped stack", **run([*words, *base], here)}
        for kind, param, value in mistakes(cmd):
            case = f"{kind}: {param.opts[-1] if param.param_type_name == 'option' else param.name}"
            args = [*words, *with_value(base, cmd, param, value, tmp)]
            yield {"command": name, "case": case, **run(args, here)}


if __name__ == "__main__":
    where = Path(sys.argv[1])
    os.chdir(where)  # a command that writes where it runs writes here, never in the checkout
    faulthandler.dump_traceback_later(90, exit=True)  # a case that hangs names itself
    for row in sweep(where):
        print(json.dumps(row), flush=True)
