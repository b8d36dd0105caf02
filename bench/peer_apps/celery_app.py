"""Celery with Redis as broker and result backend, the production settings for at-least-once:
acks_late, reject_on_worker_lost, prefetch 1; prefork with one process per core.
`celery -A bench.peer_apps.celery_app worker -c 2`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import time

from celery import Celery

from bench.peer_apps.common import URL, body, main

app = Celery("peers", broker=URL, backend=URL)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={"visibility_timeout": 10},  # a killed worker's tasks come back after 10 s
    result_expires=3600,
)


@app.task(name="noop")
def noop(i: int, submitted: float) -> list[float]:
    return body(i, submitted)


def submit(ids: list[str]) -> None:
    for i, j in enumerate(ids):
        noop.apply_async((i, time.time()), task_id=j)


def collect(ids: list[str]) -> list[Any]:
    out: list[Any] = []
    for j in ids:
        r = app.AsyncResult(j)
        out.append(r.result if r.state == "SUCCESS" else None)
    return out


if __name__ == "__main__":
    main(submit, collect)
