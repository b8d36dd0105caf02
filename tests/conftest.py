"""Fixtures: the real local stack (tansu, redis-server, moto_server) for the whole session.

A real Kafka, Redis or S3 is used instead whenever VLMQ_KAFKA_BOOTSTRAP, VLMQ_REDIS_URL or
VLMQ_S3_ENDPOINT_URL is set. Every test uses its own topics, group, bucket and ids, so tests
do not depend on each other or on the order they run in.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import boto3
import pytest

from tests.helpers import Env, make_topics, stop_all
from vlmq.core.settings import Connection
from vlmq.core.topology import AnyRedis, connect_redis
from vlmq.deploy.stack import Stack

LOG_TAIL = 40


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    # The result cache is on by default, and the suite's images and prompts repeat across
    # tests that expect their jobs to run: workers here have it off unless a test (the
    # cache's own, tests/integration/test_cache.py) turns it on.
    os.environ.setdefault("VLMQ_CACHE", "false")
    st = Stack(tmp_path_factory.mktemp("stack"))
    env = st.up(
        kafka=os.environ.get("VLMQ_KAFKA_BOOTSTRAP"),
        redis_url=os.environ.get("VLMQ_TEST_REDIS_URL"),  # default: a private redis-server
        s3=os.environ.get("VLMQ_S3_ENDPOINT_URL"),
    )
    for k, v in env.items():
        if k.startswith("AWS_"):
            os.environ.setdefault(k, v)
    yield env
    st.down()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `topologies` run twice: on one Redis and on a Redis Cluster."""
    if metafunc.definition.get_closest_marker("topologies") and "topology" in metafunc.fixturenames:
        metafunc.parametrize("topology", ["single", "cluster"], indirect=True)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 3-master + 3-replica Redis Cluster (started once, when a test first asks)."""
    if url := os.environ.get("VLMQ_TEST_REDIS_CLUSTER_URL"):
        yield url
        return
    st = Stack(tmp_path_factory.mktemp("cluster"))
    st._up_redis_cluster([])
    yield st.services["redis"].url
    st.down()


@pytest.fixture
def topology(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The Redis topology of this test; clients made from the environment see it too."""
    kind: str = getattr(request, "param", "single")
    monkeypatch.setenv("VLMQ_REDIS_TOPOLOGY", kind)
    return kind


@pytest.fixture
def redis_url(stack: dict[str, str], topology: str, request: pytest.FixtureRequest) -> str:
    if topology == "cluster":
        return str(request.getfixturevalue("redis_cluster"))
    return stack["VLMQ_REDIS_URL"]


@pytest.fixture
def env(stack: dict[str, str], redis_url: str, topology: str, tmp_path: Path) -> Env:
    """Fresh names for one test: topics, group, bucket, batch."""
    tag = uuid.uuid4().hex[:10]
    e = Env(
        kafka=stack["VLMQ_KAFKA_BOOTSTRAP"],
        redis=redis_url,
        topology=topology,
        s3=stack["VLMQ_S3_ENDPOINT_URL"],
        jobs_topic=f"jobs-{tag}",
        dlq_topic=f"dlq-{tag}",
        results_topic=f"results-{tag}",
        group=f"g-{tag}",
        bucket=f"b-{tag}",
        tag=tag,
        tmp=tmp_path,
    )
    make_topics(e)
    boto3.client("s3", endpoint_url=e.s3).create_bucket(Bucket=e.bucket)
    return e


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that started processes shows the end of their logs (workers, vllm
    serve): CI prints only the failure report, and the cause is usually in there."""
    report = yield
    env = getattr(item, "funcargs", {}).get("env")
    if report.failed and isinstance(env, Env):
        for log in sorted(env.tmp.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
            report.sections.append((f"last {len(lines)} lines of {log.name}", "\n".join(lines)))
    return report


@pytest.fixture
def e(env: Env) -> Iterator[Env]:
    """`env`, and every worker process started on it killed afterwards, however the test ended."""
    yield env
    stop_all(env)


@pytest.fixture
async def redis(redis_url: str, topology: str) -> AsyncIterator[AnyRedis]:
    r = connect_redis(Connection.load({"redis_url": redis_url}))
    yield r
    await r.aclose()
