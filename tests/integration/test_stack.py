"""Smoke test of the local stack over real sockets: Kafka group + commit, Redis, S3."""

from __future__ import annotations

from pathlib import Path

import boto3
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.asyncio import Redis

from tests.helpers import Env
from vlmq.deploy.stack import Stack


async def test_kafka_produce_consume_in_a_group_and_commit(env: Env) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=env.kafka, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        for i in range(20):
            await producer.send(env.jobs_topic, f"m{i}".encode(), key=str(i).encode())
        await producer.flush()
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        env.jobs_topic,
        bootstrap_servers=env.kafka,
        group_id=env.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        got: list[bytes] = []
        while len(got) < 20:
            batch = await consumer.getmany(timeout_ms=2000)
            got += [m.value for ms in batch.values() for m in ms if m.value]
        assert sorted(got) == sorted(f"m{i}".encode() for i in range(20))
        tp = TopicPartition(env.jobs_topic, 0)
        await consumer.commit({tp: 1})
        assert await consumer.committed(tp) == 1
    finally:
        await consumer.stop()


async def test_redis_round_trip(redis: Redis, env: Env) -> None:
    await redis.set(f"smoke:{env.tag}", b"v", ex=10)
    assert await redis.get(f"smoke:{env.tag}") == b"v"


def test_s3_put_get_over_http(env: Env) -> None:
    s3 = boto3.client("s3", endpoint_url=env.s3)
    s3.put_object(Bucket=env.bucket, Key="a/b.bin", Body=b"\x00\x01")
    assert s3.get_object(Bucket=env.bucket, Key="a/b.bin")["Body"].read() == b"\x00\x01"
    assert env.s3.startswith("http://")


def test_a_local_redis_cluster_with_replicas_and_back_to_one_redis(tmp_path: Path) -> None:
    """`vlmq stack up --redis-cluster`: three masters with a replica each, and the settings
    that point every client at it; a later `stack up` without it is one Redis again."""
    st = Stack(tmp_path)
    try:
        env = st.up(redis_cluster=True)
        assert env["VLMQ_REDIS_TOPOLOGY"] == "cluster"
        nodes = [redis.Redis.from_url(s.url) for s in st.redis_nodes()]
        roles = [n.info("replication")["role"] for n in nodes]
        assert sorted(roles) == ["master"] * 3 + ["slave"] * 3
        cluster = redis.RedisCluster.from_url(env["VLMQ_REDIS_URL"].split(",", 1)[0] + "/0")
        assert cluster.set("k", "v") and cluster.get("k") == b"v"
        cluster.close()
        env = st.up()
        assert "VLMQ_REDIS_TOPOLOGY" not in env and "," not in env["VLMQ_REDIS_URL"]
        assert not st.redis_nodes()
    finally:
        st.down()
