"""The worker end to end on real tansu + redis-server + moto_server, as a real process."""

from __future__ import annotations

import pytest

from tests.expect import expected_text
from tests.helpers import Env, put_images, start_worker, stop_worker
from vlmq.producer import Client, caption
from vlmq.worker.samples import photo


@pytest.mark.topologies
async def test_jobs_with_s3_images_all_succeed_with_the_engines_answer(e: Env) -> None:
    n = 200
    uris = put_images(e, n, w=320, h=240)
    jobs = [caption(u, job_id=f"{e.tag}-{i}", batch_id=e.tag) for i, u in enumerate(uris)]
    start_worker(e, "w1", engine_args="step_ms=2,max_num_seqs=32", max_in_flight=64)
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        report = await client.submit_many(jobs)
        assert report.sent == n
        results = await client.wait_many([j.job_id for j in jobs], timeout=120)
        counts = await client.batch(e.tag)
    assert [r.state.value for r in results] == ["succeeded"] * n
    for i, (job, r) in enumerate(zip(jobs, results, strict=True)):
        assert r.text == expected_text(job, [photo(320, 240, seed=i)])
        assert r.usage and r.usage.completion_tokens == 16
        assert r.timings and r.timings.engine_s is not None
    assert (counts.total, counts.succeeded, counts.queued, counts.running) == (n, n, 0, 0)
    assert stop_worker(e.procs[0]) == 0
