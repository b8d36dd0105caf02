"""An event-driven consumer: jobs name a `result_topic`, the worker publishes each Result
there (msgpack, keyed by job id, at least once: de-duplicate by job id).

    python examples/result_consumer.py vlmq.results
"""

from __future__ import annotations

import asyncio
import os
import sys

from aiokafka import AIOKafkaConsumer

from vlmq.schemas.codec import content_type_of, decode_result_msg


async def consume(topic: str, group: str = "caption-indexer") -> None:
    bootstrap = os.environ.get("VLMQ_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    seen: set[str] = set()  # use a durable store in production
    try:
        async for msg in consumer:
            result = decode_result_msg(msg.value or b"", content_type_of(msg.headers))
            if result.job_id not in seen:
                seen.add(result.job_id)
                print(result.job_id, result.state.value, (result.text or "")[:80])
            await consumer.commit()
    finally:
        await consumer.stop()


if __name__ == "__main__":
    asyncio.run(consume(sys.argv[1] if len(sys.argv) > 1 else "vlmq.results"))
