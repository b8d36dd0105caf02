"""The bad-input corpus (tests/corpus/build.py, 82 cases) through one real worker: each case
ends with its documented outcome, every failure has a dead letter, a message that cannot say
for certain which job it is writes no state at all, the worker keeps serving, and its memory
stays bounded (a decompression bomb is refused from its header, a pixel hint is clamped)."""

from __future__ import annotations

import boto3
import msgspec
import pytest

from bench.common import peak_rss_mib
from tests.corpus.build import CORPUS_SETTINGS, Case, cases
from tests.helpers import Env, produce, read_topic, start_worker, stop_worker
from vlmq.producer import Client
from vlmq.schemas import Job, JobState, Message
from vlmq.schemas.codec import decode_dead_letter

MAX_RSS_MIB = 1024


@pytest.mark.parametrize("image_pool", ["thread", "process"])
async def test_every_corpus_case_ends_as_documented(e: Env, image_pool: str) -> None:
    """process: the images are decoded in the worker's image processes; every decoder
    failure crosses back as the job's typed error."""
    corpus = cases()
    assert len(corpus) >= 50
    s3 = boto3.client("s3", endpoint_url=e.s3)
    for case in corpus:
        for key, body in case.objects.items():
            s3.put_object(Bucket=e.bucket, Key=key, Body=body)
    w = start_worker(
        e, "w", allowed_buckets=e.bucket, image_pool=image_pool, image_workers=2, **CORPUS_SETTINGS
    )
    keys = {c.name: f"{e.tag}-{c.name}" for c in corpus}
    for stateless in (False, True):  # a job that names itself for certain is recorded first
        raw = [
            (keys[c.name], _value(c, keys[c.name], e), _headers(c))
            for c in corpus
            if c.stateless is stateless
        ]
        await produce(e, raw, submitted=not stateless)
    stateful = [c for c in corpus if not c.stateless]
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        results = {r.job_id: r for r in await client.wait_many([keys[c.name] for c in stateful], timeout=120)}
        after = Job(job_id=f"{e.tag}-after", messages=[Message("user", "still there?")])
        await client.submit(after)
        assert (await client.wait(after.job_id, timeout=30)).state is JobState.SUCCEEDED
        untouched = await client.store.get_many([keys[c.name] for c in corpus if c.stateless])
    assert untouched == [None] * len(untouched), "a message that names no job for certain wrote state"
    wrong = []
    for case in stateful:
        r = results[keys[case.name]]
        got = r.error.code.value if r.state is JobState.FAILED and r.error else r.state.value
        if got != case.expect:
            wrong.append(
                f"{case.name}: expected {case.expect}, got {got} ({r.error.message[:120] if r.error else ''})"
            )
    assert not wrong, "\n".join(wrong)
    failed = {keys[c.name]: c.expect for c in corpus if c.expect not in ("succeeded", "expired")}
    letters = [decode_dead_letter(m.value) for m in await read_topic(e, e.dlq_topic, len(failed))]
    dead = {d.job_id: d.error.code.value for d in letters}
    assert dead == failed, sorted(set(failed.items()) ^ set(dead.items()))
    big = next(d for d in letters if d.job_id == keys["wire-10mb-prompt"])
    assert big.payload_size is not None and big.payload_size > 10_000_000 >= len(big.payload)
    assert peak_rss_mib(w.pid) < MAX_RSS_MIB
    assert stop_worker(w) == 0


def _value(case: Case, key: str, e: Env) -> bytes:
    if case.msgpack is not None:
        return msgspec.msgpack.encode({"job_id": key, **case.msgpack})
    value = case.value.replace(b'"job_id": "x"', f'"job_id": "{key}"'.encode())
    return value.replace(b"{bucket}", e.bucket.encode()).replace(b"{dlq}", e.dlq_topic.encode())


def _headers(case: Case) -> list[tuple[str, bytes]]:
    return [("content-type", case.content_type)] if case.content_type else []
