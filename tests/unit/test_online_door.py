"""The online door's local answers: what a replica decides before asking Redis."""

from __future__ import annotations

import pytest

from vlmq.api.online import Failure, Online
from vlmq.api.records import Records
from vlmq.api.settings import ApiSettings
from vlmq.producer.client import Client

NOBODY = "redis://127.0.0.1:1/0"  # nothing listens: a Redis call would fail, not answer


def _online(max_queued: int = 256, max_waiting: int = 2048) -> Online:
    s = ApiSettings(redis_url=NOBODY, online_max_queued=max_queued, online_max_waiting=max_waiting)
    client = Client(settings=s)
    return Online(s, Records(client.redis, s.files_bucket), client)


def test_a_replica_whose_own_requests_fill_the_queue_answers_429_without_redis() -> None:
    online = _online(max_queued=2)
    online.enter()
    online.held.add("chat-a")
    online.enter()  # one slot held of two: there may be room
    online.held.add("chat-b")
    with pytest.raises(Failure) as full:
        online.enter()
    assert (full.value.status, full.value.code) == (429, "queue_full")
    assert full.value.headers == {"Retry-After": "1"}
    assert online.inside == 2  # the refused one took no place


def test_a_replica_at_its_own_bound_answers_replica_full() -> None:
    online = _online(max_waiting=1)
    online.enter()
    with pytest.raises(Failure) as full:
        online.enter()
    assert (full.value.status, full.value.code) == (429, "replica_full")
    online.leave()
    online.enter()
