"""No producer touches another's work (docs/security.md), tried as an attacker would: with
a Kafka credential (messages straight to the jobs topic, no submit record of their own),
with an API key of another tenant, and through a browser's cookie. Real worker and API
processes, tansu, redis-server, moto_server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import boto3
import httpx2 as httpx
import msgspec

from tests.helpers import Env, log_text, produce, put_images, read_topic, start_worker, stop_worker
from tests.integration.test_api import Api, line, start_batch, wait_status
from vlmq.producer import Client
from vlmq.schemas import ErrorCode, ImageRef, Job, JobState, Message, TextPart
from vlmq.schemas.codec import decode_dead_letter, encode_job
from vlmq.worker.samples import photo


def _job(job_id: str, prompt: str, **kw: Any) -> Job:
    return Job(job_id=job_id, messages=[Message("user", prompt)], **kw)


async def test_a_job_runs_only_as_submitted(e: Env) -> None:
    t, batch = e.tag, f"{e.tag}-victim"
    victim, victim2 = (
        _job(f"{t}-v1", "the victim's prompt", batch_id=batch),
        _job(f"{t}-v2", "hi", batch_id=batch),
    )
    control = _job(f"{t}-control", "the victim's prompt")  # same prompt: the same answer
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit_many([victim, victim2, control])  # queued: no worker yet
        invalid = {"job_id": victim2.job_id, "messages": [{"role": "user", "content": "x"}], "v": 99}
        await produce(
            e,
            [  # what anyone with a Kafka credential can send
                (victim.job_id, encode_job(_job(victim.job_id, "attacker's prompt", batch_id=batch))[0]),
                (victim2.job_id, json.dumps(invalid).encode()),
                *[
                    (f"{t}-x{i}", encode_job(_job(f"{t}-x{i}", "x", batch_id=batch, model="nope"))[0])
                    for i in range(4)
                ],
                (f"{t}-fresh", encode_job(_job(f"{t}-fresh", "mine"))[0]),
            ],
            submitted=False,
        )
        w = start_worker(e)
        got = {
            r.job_id: r for r in await client.wait_many([victim.job_id, victim2.job_id, control.job_id], 60)
        }
        assert all(r.state is JobState.SUCCEEDED for r in got.values()), got
        assert got[victim.job_id].text == got[control.job_id].text  # the victim's prompt ran
        dead = [decode_dead_letter(m.value) for m in await read_topic(e, e.dlq_topic, 7)]
        codes = sorted(d.error.code.value for d in dead)
        assert codes == ["forged"] * 2 + ["not_submitted"] * 5, codes
        assert all(d.job_id is None for d in dead)  # nothing is noted on the named job's record
        counts = await client.batch(batch)
        assert (counts.total, counts.succeeded, counts.failed) == (2, 2, 0)
        assert await client.store.get_many([f"{t}-x0", f"{t}-fresh"]) == [None, None]
        assert sorted([r.job_id async for r in client.store.iter_batch(batch)]) == sorted(
            [victim.job_id, victim2.job_id]
        )

        # An ended job's id, reused: a dead letter, and its record stays as it was.
        before = await client.store.get(victim.job_id)
        await produce(
            e, [(victim.job_id, encode_job(_job(victim.job_id, "again", batch_id=batch))[0])], submitted=False
        )
        (again,) = [decode_dead_letter(m.value) for m in (await read_topic(e, e.dlq_topic, 8))[7:]]
        assert again.error.code is ErrorCode.FORGED
        assert await client.store.get(victim.job_id) == before
        assert await client.store.terminal_writes(victim.job_id) == 1
    assert w.poll() is None and stop_worker(w) == 0


def test_a_forged_batch_id_cannot_end_a_running_openai_batch(e: Env, tmp_path: Path) -> None:
    api = Api(e)
    base = api.start()
    start_worker(e, "w", engine_args="step_ms=150")
    acme = api.client(base, "acme")
    uris = put_images(e, 6, w=64, h=48)
    b = start_batch(acme, tmp_path, [line(f"req-{i}", uris[i]) for i in range(6)])
    wait_status(acme, b.id, {"in_progress"})
    bad = [_job(f"{e.tag}-f{i}", "x", batch_id=b.id, model="nope") for i in range(8)]  # > its lines

    async def forge() -> None:  # instantly failing jobs "of" the victim's batch, through Kafka
        await produce(e, [(j.job_id, encode_job(j)[0]) for j in bad], submitted=False)

    asyncio.run(forge())
    done = wait_status(acme, b.id, {"completed", "failed", "cancelled", "expired"})
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (6, 6, 0)
    assert done.output_file_id is not None
    out = [json.loads(x) for x in acme.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in out) == [f"req-{i}" for i in range(6)]
    assert all(r["response"]["status_code"] == 200 for r in out)


def test_thumbnails_obey_the_fetch_policy_and_the_viewers_tenant(e: Env, tmp_path: Path) -> None:
    secret = f"secret-{e.tag}"
    s3 = boto3.client("s3", endpoint_url=e.s3)
    s3.create_bucket(Bucket=secret)
    s3.put_object(Bucket=secret, Key="payroll.jpg", Body=photo(64, 48, seed=3))
    api = Api(e, allowed_buckets=e.bucket)  # the API runs under the workers' fetch policy
    base = api.start()
    start_worker(e, "w", allowed_buckets=e.bucket)
    acme = api.client(base, "acme")
    b = start_batch(acme, tmp_path, [line("peek", f"s3://{secret}/payroll.jpg")])
    done = wait_status(acme, b.id, {"completed"})
    assert done.request_counts is not None and done.request_counts.failed == 1

    async def failed_job() -> str:
        async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
            (r,) = [r async for r in client.store.iter_batch(b.id)]
            assert r.error is not None and r.error.code is ErrorCode.URI_NOT_ALLOWED
            return r.job_id

    job_id = asyncio.run(failed_job())
    url = base.removesuffix("/v1") + f"/dashboard/jobs/{job_id}/images/0"
    own = httpx.get(url, headers={"authorization": f"Bearer {acme.api_key}"})
    assert own.status_code == 200 and own.headers["content-type"].startswith("image/svg+xml")  # refused
    other = httpx.get(url, headers={"authorization": f"Bearer {api.key('globex')}"})
    assert other.status_code == 404


def test_sessions_and_cross_origin_posts(e: Env, tmp_path: Path) -> None:
    api = Api(e)
    base = api.start().removesuffix("/v1")
    start_worker(e, "w", engine_args="step_ms=400")
    acme = api.client(base + "/v1", "acme")
    b = start_batch(acme, tmp_path, [line(f"r{i}", None) for i in range(40)])
    wait_status(acme, b.id, {"in_progress"})
    own = {"origin": base}
    form = {"key": acme.api_key, "next": "/dashboard/batches"}
    login = httpx.post(f"{base}/dashboard/login", data=form, headers=own, follow_redirects=False)
    cookie = login.headers["set-cookie"]
    session = login.cookies["vlmq_session"]
    assert acme.api_key not in cookie and session and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Secure" not in cookie  # plain http here; behind a TLS proxy it is set:
    proxied = httpx.post(
        f"{base}/dashboard/login",
        data=form,
        headers={**own, "x-forwarded-proto": "https"},
        follow_redirects=False,
    )
    assert "Secure" in proxied.headers["set-cookie"]
    forged_login = httpx.post(
        f"{base}/dashboard/login",
        data=form,
        headers={"origin": "https://evil.example"},
        follow_redirects=False,
    )
    assert forged_login.status_code == 403

    jar = {"vlmq_session": session}
    cancel = f"{base}/dashboard/batches/{b.id}/cancel"
    for hostile in ({"origin": "https://evil.example"}, {"sec-fetch-site": "cross-site"}, {"origin": "null"}):
        got = httpx.post(cancel, cookies=jar, headers=hostile, follow_redirects=False)
        assert got.status_code == 403, hostile
    assert acme.batches.retrieve(b.id).status == "in_progress"  # nothing was done
    same = {**own, "sec-fetch-site": "same-origin"}
    asked = httpx.post(cancel, cookies=jar, headers=same, follow_redirects=False)
    assert asked.status_code == 303 and asked.headers["location"].startswith("/dashboard/confirm?")
    assert acme.batches.retrieve(b.id).status == "in_progress"  # not confirmed: nothing was done
    ok = httpx.post(cancel, cookies=jar, headers=same, data={"confirm": "yes"}, follow_redirects=False)
    assert ok.status_code == 303
    assert acme.batches.retrieve(b.id).status in ("cancelling", "cancelled")

    page = f"{base}/dashboard/batches"
    assert httpx.get(page, cookies=jar, follow_redirects=False).status_code == 200
    httpx.post(f"{base}/dashboard/logout", cookies=jar, headers=own, follow_redirects=False)
    assert httpx.get(page, cookies=jar, follow_redirects=False).status_code == 303  # ended server-side


async def test_a_url_password_is_never_echoed(e: Env) -> None:
    w = start_worker(e)
    uri = "https://alice:hunter2@127.0.0.1:9/x.png?X-Amz-Signature=deadbeef"
    job = Job(job_id=f"{e.tag}-pw", messages=[Message("user", [ImageRef(uri), TextPart("hi")])])
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit(job)
        r = await client.wait_many([job.job_id], timeout=30)
    assert r[0].state is JobState.FAILED and r[0].error is not None
    assert r[0].error.code is ErrorCode.URI_NOT_ALLOWED
    (dead,) = [decode_dead_letter(m.value) for m in await read_topic(e, e.dlq_topic, 1)]
    for text in (r[0].error.message, dead.error.message, msgspec.json.encode(r[0]).decode()):
        assert "hunter2" not in text and "deadbeef" not in text, text
    assert stop_worker(w) == 0
    assert "hunter2" not in log_text(e, "w")
