"""The Redis key layout (schemas/keys.py) and the topology setting (core/topology.py),
without a server: slots, collisions, the producer's ACL pattern, URL parsing."""

from __future__ import annotations

import fnmatch
import string
import zlib

import pytest
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, RedisClusterException, ResponseError

from vlmq.core.settings import Connection
from vlmq.core.state import StateStore
from vlmq.core.topology import TopologyError, _hosts, connect_redis, wrong_topology
from vlmq.schemas import keys

# Ids as the wire allows them (JOB_ID_PATTERN) and as a hostile non-SDK client might send
# them to the scripts directly: every reserved character of keys, globs and hash tags.
NASTY = ["a", "a:b", "a:done", "x}:job:y", "{tag}", "*", "?", "[ab]", "\\", "sub:job:z", "j" * 160]


def test_one_batch_of_a_million_jobs_spreads_over_every_shard_and_256_slots() -> None:
    shards = {keys.shard(f"job-{i}") for i in range(1_000_000)}
    assert shards == set(range(keys.SHARDS))
    slots = {key_slot(keys.batch_key(s, "b").encode()) for s in shards}
    assert len(slots) == keys.SHARDS


@pytest.mark.parametrize("job_id", NASTY)
def test_all_keys_of_a_job_share_one_slot(job_id: str) -> None:
    s = keys.shard(job_id)
    names = [*StateStore._job_keys(job_id, "batch:x}"), keys.cancel_key(job_id), keys.submitted_key(job_id)]
    names += [keys.batch_submitted_key(s, "b"), keys.batch_key(s, "")]
    assert len({key_slot(k.encode()) for k in names}) == 1
    assert keys.shard(job_id) == zlib.crc32(job_id.encode()) % 256  # what wire.md tells other clients


def test_no_two_ids_or_kinds_name_the_same_key() -> None:
    names = [f(j) for j in NASTY for f in (keys.job_key, keys.submitted_key, keys.cancel_key)]
    names += [
        f(keys.shard(b), b)
        for b in NASTY
        for f in (keys.batch_key, keys.batch_done_key, keys.batch_submitted_key)
    ]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("job_id", [*NASTY, *string.punctuation])
def test_the_producer_acl_pattern_matches_its_own_keys_and_no_worker_key(job_id: str) -> None:
    s = keys.shard(job_id)
    mine = [keys.submitted_key(job_id), keys.cancel_key(job_id), keys.batch_submitted_key(s, job_id)]
    theirs = [keys.job_key(job_id), keys.batch_key(s, job_id), keys.batch_done_key(s, job_id)]
    # Redis globs and fnmatch agree here: `?` is one character, braces are literal.
    assert all(fnmatch.fnmatchcase(k, keys.PRODUCER_KEYS) for k in mine)
    assert not any(fnmatch.fnmatchcase(k, keys.PRODUCER_KEYS) for k in theirs)


def test_several_hosts_in_one_url() -> None:
    first, hosts = _hosts("redis://u:p%40ss@h1:7000,h2,h3:7002/0")
    assert first == "redis://u:p%40ss@h1:7000/0"
    assert hosts == [("h1", 7000), ("h2", 6379), ("h3", 7002)]
    assert _hosts("redis://s1,s2:26380/0", default_port=26379)[1] == [("s1", 26379), ("s2", 26380)]


def test_a_wrong_topology_is_one_line_that_names_the_setting() -> None:
    conn = Connection(redis_url="redis://vlmq:secret@h:7000/0")
    moved = wrong_topology(MovedError("3999 127.0.0.1:7001"), conn)
    assert moved is not None and "VLMQ_REDIS_TOPOLOGY=cluster" in str(moved) and "secret" not in str(moved)
    assert wrong_topology(AskError("1 h:1"), conn) is not None
    assert wrong_topology(ResponseError("CROSSSLOT Keys in request don't hash to the same slot"), conn)
    single = wrong_topology(RedisClusterException("... Cluster mode is not enabled on this node"), conn)
    assert single is not None and "VLMQ_REDIS_TOPOLOGY=single" in str(single)
    assert wrong_topology(ResponseError("WRONGTYPE"), conn) is None
    with pytest.raises(TopologyError, match="several hosts"):
        connect_redis(Connection(redis_url="redis://h1:1,h2:2/0"))
