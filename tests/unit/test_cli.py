"""The CLI's error boundary maps each kind of error to one line and its exit code; a bug
(anything else) is not hidden behind a friendly line."""

from __future__ import annotations

import importlib
import socket
import tomllib
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError

from vlmq.cli.errors import Exit, UserError, explain
from vlmq.core.ports import cannot_listen
from vlmq.deploy.stack import StackError
from vlmq.producer import flags
from vlmq.producer.errors import (
    BatchNotFound,
    Denied,
    Interrupted,
    JobNotFound,
    NothingToSubmit,
    Unavailable,
    ValidationError,
)
from vlmq.schemas.job import ImageRef
from vlmq.worker.engines import TORCH_CPU


def _s3_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "BucketName": "nope"}}, "ListObjectsV2")


@pytest.mark.parametrize(
    ("exc", "code", "says"),
    [
        (
            Unavailable("Redis", "redis://h:1/0", RedisConnectionError("refused")),
            Exit.UNAVAILABLE,
            "cannot reach Redis at redis://h:1/0",
        ),
        (StackError("no redis-server on PATH"), Exit.UNAVAILABLE, "no redis-server"),
        (JobNotFound("j"), Exit.NOT_FOUND, "job 'j' not found"),
        (BatchNotFound("b"), Exit.NOT_FOUND, "batch 'b' not found"),
        (NothingToSubmit("no jobs in s3://b/p"), Exit.NOT_FOUND, "no jobs"),
        (ValidationError("$.sampling.max_tokens"), Exit.USAGE, "invalid job"),
        (UserError("give --out"), Exit.USAGE, "give --out"),
        (_s3_error("NoSuchBucket"), Exit.NOT_FOUND, "bucket 'nope' does not exist"),
        (_s3_error("AccessDenied"), Exit.DENIED, "S3 refused access"),
        (
            EndpointConnectionError(endpoint_url="http://s3:9"),
            Exit.UNAVAILABLE,
            "cannot reach S3 at http://s3:9",
        ),
    ],
)
def test_each_kind_of_error_gets_its_line_and_code(exc: BaseException, code: Exit, says: str) -> None:
    explained = explain(exc)
    assert explained is not None and explained[1] is code and says in explained[0], explained


def test_a_bug_is_not_explained_away() -> None:
    assert explain(KeyError("slot")) is None and explain(ZeroDivisionError()) is None


def test_the_demos_hint_shows_the_extra_to_install(capsys: pytest.CaptureFixture[str]) -> None:
    importlib.import_module("vlmq.cli.demo")._pick_engine(None)  # rich would eat a bare [hf]
    assert "pip install 'vlmq[hf]'" in " ".join(capsys.readouterr().err.split())


def test_version_and_a_negative_wait() -> None:
    """Issue 40: `vlmq --version` did not exist; `--wait -1` was accepted."""
    from typer.testing import CliRunner

    from vlmq.cli import app

    shown = CliRunner().invoke(app, ["--version"])
    assert shown.exit_code == 0 and shown.output.startswith("vlmq ")
    refused = CliRunner().invoke(app, ["submit", "s3://b/k.jpg", "--wait", "-1"])
    assert refused.exit_code == 2


# -- issue 40, round two -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code", "says"),
    [
        (
            Denied(
                "Redis",
                "redis://u:***@h:1/0",
                AuthenticationError("WRONGPASS invalid username-password pair"),
            ),
            Exit.DENIED,
            "Redis at redis://u:***@h:1/0 refused the credentials (WRONGPASS",
        ),
        (Interrupted("interrupted: run it again"), Exit.INTERRUPTED, "run it again"),
        (AuthenticationError("invalid password"), Exit.DENIED, "refused the credentials"),  # raw, no SDK
        (RedisConnectionError("Error 111 connecting"), Exit.UNAVAILABLE, "cannot reach Redis at"),
    ],
)
def test_refused_credentials_and_interrupts_get_their_codes(
    exc: BaseException, code: Exit, says: str
) -> None:
    explained = explain(exc)
    assert explained is not None and explained[1] is code and says in explained[0], explained
    assert "is it up" not in explained[0] or code is Exit.UNAVAILABLE
    assert int(Exit.INTERRUPTED) == 130


def test_labels_flag() -> None:
    assert flags.labels(None) is None
    assert flags.labels("safe, nsfw") == ["safe", "nsfw"]
    for empty in ("", " ", " , "):
        with pytest.raises(ValidationError, match="--labels is empty"):
            flags.labels(empty)
    with pytest.raises(ValidationError, match="has an empty label"):
        flags.labels("safe,,nsfw")


def test_prompt_flag_reads_a_bounded_utf8_file(tmp_path: Path) -> None:
    assert flags.prompt("Describe it.") == "Describe it."
    assert flags.prompt("@@handle, what is this?") == "@handle, what is this?"  # @@: a literal @
    (tmp_path / "p.txt").write_text("  Describe it.\n")
    assert flags.prompt(f"@{tmp_path / 'p.txt'}") == "Describe it."
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "big.txt").write_bytes(b"x" * (flags.MAX_PROMPT_FILE_BYTES + 1))
    for name, says in [
        ("missing.txt", "does not exist"),
        ("", "is a folder"),
        ("empty.txt", "is empty"),
        ("bin.txt", "is not UTF-8 text"),
        ("big.txt", f"is over {flags.MAX_PROMPT_FILE_BYTES:,} bytes"),
    ]:
        with pytest.raises(ValidationError, match=says):
            flags.prompt(f"@{tmp_path / name}")
    with pytest.raises(ValidationError, match="needs a file name"):
        flags.prompt("@")


def test_the_hf_extra_brings_torch_and_the_hint_names_the_cpu_build() -> None:
    """`pip install 'vlmq[hf]'` did not bring torch, which the hf engine imports first."""
    with (Path(__file__).parents[2] / "pyproject.toml").open("rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert any(req.startswith("torch") for req in extras["hf"])
    assert "download.pytorch.org/whl/cpu" in TORCH_CPU


def test_a_port_in_use_or_a_foreign_address_cannot_be_listened_on() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cannot_listen("127.0.0.1", port) == "Address already in use"
    assert cannot_listen("192.0.2.1", 0) is not None  # TEST-NET-1: no interface here has it
    assert cannot_listen("127.0.0.1", 0) is None


@pytest.mark.parametrize("path", ["/home/me/cat.jpg", "cat.jpg", "./a/b.png", "~/x.jpg"])
def test_a_local_path_is_not_a_uri_scheme(path: str) -> None:
    with pytest.raises(ValueError, match="is a local path, not a URI") as got:
        ImageRef(path)
    assert path in str(got.value) and "scheme" not in str(got.value)
    with pytest.raises(ValueError, match="unknown URI scheme 'ftp'"):
        ImageRef("ftp://host/a.jpg")


def test_a_source_files_lines_are_counted_for_the_submit_bar(tmp_path: Path) -> None:
    from vlmq.producer.bulk_cli import _count_lines

    big = tmp_path / "m.jsonl"
    big.write_bytes(b'{"key": "k", "image": "s3://b/k.jpg"}\n' * 100_000)  # 3.8 MB, four reads
    assert _count_lines(big) == 100_000
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert _count_lines(tmp_path / "empty.jsonl") is None and _count_lines(None) is None
