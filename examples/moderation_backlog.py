"""A moderation backlog: every image under a prefix gets exactly one label, then the
flagged ones are listed. Re-running resumes: nothing is sent twice.

    python examples/moderation_backlog.py s3://uploads/2026-11/ uploads-2026-11
"""

from __future__ import annotations

import asyncio
import os
import sys

import boto3

from vlmq.producer import Client
from vlmq.producer.bulk import BadLine, Preset, from_s3_prefix

LABELS = ["safe", "nudity", "violence", "hate_symbol", "self_harm"]


async def run(prefix: str, batch_id: str) -> None:
    s3 = boto3.client("s3", endpoint_url=os.environ.get("VLMQ_S3_ENDPOINT_URL"))
    items = from_s3_prefix(s3, prefix, batch_id, Preset(labels=LABELS))
    jobs = [j for j in items if not isinstance(j, BadLine)]
    async with Client() as client:
        report = await client.submit_many(jobs)
        print(f"{report.sent} sent, {report.skipped} already sent")
        await client.wait_many([j.job_id for j in jobs])
        flagged = [r async for r in client.iter_results(batch_id) if r.text and r.text != "safe"]
    for r in flagged:
        print(r.metadata.get("key"), r.text)


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], sys.argv[2]))
