"""Smoke test of the local stack over real sockets: Kafka group + commit, Redis, S3."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
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


ROOT = Path(__file__).resolve().parents[2]


def stack_cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vlmq.cli", "stack", *args],
        cwd=cwd,
        # this checkout's vlmq whatever the folder (not an install of another one)
        env={k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")} | {"PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_stack_ups_at_once_share_one_stack_and_down_stops_it_all(tmp_path: Path) -> None:
    """Issue 40: both used to exit 0 with their own Redis and S3, one set orphaned."""
    ups = [stack_cli("up", cwd=tmp_path) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=180) for p in ups]
        assert [p.returncode for p in ups] == [0, 0], outs
        assert outs[0][0] == outs[1][0]  # the same settings: the second one used the first's stack
        pids = {int(pid) for _, err in outs for pid in re.findall(r"pid (\d+)", err)}
        assert len(pids) == 3, outs  # kafka, redis, s3: started once
        down = stack_cli("down", cwd=tmp_path)
        down.communicate(timeout=60)
        assert down.returncode == 0
        assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    finally:
        Stack(tmp_path / ".vlmq/stack").down()


def test_a_server_that_stopped_answering_is_replaced_not_orphaned(tmp_path: Path) -> None:
    st = Stack(tmp_path)
    try:
        st.up()
        old = st.services["redis"].pid
        assert old is not None
        st.signal("redis", signal.SIGSTOP)  # alive, but answers nothing
        st.up()
        assert st.services["redis"].pid != old
        assert not Path(f"/proc/{old}").exists()
    finally:
        st.down()


def test_status_of_a_stack_whose_servers_are_gone_says_so_and_cleans_up(tmp_path: Path) -> None:
    st = Stack(tmp_path / ".vlmq/stack")
    st.up()
    for svc in list(st.services.values()):  # what a reboot leaves: the file only
        assert svc.pid is not None
        os.killpg(svc.pid, signal.SIGKILL)
        os.waitpid(svc.pid, 0)
    status = stack_cli("status", cwd=tmp_path)
    _, err = status.communicate(timeout=60)
    assert status.returncode == 1
    assert "had stopped" in err and "vlmq stack up" in err, err
    assert not (tmp_path / ".vlmq/stack/stack.json").exists()
