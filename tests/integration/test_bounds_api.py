"""A real `vlmq api` (tansu, redis-server, moto_server) under bodies that are too large or
nested too deep: 413 with the limit before the body is read, 400 for any nesting, and a
batch file with a line nested 100,000 deep fails validation (or is cancelled) instead of
staying `validating` or `cancelling` forever."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.helpers import Env
from tests.integration.test_api import Api, line, upload, wait_status

MB = 1024 * 1024
LIMIT = MB
DEEP = 100_000


@pytest.fixture
def api(e: Env) -> Iterator[Api]:
    yield Api(e)


def _rss(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(x for x in status if x.startswith(f"{field}:")).split()[1]) * 1024


def _reset_peak(pid: int) -> None:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def _chunks(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    """A body with no Content-Length (chunked), made as it is sent."""
    chunk = b"x" * size
    for _ in range(total // size):
        yield chunk


def _assert_413(resp: httpx.Response, limit: int) -> None:
    assert resp.status_code == 413, resp.text
    error = resp.json()["error"]
    assert str(limit) in error["message"] and error["type"] == "invalid_request_error"
    assert error["code"] == "request_too_large"


def test_bodies_over_their_limit_are_413_before_they_are_read(e: Env, api: Api, tmp_path: Path) -> None:
    base = api.start(max_request_bytes=LIMIT, max_file_bytes=LIMIT)
    pid = next(iter(api.procs.values())).pid
    auth = {"Authorization": f"Bearer {api.key('acme')}"}
    framed = LIMIT + 1024 * 1024  # an upload: the file and its multipart framing
    with httpx.Client(base_url=base.removesuffix("/v1"), headers=auth, timeout=60) as http:
        before = _rss(pid, "VmRSS")
        _reset_peak(pid)
        declared = b"{" + b" " * (64 * MB) + b"}"
        for path in ("/v1/chat/completions", "/v1/batches"):
            _assert_413(
                http.post(path, content=declared, headers={"Content-Type": "application/json"}), LIMIT
            )
            _assert_413(http.post(path, content=_chunks(64 * MB)), LIMIT)
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        _assert_413(http.post("/dashboard/login", content=_chunks(64 * MB), headers=form), LIMIT)
        files = {"file": ("in.jsonl", b"x" * (framed + 1))}
        _assert_413(http.post("/v1/files", files=files, data={"purpose": "batch"}), framed)
        grew = _rss(pid, "VmHWM") - before
        print(f"API RSS {before / MB:.0f} MB; after 64 MB bodies its peak grew {grew / MB:.0f} MB")
        assert grew < 30 * MB, f"the API's peak RSS grew {grew / MB:.0f} MB"
        # Under the limits, as before.
        assert http.get("/v1/models").status_code == 200
    client = api.client(base)
    assert upload(client, tmp_path, [line("r0")])


def test_json_bodies_nested_to_any_depth_are_a_400(e: Env, api: Api) -> None:
    base = api.start()
    auth = {"Authorization": f"Bearer {api.key('acme')}", "Content-Type": "application/json"}
    nested = b"[" * DEEP + b"]" * DEEP
    bodies = [
        nested,
        b'{"model": "fake", "messages": ' + nested + b"}",
        b'{"a": ' * DEEP + b"1" + b"}" * DEEP,
    ]
    with httpx.Client(base_url=base.removesuffix("/v1"), headers=auth, timeout=60) as http:
        for path in ("/v1/chat/completions", "/v1/batches"):
            for body in bodies:
                resp = http.post(path, content=body)
                assert resp.status_code == 400, (path, resp.status_code, resp.text[:200])
                assert resp.json()["error"]["type"] == "invalid_request_error"


def test_a_batch_file_nested_100000_deep_fails_validation_and_cancels(
    e: Env, api: Api, tmp_path: Path
) -> None:
    client = api.client(api.start())
    deep = json.dumps({"custom_id": "deep"})[:-1] + ', "body": ' + "[" * DEEP + "]" * DEEP + "}"
    file_id = upload(client, tmp_path, ["[" * DEEP + "]" * DEEP, deep, line("ok")])
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    failed = wait_status(client, batch.id, {"failed", "in_progress", "completed"}, timeout=60)
    assert failed.status == "failed" and failed.errors and failed.errors.data
    assert [(x.line, x.code) for x in failed.errors.data] == [
        (1, "invalid_json_line"),
        (2, "invalid_json_line"),
    ]
    # Cancelled while it validates: it ends, instead of `cancelling` forever.
    again = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    client.batches.cancel(again.id)
    ended = wait_status(client, again.id, {"cancelled", "failed"}, timeout=60)
    assert ended.status in ("cancelled", "failed")
