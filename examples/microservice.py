"""A service that needs a caption now: submit one job, wait for it, use the answer.

eval "$(vlmq stack up)"; vlmq worker --engine fake &      # or a real engine
python examples/microservice.py s3://photos/cat.jpg
"""

from __future__ import annotations

import asyncio
import sys

from vlmq.producer import Client, JobFailed, Timeout, caption


async def describe(image_uri: str) -> str:
    async with Client() as client:  # VLMQ_KAFKA_BOOTSTRAP, VLMQ_REDIS_URL
        handle = await client.submit(caption(image_uri, "Write alt text for this image."))
        try:
            result = await client.wait(handle.job_id, timeout=120)
        except Timeout:
            return f"(still running: ask again later with `vlmq status {handle.job_id}`)"
        except JobFailed as exc:  # exc.result.error.code says why; .retryable if worth a retry
            return f"(failed: {exc.result.error.code.value if exc.result.error else 'unknown'})"
        return result.text or ""


if __name__ == "__main__":
    print(asyncio.run(describe(sys.argv[1])))
