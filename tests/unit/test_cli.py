"""The CLI's error boundary maps each kind of error to one line and its exit code; a bug
(anything else) is not hidden behind a friendly line."""

from __future__ import annotations

import importlib

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from redis.exceptions import ConnectionError as RedisConnectionError

from vlmq.cli.errors import Exit, UserError, explain
from vlmq.deploy.stack import StackError
from vlmq.producer.errors import BatchNotFound, JobNotFound, NothingToSubmit, Unavailable, ValidationError


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
