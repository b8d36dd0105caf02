"""`vlmq api` driven by the official `openai` SDK: real API processes, tansu, redis-server,
moto_server and a fake-engine worker. The SDK parses every object into its own types, so
a shape that differs from OpenAI's fails here."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import Batch
from openai.types.chat import ChatCompletion

from bench.common import api_up
from tests.helpers import Env, log_text, put_images, start_worker
from vlmq.api.records import Records
from vlmq.core.settings import Connection
from vlmq.core.state import StateStore
from vlmq.core.topology import connect_redis
from vlmq.deploy.stack import free_port, wait_until
from vlmq.producer.builders import batch_job_id

MODELS = "gpt-4o-mini=fake,fake"


class Api:
    """`vlmq api serve` processes on one stack (replicas share Redis, S3 and Kafka)."""

    def __init__(self, e: Env, **settings: Any) -> None:
        self.e = e
        self.settings = {
            "models": MODELS,
            "files_bucket": e.bucket,
            "tick_s": 0.1,
            "lease_s": 2,
            "batch_window": 16,
            **settings,
        }
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, name: str = "api", **more: Any) -> str:
        port = free_port()
        env = self.e.worker_env(**{**self.settings, **more}, port=port, replica_id=name)
        log = open(self.e.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "vlmq.cli", "api", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[port] = proc
        self.e.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: api_up(url, proc), f"vlmq api on {port}", 60)
        return f"{url}/v1"

    def kill(self, base_url: str) -> None:
        port = int(base_url.split(":")[2].split("/", maxsplit=1)[0])
        proc = self.procs.pop(port)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def key(self, tenant: str, scope: str = "write") -> str:
        """A key for `tenant` of this test (tests share one Redis: names are per test)."""
        tenant = f"{tenant}-{self.e.tag}"

        async def go() -> str:
            redis = connect_redis(
                Connection.load({"redis_url": self.e.redis, "redis_topology": self.e.topology})
            )
            try:
                return await Records(redis).create_key(tenant, "write" if scope == "write" else "read")
            finally:
                await redis.aclose()

        return asyncio.run(go())

    def client(self, base_url: str, tenant: str = "acme", scope: str = "write") -> openai.OpenAI:
        return openai.OpenAI(base_url=base_url, api_key=self.key(tenant, scope), max_retries=0, timeout=60)


@pytest.fixture
def api(e: Env) -> Iterator[Api]:
    yield Api(e)


def line(custom_id: str, uri: str | None = None, model: str = "gpt-4o-mini", **body: Any) -> str:
    content: list[dict[str, Any]] = [{"type": "text", "text": f"Describe {custom_id}."}]
    if uri:
        content.append({"type": "image_url", "image_url": {"url": uri}})
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "max_tokens": 16,
                "messages": [{"role": "user", "content": content}],
                **body,
            },
        }
    )


def upload(client: openai.OpenAI, tmp: Path, lines: list[str], name: str = "in.jsonl") -> str:
    path = tmp / name
    path.write_text("\n".join(lines) + "\n")
    with path.open("rb") as f:
        return client.files.create(file=f, purpose="batch").id


def start_batch(client: openai.OpenAI, tmp: Path, lines: list[str]) -> Batch:
    """Upload `lines` and start a chat-completions batch on them."""
    file_id = upload(client, tmp, lines)
    return client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def wait_status(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout: float = 120) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in statuses:
            return b
        assert time.monotonic() < deadline, f"batch stayed {b.status}: {b}"
        time.sleep(0.1)


def rows(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


@pytest.mark.topologies
def test_the_sdk_batch_example_runs_unchanged(e: Env, api: Api, tmp_path: Path, topology: str) -> None:
    """OpenAI's own flow: upload, create, poll, download; results equal `vlmq bulk`'s."""
    uris = put_images(e, 6, w=64, h=48)
    lines = [line(f"req-{i}", uris[i]) for i in range(6)]
    lines.append(line("req-missing", f"s3://{e.bucket}/nope.jpg"))
    lines.append(line("req-text"))
    start_worker(e, "w", engine_args="step_ms=1")
    client = api.client(api.start())

    file_id = upload(client, tmp_path, lines)
    f = client.files.retrieve(file_id)
    assert (f.purpose, f.bytes, f.filename) == ("batch", (tmp_path / "in.jsonl").stat().st_size, "in.jsonl")
    batch = client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
    done = wait_status(client, batch.id, {"completed", "failed"})
    assert done.status == "completed", done.errors
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (8, 7, 1)
    for stamp in ("created_at", "in_progress_at", "finalizing_at", "completed_at", "expires_at"):
        assert isinstance(getattr(done, stamp), int), stamp
    assert done.usage is not None and done.usage.output_tokens > 0
    assert done.model == "fake"

    out, err = rows(client, done.output_file_id), rows(client, done.error_file_id)
    assert sorted(r["custom_id"] for r in out) == sorted([f"req-{i}" for i in range(6)] + ["req-text"])
    for r in out:
        assert r["response"]["status_code"] == 200 and r["error"] is None
        completion = ChatCompletion.model_validate(r["response"]["body"])
        assert completion.choices[0].logprobs is None and completion.choices[0].message.content
    (missing,) = err
    assert missing["custom_id"] == "req-missing" and missing["response"]["status_code"] == 400
    assert missing["response"]["body"]["error"]["code"] == "image_not_found"
    assert "0x" not in json.dumps(err) and "Traceback" not in json.dumps(err)
    assert client.files.retrieve(done.output_file_id or "").purpose == "batch_output"
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)

    # The same file through `vlmq bulk`: the same answers, line for line.
    src = tmp_path / "in.jsonl"
    src.write_text(src.read_text().replace('"gpt-4o-mini"', '"fake"'))
    env = {**e.worker_env()}
    run = [sys.executable, "-m", "vlmq.cli", "bulk"]
    subprocess.run([*run, "submit", "same", "--openai", str(src)], env=env, check=True, capture_output=True)
    subprocess.run([*run, "watch", "same", "--timeout", "60"], env=env, check=True, capture_output=True)
    exported = tmp_path / "bulk.jsonl"
    subprocess.run([*run, "export", "same", "-o", str(exported), "--format", "openai"], env=env, check=True)
    bulk = {r["custom_id"]: r for r in map(json.loads, exported.read_text().splitlines())}
    for r in out:
        theirs = bulk[r["custom_id"]]["response"]["body"]["choices"][0]["message"]["content"]
        assert r["response"]["body"]["choices"][0]["message"]["content"] == theirs


def test_openais_own_example_runs_with_only_base_url_and_key(e: Env, api: Api, tmp_path: Path) -> None:
    start_worker(e, "w")
    base = api.start()
    src = tmp_path / "batchinput.jsonl"
    src.write_text("\n".join(line(f"request-{i}") for i in range(3)) + "\n")
    env = {**os.environ, "OPENAI_BASE_URL": base, "OPENAI_API_KEY": api.key("example")}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "examples/openai_batch.py", str(src)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and proc.stderr.startswith("completed"), proc.stderr[-2000:]
    got = sorted(json.loads(x)["custom_id"] for x in proc.stdout.splitlines() if x.strip())
    assert got == [f"request-{i}" for i in range(3)]


BAD_LINES = [
    ("{not json", "invalid_json_line"),
    (json.dumps({"method": "POST"}), "missing_required_parameter"),
    (line("x1", model="gpt-9-imaginary"), "model_not_found"),
    (line("x2").replace('"POST"', '"GET"'), "invalid_method"),
    (line("x3").replace("/v1/chat/completions", "/v1/embeddings"), "invalid_url"),
    (line("x4", "ftp://host/a.jpg"), "invalid_image_url"),
    (line("x5", max_tokens=-1), "invalid_request"),
    (line("ok-1"), None),
]


def test_a_malformed_file_fails_validation_with_every_line(e: Env, api: Api, tmp_path: Path) -> None:
    client = api.client(api.start())
    lines = [bad for bad, _ in BAD_LINES] + [line("ok-1")]  # the last duplicates ok-1
    batch = start_batch(client, tmp_path, lines)
    failed = wait_status(client, batch.id, {"failed", "in_progress", "completed"})
    assert failed.status == "failed" and failed.failed_at and failed.errors and failed.errors.data
    got = [(x.line, x.code) for x in failed.errors.data]
    want = [(i + 1, code) for i, (_, code) in enumerate(BAD_LINES) if code] + [(9, "duplicate_custom_id")]
    assert got == want
    for x in failed.errors.data:
        assert x.message and "0x" not in x.message
    assert failed.output_file_id is None and failed.request_counts is not None
    assert failed.request_counts.total == 0


def test_requests_and_limits_are_refused_with_openai_errors(e: Env, api: Api, tmp_path: Path) -> None:
    base = api.start(max_file_lines=3, max_file_bytes=10_000)
    client = api.client(base)
    with pytest.raises(openai.BadRequestError, match="more than 3 lines"):
        upload(client, tmp_path, [line(f"r{i}") for i in range(4)])
    with pytest.raises(openai.APIStatusError, match="larger than") as big:
        upload(client, tmp_path, ["x" * 20_000])
    assert big.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune")
    file_id = upload(client, tmp_path, [line("r0")])
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={f"k{i}": "v" for i in range(17)},
        )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0).files.list()


def test_tenant_quotas(e: Env, api: Api, tmp_path: Path) -> None:
    """Files past a tenant's bytes are refused; a batch that would take its queued requests
    past the limit fails at validation, and nothing of it is sent."""
    client = api.client(api.start(tenant_max_file_bytes=3000, tenant_max_queued=5))
    small = upload(client, tmp_path, [line(f"r{i}") for i in range(6)])  # ~1.4 kB
    with pytest.raises(openai.APIStatusError, match="would pass 3000 bytes") as full:
        upload(client, tmp_path, [line(f"r{i}") for i in range(12)], "big.jsonl")
    assert full.value.status_code == 413
    batch = client.batches.create(
        input_file_id=small, endpoint="/v1/chat/completions", completion_window="24h"
    )
    failed = wait_status(client, batch.id, {"failed", "in_progress"})
    assert failed.status == "failed" and failed.errors and failed.errors.data
    assert [x.code for x in failed.errors.data] == ["request_limit_exceeded"]
    client.files.delete(small)  # gives its bytes back
    upload(client, tmp_path, [line(f"r{i}") for i in range(12)], "big.jsonl")


def test_batches_share_the_workers_and_online_requests_go_first(e: Env, api: Api, tmp_path: Path) -> None:
    """A small batch created after a big one ends long before it (each has a window of
    requests in the queue, not its whole file), and an online request made meanwhile is
    answered while both batches still run."""
    start_worker(e, "w", engine_args="step_ms=20,max_num_seqs=4", max_in_flight=8)
    base = api.start(batch_window=8)
    client = api.client(base)
    big = client.batches.create(
        input_file_id=upload(client, tmp_path, [line(f"b{i}") for i in range(200)], "big.jsonl"),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    wait_until(lambda: _completed(client, big.id) >= 8, "the big batch under way", 60)
    small = client.batches.create(
        input_file_id=upload(client, tmp_path, [line(f"s{i}") for i in range(16)], "small.jsonl"),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    t0 = time.monotonic()
    answer = client.chat.completions.create(**json.loads(line("now"))["body"])
    online_s = time.monotonic() - t0
    assert answer.choices[0].message.content
    wait_status(client, small.id, {"completed"}, 120)
    left = client.batches.retrieve(big.id)
    assert left.status == "in_progress" and left.request_counts and left.request_counts.completed < 200
    print(f"online answer in {online_s:.2f} s beside two batches")


def test_tenants_see_only_their_own(e: Env, api: Api, tmp_path: Path) -> None:
    base = api.start()
    acme, other = api.client(base, "acme"), api.client(base, "other")
    reader = api.client(base, "acme", scope="read")
    file_id = upload(acme, tmp_path, [line("a")])
    batch = acme.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(file_id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(file_id)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert [f.id for f in other.files.list()] == [] and [b.id for b in other.batches.list()] == []
    assert [f.id for f in reader.files.list()] == [file_id]
    assert [b.id for b in reader.batches.list()] == [batch.id]
    with pytest.raises(openai.PermissionDeniedError):
        reader.batches.cancel(batch.id)
    with pytest.raises(openai.ConflictError, match="has not ended"):
        acme.files.delete(file_id)  # the input of a batch that still runs
    with pytest.raises(openai.PermissionDeniedError):
        reader.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")


def test_lists_page_with_after_and_has_more(e: Env, api: Api, tmp_path: Path) -> None:
    client = api.client(api.start())
    file_id = upload(client, tmp_path, [line("a")])
    made = [
        client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(5)
    ]
    first = client.batches.list(limit=2)
    assert first.has_more and len(first.data) == 2
    every = [b.id for b in client.batches.list(limit=2)]  # the SDK follows `after` itself
    assert sorted(every) == sorted(made) and len(every) == 5
    assert client.files.delete(upload(client, tmp_path, [line("b")], "b.jsonl")).deleted


def test_cancel_mid_batch_keeps_partial_results(e: Env, api: Api, tmp_path: Path) -> None:
    start_worker(e, "w", engine_args="step_ms=40,max_num_seqs=4")
    client = api.client(api.start(batch_window=8, cancel_grace_s=30))
    lines = [line(f"r{i}") for i in range(60)]
    batch = start_batch(client, tmp_path, lines)
    wait_until(lambda: _completed(client, batch.id) >= 4, "4 requests done", 60)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    done = wait_status(client, batch.id, {"cancelled"}, 60)
    assert done.cancelled_at and done.request_counts
    out, err = rows(client, done.output_file_id), rows(client, done.error_file_id)
    assert len(out) + len(err) == 60 and len(out) == done.request_counts.completed < 60
    assert {r["custom_id"] for r in out} | {r["custom_id"] for r in err} == {f"r{i}" for i in range(60)}
    assert {r["error"]["code"] for r in err if r["error"]} == {"batch_cancelled"}
    assert client.batches.cancel(batch.id).status == "cancelled"  # asking again answers the batch


def _completed(client: openai.OpenAI, batch_id: str) -> int:
    counts = client.batches.retrieve(batch_id).request_counts
    return counts.completed if counts else 0


def test_a_batch_past_its_window_expires_with_partial_results(e: Env, api: Api, tmp_path: Path) -> None:
    start_worker(e, "w", engine_args="step_ms=30,max_num_seqs=2")
    wait_until(lambda: "partitions assigned" in log_text(e, "w"), "the worker's partitions", 60)
    client = api.client(api.start(completion_window_s=6, batch_window=4))
    lines = [line(f"r{i}") for i in range(40)]
    batch = start_batch(client, tmp_path, lines)
    assert batch.expires_at == batch.created_at + 6
    done = wait_status(client, batch.id, {"expired", "completed"}, 60)
    assert done.status == "expired" and done.expired_at and done.request_counts
    out, err = rows(client, done.output_file_id), rows(client, done.error_file_id)
    assert 0 < len(out) < 40 and len(out) + len(err) == 40
    assert {r["error"]["code"] for r in err} == {"batch_expired"}  # none says batch_cancelled


@pytest.mark.slow
def test_kill_9_of_the_api_and_a_second_replica_lose_and_duplicate_nothing(
    e: Env, api: Api, tmp_path: Path
) -> None:
    start_worker(e, "w", engine_args="step_ms=5")
    first, second = api.start("api-1"), api.start("api-2")
    client, other = api.client(first), None
    lines = [line(f"r{i}") for i in range(300)]
    batch = start_batch(client, tmp_path, lines)
    wait_until(lambda: client.batches.retrieve(batch.id).status == "in_progress", "in progress", 60)
    api.kill(first)  # whichever held the lease, the other one finishes the batch
    other = openai.OpenAI(base_url=second, api_key=client.api_key, max_retries=0)
    done = wait_status(other, batch.id, {"completed"}, 120)
    out = rows(other, done.output_file_id)
    assert Counter(r["custom_id"] for r in out) == Counter(f"r{i}" for i in range(300))

    async def writes() -> list[int]:
        redis = connect_redis(Connection.load({"redis_url": e.redis, "redis_topology": e.topology}))
        try:
            store = StateStore(redis)
            return [await store.terminal_writes(batch_job_id(batch.id, f"r{i}")) for i in range(300)]
        finally:
            await redis.aclose()

    assert set(asyncio.run(writes())) == {1}


@pytest.mark.slow
def test_a_50000_line_file_with_bounded_memory(e: Env, api: Api, tmp_path: Path) -> None:
    start_worker(e, "w", max_in_flight=512, engine_args="max_num_seqs=256")
    base = api.start(batch_window=4096)
    client = api.client(base)
    pad = "x" * 200  # ~300 bytes a line: 15 MB
    lines = [line(f"r{i:05d}", user=pad) for i in range(50_000)]
    file_id = upload(client, tmp_path, lines)
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    pid = next(iter(api.procs.values())).pid
    peak, slowest, deadline = 0, 0.0, time.monotonic() + 400
    while True:
        t0 = time.monotonic()
        b = client.batches.retrieve(batch.id)
        if b.status == "validating":  # the replica validating the file still answers
            slowest = max(slowest, time.monotonic() - t0)
        if b.status in ("completed", "failed"):
            break
        peak = max(peak, _rss(pid))
        assert time.monotonic() < deadline, b
        time.sleep(0.1)
    assert b.status == "completed" and b.request_counts and b.request_counts.completed == 50_000
    print(
        f"API peak RSS with a 50,000-line file: {peak / 1e6:.0f} MB; slowest answer while validating: {slowest:.3f} s"
    )
    assert peak < 400 * 1024 * 1024, f"API peak RSS {peak / 1e6:.0f} MB"
    assert slowest < 2.0, f"the validating replica took {slowest:.1f} s to answer"
    assert sum(1 for _ in client.files.content(b.output_file_id or "").iter_lines()) == 50_000


def _rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1]) * 1024


def test_online_chat_completions_and_backpressure(e: Env, api: Api, tmp_path: Path) -> None:
    base = api.start(online_max_queued=2, online_timeout_s=30)
    client = api.client(base)
    body = json.loads(line("c"))["body"]

    async def flood() -> list[Any]:
        aclient = openai.AsyncOpenAI(base_url=base, api_key=client.api_key, max_retries=0, timeout=60)
        waiting = [asyncio.create_task(aclient.chat.completions.create(**body)) for _ in range(2)]
        await asyncio.sleep(1.0)  # no worker yet: both wait in the queue
        with pytest.raises(openai.RateLimitError) as full:
            await aclient.chat.completions.create(**body)
        assert full.value.response.headers["retry-after"] == "1"
        start_worker(e, "w")
        return await asyncio.gather(*waiting)

    answers = asyncio.run(flood())
    assert all(isinstance(a, ChatCompletion) and a.choices[0].message.content for a in answers)
    with pytest.raises(openai.NotFoundError, match="model"):
        client.chat.completions.create(**{**body, "model": "gpt-9-imaginary"})
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini", "fake"]
