"""A flood of small files that decode huge, through a real worker (tansu, redis-server,
moto_server): the worker's peak RSS stays within `max_decode_bytes` of where it started,
and every job ends, succeeded or with a typed failure; none is lost."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import boto3
from PIL import Image

from tests.helpers import Env, start_worker
from vlmq.producer import Client, caption
from vlmq.schemas import ErrorCode, JobState

MB = 1024 * 1024
BUDGET = 400 * MB  # one 64-megapixel grey PNG at a time (~370 MB each while decoded)
# Beyond the decodes: the resized images the render budget holds, the fetched files, and
# what the allocator keeps of freed memory.
SLACK = 200 * MB


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, "PNG")
    return buf.getvalue()


def _put(e: Env, name: str, body: bytes) -> str:
    boto3.client("s3", endpoint_url=e.s3).put_object(Bucket=e.bucket, Key=name, Body=body)
    return f"s3://{e.bucket}/{name}"


def _status(pid: int, field: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def _reset_peak(pid: int) -> None:
    """VmHWM from now on (Linux 4.0+): start-up's own peak must not hide the flood's."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


async def test_a_flood_of_huge_pixel_pngs_stays_within_the_decode_budget(e: Env) -> None:
    huge = _put(e, "huge.png", _png(8000, 8000))  # 64 MP in ~62 KB: the file
    assert len(_png(8000, 8000)) < 100_000
    bomb = _put(e, "bomb.png", _png(9000, 9000))  # over max_image_pixels: refused from its header
    corrupt = _put(e, "corrupt.png", _png(8000, 8000)[:5000])
    small = _put(e, "small.png", _png(640, 480))
    worker = start_worker(
        e,
        "w",
        image_workers=4,
        max_in_flight=32,
        max_decode_bytes=BUDGET,
        engine_args="step_ms=1,max_num_seqs=32",
    )
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        warm = caption(small, job_id=f"{e.tag}-warm")
        await client.submit(warm)
        assert (await client.wait(warm.job_id, timeout=120)).state is JobState.SUCCEEDED
        before = _status(worker.pid, "VmRSS")
        _reset_peak(worker.pid)
        uris = [huge] * 16 + [bomb] * 4 + [corrupt] * 4
        jobs = [caption(u, job_id=f"{e.tag}-{i}", batch_id=e.tag) for i, u in enumerate(uris)]
        assert (await client.submit_many(jobs)).sent == len(jobs)
        results = await client.wait_many([j.job_id for j in jobs], timeout=300)
        peak = _status(worker.pid, "VmHWM")
        counts = await client.batch(e.tag)
    ends = [(r.state, r.error.code if r.error else None) for r in results]
    assert ends == (
        [(JobState.SUCCEEDED, None)] * 16
        + [(JobState.FAILED, ErrorCode.IMAGE_TOO_LARGE)] * 4
        + [(JobState.FAILED, ErrorCode.IMAGE_CORRUPT)] * 4
    )
    assert (counts.total, counts.succeeded, counts.failed, counts.queued, counts.running) == (24, 16, 8, 0, 0)
    grew = peak - before
    print(f"worker RSS {before / MB:.0f} MB before the flood, peak {peak / MB:.0f} MB (+{grew / MB:.0f} MB)")
    assert grew < BUDGET + SLACK, f"peak RSS grew {grew / MB:.0f} MB > budget {BUDGET / MB:.0f} MB + slack"
