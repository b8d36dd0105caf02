"""One setting picks the Redis topology: a wrong one is one line naming the setting (never a
cross-slot traceback), and Sentinel finds the master again after a failover. (The state,
SDK, bulk, worker and chaos tests marked `topologies` run on one Redis and on a cluster.)"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest
import redis

from tests.helpers import Env, start_worker, stop_worker
from tests.integration.test_cli_errors import run
from vlmq.core.settings import Connection
from vlmq.core.topology import TopologyError, connect_redis, wait_replicas
from vlmq.deploy.stack import free_port, redis_bin, redis_ok, wait_until
from vlmq.producer import Client
from vlmq.schemas import Job, JobState, Message, keys


def _elsewhere(node: str) -> str:
    """A job id whose keys live on another master than `node`."""
    cluster = redis.RedisCluster.from_url(node)
    port = urlsplit(node).port
    try:
        for i in range(1000):
            owner = cluster.get_node_from_key(keys.job_key(f"j{i}"))  # type: ignore[no-untyped-call]
            if owner.port != port:
                return f"j{i}"
        raise AssertionError("every slot on one node?")
    finally:
        cluster.close()


def test_a_cluster_spoken_to_as_one_redis_is_one_line(redis_cluster: str, e: Env) -> None:
    node = redis_cluster.split(",", 1)[0] + "/0"
    env = {"VLMQ_REDIS_URL": node, "VLMQ_REDIS_TOPOLOGY": "single"}
    proc = run("status", _elsewhere(node), env=env)
    assert proc.returncode == 2, proc.stderr
    assert "is a Redis Cluster" in proc.stderr and "VLMQ_REDIS_TOPOLOGY=cluster" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    w = start_worker(e, "w", redis_url=node, redis_topology="single")
    assert w.wait(30) == 3  # refused at start, before any job
    assert "VLMQ_REDIS_TOPOLOGY=cluster" in (e.tmp / "w.log").read_text()


async def test_terminal_writes_wait_for_the_replicas_there_are(e: Env, redis_cluster: str) -> None:
    one = Connection(redis_url=e.redis)
    cluster = Connection(redis_url=redis_cluster, redis_topology="cluster")
    for conn, auto in ((one, 0), (cluster, 1)):  # no replica; one per master
        client = connect_redis(conn)
        try:
            assert await wait_replicas(client, conn) == auto
            strict = msgspec.structs.replace(conn, redis_wait_replicas=2)
            with pytest.raises(TopologyError, match="VLMQ_REDIS_WAIT_REPLICAS"):
                await wait_replicas(client, strict)  # refused at start, not NotDurable forever
        finally:
            await client.aclose()


def test_one_redis_spoken_to_as_a_cluster_is_one_line(e: Env) -> None:
    proc = run("status", "x", env={"VLMQ_REDIS_URL": e.redis, "VLMQ_REDIS_TOPOLOGY": "cluster"})
    assert proc.returncode == 2, proc.stderr
    assert "not a cluster" in proc.stderr and "VLMQ_REDIS_TOPOLOGY=single" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _server(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([redis_bin(), *args], stdout=log.open("ab"), stderr=subprocess.STDOUT)


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[tuple[str, list[int]]]:
    """A master, its replica and one sentinel watching them (quorum 1, down after 1 s)."""
    ports = [free_port(), free_port()]
    procs = []
    for i, port in enumerate(ports):
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)]
        args += ["--dbfilename", f"dump{i}.rdb"] + (["--replicaof", "127.0.0.1", str(ports[0])] if i else [])
        procs.append(_server(args, tmp_path / f"redis{i}.log"))
        url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: redis_ok(url), "redis-server")  # noqa: B023 - called at once
    s_port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {s_port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {ports[0]} 1\n"
        "sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n"
    )
    procs.append(_server([str(conf), "--sentinel"], tmp_path / "sentinel.log"))
    wait_until(lambda: redis_ok(f"redis://127.0.0.1:{s_port}/0"), "redis sentinel")
    try:
        yield f"redis://127.0.0.1:{free_port()},127.0.0.1:{s_port}/0", ports  # a dead one, then the live one
    finally:
        for p in procs:
            p.kill()
            p.wait()


async def test_sentinel_finds_the_master_and_follows_a_failover(
    e: Env, sentinel: tuple[str, list[int]]
) -> None:
    url, ports = sentinel
    w = start_worker(e, "w", redis_url=url, redis_topology="sentinel")  # WAIT 1: the replica
    conn = Connection.load({"kafka_bootstrap": e.kafka, "redis_url": url, "redis_topology": "sentinel"})
    async with Client(topic=e.jobs_topic, settings=conn) as client:
        await client.submit(Job(job_id=f"{e.tag}-1", messages=[Message("user", "before")]))
        assert (await client.wait(f"{e.tag}-1", timeout=30)).state is JobState.SUCCEEDED
        sentinel_port = int(url.rsplit(":", 1)[1].split("/")[0])
        redis.Redis(port=sentinel_port).execute_command("SENTINEL", "FAILOVER", "mymaster")  # type: ignore[no-untyped-call]
        new_master = redis.Redis(port=ports[1])
        wait_until(lambda: new_master.info("replication")["role"] == "master", "the failover", 30)
        await client.submit(Job(job_id=f"{e.tag}-2", messages=[Message("user", "after")]))
        assert (await client.wait(f"{e.tag}-2", timeout=60)).state is JobState.SUCCEEDED
        assert (await client.status(f"{e.tag}-1")).state is JobState.SUCCEEDED  # it was replicated
    assert stop_worker(w) == 0
