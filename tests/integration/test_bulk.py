"""Bulk backlogs through the real CLI, on real tansu + redis-server + moto_server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest

from tests.helpers import Env, read_topic, start_worker
from vlmq.producer import Client
from vlmq.producer.bulk import BadLine, Preset, from_manifest
from vlmq.schemas import ChoiceFormat, Job, JobState, TextPart
from vlmq.worker.samples import photo


def vlmq(e: Env, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**e.worker_env(), "VLMQ_JOBS_TOPIC": e.jobs_topic}
    proc = subprocess.run(
        [sys.executable, "-m", "vlmq.cli", *args],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_s3_prefix_with_5000_objects(e: Env) -> None:
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=e.s3, config=Config(max_pool_connections=16))
    body = photo(32, 24)
    keys = [f"shots/{i:05d}.jpg" for i in range(5000)] + [f"shots/notes-{i}.txt" for i in range(20)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=e.bucket, Key=k, Body=body), keys))
    s3.put_object(Bucket=e.bucket, Key="elsewhere/x.jpg", Body=body)
    out = vlmq(e, "bulk", "submit", e.tag, "--s3", f"s3://{e.bucket}/shots/", "--labels", "safe,unsafe")
    assert "5000 sent" in out.stderr
    status = json.loads(vlmq(e, "bulk", "status", e.tag, "--json").stdout)
    assert (status["total"], status["queued"]) == (5000, 5000)
    assert len(msgs := _messages(e, 5000)) == 5000
    assert len(set(msgs)) == 5000
    again = vlmq(e, "bulk", "submit", e.tag, "--s3", f"s3://{e.bucket}/shots/", "--labels", "safe,unsafe")
    assert "0 sent, 5000 already sent" in again.stderr


def _messages(e: Env, expect: int) -> list[str]:
    import asyncio

    return [m.key.decode() for m in asyncio.run(read_topic(e, e.jobs_topic, expect))]


BAD_OPENAI = [
    ("{not json", "not JSON"),
    ('["a list"]', "must be a JSON object"),
    ('{"method": "POST"}', "custom_id"),
    (
        '{"custom_id": "dup", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}]}}',
        "",
    ),
    (
        '{"custom_id": "dup", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}]}}',
        "duplicate",
    ),
    (
        '{"custom_id": "get", "method": "GET", "url": "/v1/chat/completions", "body": {}}',
        "method must be POST",
    ),
    ('{"custom_id": "emb", "url": "/v1/embeddings", "body": {}}', "url must be"),
    ('{"custom_id": "nobody", "url": "/v1/chat/completions"}', "body"),
    (
        '{"custom_id": "empty", "url": "/v1/chat/completions", "body": {"messages": []}}',
        "messages is missing or empty",
    ),
    (
        '{"custom_id": "role", "url": "/v1/chat/completions", "body": {"messages": [{"role": "robot", "content": "x"}]}}',
        "needs role",
    ),
    (
        '{"custom_id": "audio", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}}',
        "unsupported content part",
    ),
    (
        '{"custom_id": "http", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.jpg"}}]}]}}',
        "scheme not allowed",
    ),
    (
        '{"custom_id": "ftp", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.jpg"}}]}]}}',
        "scheme not allowed",
    ),
    (
        '{"custom_id": "nourl", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}}',
        "image_url.url is missing",
    ),
    (
        '{"custom_id": "vftp", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "ftp://x/y.mp4"}}]}]}}',
        "video URL scheme not allowed",
    ),
    (
        '{"custom_id": "vnourl", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": [{"type": "video_url"}]}]}}',
        "video_url.url is missing",
    ),
    (
        '{"custom_id": "fmt", "url": "/v1/chat/completions", "body": {"response_format": {"type": "json_object"}, "messages": [{"role": "user", "content": "x"}]}}',
        "response_format not supported",
    ),
    (
        '{"custom_id": "neg", "url": "/v1/chat/completions", "body": {"max_tokens": -3, "messages": [{"role": "user", "content": "x"}]}}',
        "$.sampling.max_tokens",
    ),
]


def _openai_line(custom_id: str, uri: str, **body: object) -> str:
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "fake",
                "max_tokens": 32,
                **body,
                "messages": [
                    {"role": "system", "content": "You caption photos."},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is in this image?"},
                            {"type": "image_url", "image_url": {"url": uri}},
                        ],
                    },
                ],
            },
        }
    )


@pytest.mark.topologies
def test_openai_batch_file_bad_lines_reported_rest_submitted_and_exported(e: Env, tmp_path: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=e.s3)
    for i in range(6):
        s3.put_object(Bucket=e.bucket, Key=f"p/{i}.jpg", Body=photo(64, 48, seed=i))
    good = [_openai_line(f"req-{i}", f"s3://{e.bucket}/p/{i}.jpg") for i in range(6)]
    good.append(_openai_line("req-missing", f"s3://{e.bucket}/p/none.jpg"))
    good.append(
        _openai_line(
            "req-json",
            f"s3://{e.bucket}/p/0.jpg",
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"label": {"enum": ["cat", "dog"]}}},
                },
            },
        )
    )
    lines = good[:4] + [b for b, _ in BAD_OPENAI] + good[4:]
    src = tmp_path / "batch.jsonl"
    src.write_text("\n".join(lines) + "\n")
    rejected = tmp_path / "rejected.jsonl"
    out = vlmq(e, "bulk", "submit", e.tag, "--openai", str(src), "--rejected", str(rejected))
    assert (
        "9 sent" in out.stderr and f"{len(BAD_OPENAI) - 1} rejected" in out.stderr
    )  # 8 good + the first "dup"
    rows = [json.loads(x) for x in rejected.read_text().splitlines()]
    expected = [(i + 5, why) for i, (_, why) in enumerate(BAD_OPENAI) if why]  # 4 good lines first
    for (n, why), row in zip(expected, rows, strict=True):
        assert row["line"] == n and why in row["reason"], (n, why, row)

    start_worker(e, "w", engine_args="step_ms=2")
    watched = vlmq(e, "bulk", "watch", e.tag, "--timeout", "60")
    assert "jobs/s" in watched.stderr and "9/9" in watched.stderr  # the rate it promises
    res, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    vlmq(e, "bulk", "export", e.tag, "--out", str(res), "--format", "openai", "--errors", str(err))
    outputs = {json.loads(x)["custom_id"]: json.loads(x) for x in res.read_text().splitlines()}
    errors = {json.loads(x)["custom_id"]: json.loads(x) for x in err.read_text().splitlines()}
    assert set(outputs) == {f"req-{i}" for i in range(6)} | {"req-json", "dup"}
    missing = errors["req-missing"]["response"]
    assert (missing["status_code"], missing["body"]["error"]["code"]) == (400, "image_not_found")
    assert json.loads(outputs["req-json"]["response"]["body"]["choices"][0]["message"]["content"])[
        "label"
    ] in ("cat", "dog")
    plain = tmp_path / "plain.jsonl"
    vlmq(e, "bulk", "export", e.tag, "--out", str(plain))
    records = [json.loads(x) for x in plain.read_text().splitlines()]
    assert len(records) == 9 and {r["state"] for r in records} == {"succeeded", "failed"}
    by_custom = {r["metadata"]["custom_id"]: r for r in records}
    for cid, row in outputs.items():
        assert row["response"]["body"]["choices"][0]["message"]["content"] == by_custom[cid]["text"]


def test_manifest_lines_short_and_full(tmp_path: Path) -> None:
    lines = [
        json.dumps({"key": "a", "image": "s3://b/a.jpg"}),
        json.dumps({"key": "b", "image": "s3://b/b.jpg", "labels": ["ok", "not ok"]}),
        json.dumps(
            {
                "key": "c",
                "messages": [{"role": "user", "content": "text only"}],
                "sampling": {"max_tokens": 5},
            }
        ),
        json.dumps({"key": "d"}),
        json.dumps({"key": "e", "image": "ftp://nope"}),
        "",
    ]
    items = list(from_manifest(lines, "m1", Preset(prompt="Caption it.")))
    a, b, c, d, bad = items
    assert isinstance(a, Job) and isinstance(b, Job) and isinstance(c, Job)
    assert isinstance(d, BadLine) and isinstance(bad, BadLine)
    part = a.messages[0].parts[1]
    assert a.job_id.startswith("m1:a:") and isinstance(part, TextPart) and part.text == "Caption it."
    assert isinstance(b.response_format, ChoiceFormat) and b.response_format.choices == ["ok", "not ok"]
    assert c.sampling.max_tokens == 5 and c.metadata == {"key": "c"}
    assert (d.line, bad.line) == (4, 5) and "ftp" in bad.reason


@pytest.mark.topologies
def test_resume_after_a_kill_submits_each_job_once(e: Env, tmp_path: Path) -> None:
    n, chunk = 4000, 100
    src = tmp_path / "m.jsonl"
    src.write_text("".join(json.dumps({"key": f"k{i}", "image": "s3://b/x.jpg"}) + "\n" for i in range(n)))
    env = {**e.worker_env(), "VLMQ_JOBS_TOPIC": e.jobs_topic}
    args = [
        sys.executable,
        "-m",
        "vlmq.cli",
        "bulk",
        "submit",
        e.tag,
        "--manifest",
        str(src),
        "--chunk",
        str(chunk),
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def recorded() -> int:
        async def count() -> int:
            async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
                return (await client.store.batch_counts(e.tag)).total

        return asyncio.run(count())

    deadline = time.monotonic() + 120
    while recorded() < 1000:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = recorded()
    assert partial < n, "the kill came too late"
    out = vlmq(e, "bulk", "submit", e.tag, "--manifest", str(src), "--chunk", str(chunk))
    assert "already sent" in out.stderr
    counts = Counter(_messages(e, n))
    assert len(counts) == n  # every job is in Kafka
    # At most what was in flight at the kill goes twice: the chunk whose acks were being
    # recorded and the next one, already handed to the producer (submit_many overlaps them).
    assert sum(counts.values()) - n <= 2 * chunk
    assert recorded() == n


async def test_iter_results_streams_every_ended_job_of_a_batch(e: Env) -> None:
    start_worker(e, "w")
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        lines = [
            json.dumps({"key": f"k{i}", "messages": [{"role": "user", "content": f"n{i}"}]})
            for i in range(30)
        ]
        jobs = [j for j in from_manifest(lines, e.tag, Preset()) if isinstance(j, Job)]
        assert len(jobs) == 30
        await client.submit_many(jobs)
        await client.wait_many([j.job_id for j in jobs], timeout=60)
        got = [r async for r in client.iter_results(e.tag)]
    assert sorted(r.job_id for r in got) == sorted(j.job_id for j in jobs)
    assert all(r.state is JobState.SUCCEEDED for r in got)
