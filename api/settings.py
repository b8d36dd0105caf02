"""The API server's settings: the shared `Connection` plus the API's own knobs.

Defaults here, then `VLMQ_*` env vars, then flags (`ApiSettings.load`).
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from vlmq.core.settings import Connection

MB = 1024 * 1024


def _default_replica() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ApiSettings(Connection, kw_only=True):
    # -- the server
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    # This replica's name in batch leases and logs (default: host-pid).
    replica_id: str = msgspec.field(default_factory=_default_replica)
    # The bucket files are kept in (input, output and error files).
    files_bucket: str = "vlmq-files"
    # Create the bucket at start when it is missing (the local stack; off against AWS).
    create_bucket: bool = False
    # -- models
    # What a request's `model` may say, mapped to the model the workers serve:
    # `gpt-4o-mini=Qwen/Qwen2-VL-7B-Instruct,Qwen/Qwen2-VL-7B-Instruct`. A bare name is
    # itself; a name not here fails the batch at validation (`model_not_found`).
    models: list[str] = msgspec.field(default_factory=list)
    # -- request bodies
    # Bytes of any request body but a file upload (chat completions, batches, dashboard
    # forms): larger ones are answered 413 before they are read. Room for a 20 MB image
    # sent inline (data: URI, base64) with its prompt.
    max_request_bytes: Annotated[int, Meta(ge=1024)] = 32 * MB
    # -- files (OpenAI's limits; an upload's body may be this plus its multipart framing)
    max_file_bytes: Annotated[int, Meta(ge=1)] = 200 * MB
    max_file_lines: Annotated[int, Meta(ge=1)] = 50_000
    # Seconds an uploaded batch file lives when the upload names no expiry (OpenAI: 30 days).
    file_ttl_s: Annotated[int, Meta(ge=60)] = 30 * 24 * 3600
    # -- batches
    # Seconds `completion_window: "24h"` means (a test or a demo sets a short one).
    completion_window_s: Annotated[float, Meta(gt=0)] = 24 * 3600
    # Requests of one batch in the queue or running at once: the next ones are submitted as
    # these finish, so batches share the workers fairly and online jobs wait behind at most
    # this many per batch (not behind a 50,000-line backlog).
    batch_window: Annotated[int, Meta(ge=1)] = 1024
    # The engine priority of batch requests (lower runs earlier; online requests are 0).
    batch_priority: Annotated[int, Meta(ge=1, le=1_000_000)] = 10
    # Validation errors recorded per batch (every line is checked; the first this many are kept).
    max_batch_errors: Annotated[int, Meta(ge=1)] = 1000
    # Seconds a cancelled batch waits for its running requests before it finalizes anyway.
    cancel_grace_s: Annotated[float, Meta(ge=0)] = 60.0
    # Seconds a replica holds a batch's lease; another replica takes the batch over after
    # this when the holder died.
    lease_s: Annotated[float, Meta(gt=0)] = 15.0
    # Seconds between passes over the active batches.
    tick_s: Annotated[float, Meta(gt=0)] = 0.5
    # -- tenants (per tenant; 0: no limit)
    tenant_max_queued: Annotated[int, Meta(ge=0)] = 1_000_000
    tenant_max_file_bytes: Annotated[int, Meta(ge=0)] = 100 * 1024 * MB
    # -- online: POST /v1/chat/completions
    # Online requests waiting or running at once (all replicas); more get 429 + Retry-After.
    online_max_queued: Annotated[int, Meta(ge=1)] = 256
    # Online requests one replica holds at once (waiting for a slot, for Redis or for the
    # answer); more are answered 429 before their body is read or Redis is asked. A waiting
    # request costs a future and its body, not a connection (api/waiters.py).
    online_max_waiting: Annotated[int, Meta(ge=1)] = 2048
    # Seconds an online request's admission slot lasts unless its replica renews it (every
    # third of it): a replica that dies (kill -9) gives its slots back after this.
    online_lease_s: Annotated[float, Meta(gt=0)] = 5.0
    # Milliseconds this process's Kafka producer holds a message to batch it with others
    # (aiokafka's linger_ms). 0: an online request's produce leaves at once (5 ms less
    # latency); the batch driver's chunks still go out in batches, since messages queue
    # up behind the one in flight (docs/performance.md).
    kafka_linger_ms: Annotated[int, Meta(ge=0, le=1000)] = 0
    # Seconds an online request waits for its answer before it fails with 504.
    online_timeout_s: Annotated[float, Meta(gt=0)] = 600.0
    # Connections in this process's Redis pool (per node on a cluster). Online requests
    # use at most half of them at once (short commands only), so /healthz, the batch
    # driver and the dashboard always find one.
    redis_max_connections: Annotated[int, Meta(ge=4)] = 100
    # Accept https:// image URLs in requests (workers check each one: worker/web.py).
    allow_https: bool = True
    # -- the dashboard (/dashboard)
    # Serve the dashboard's pages (`vlmq dashboard` serves only them).
    dashboard: bool = True
    # Serve the OpenAI routes (/v1); off for `vlmq dashboard`.
    openai_routes: bool = True
    # Seconds between points of each running batch's series (its rate, ETA and chart).
    sample_s: Annotated[float, Meta(gt=0, le=3600)] = 5.0
    # The workers' consumer group (the workers page's partitions and lag).
    worker_group: str = "vlmq-workers"
    # Seconds a dashboard login lasts (the cookie that holds the key).
    session_s: Annotated[int, Meta(ge=60)] = 8 * 3600
    # The worker's fetch rules for thumbnails of input images (those of `vlmq worker`).
    thumb_max_bytes: Annotated[int, Meta(ge=1)] = 20 * MB
    # A job page links its trace here when the worker traced it: `{trace_id}` is replaced
    # (e.g. http://jaeger:16686/trace/{trace_id}, or Grafana Tempo's explore URL).
    trace_url: str | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"

    def online_redis_share(self) -> int:
        """Pool connections online requests may use at once."""
        return self.redis_max_connections // 2

    def aliases(self) -> dict[str, str]:
        """`models` as a table: every name a request may give -> the served model."""
        out: dict[str, str] = {}
        for item in self.models:
            alias, _, served = item.partition("=")
            out[alias.strip()] = (served or alias).strip()
        return out

    def served(self, model: str | None) -> str | None:
        """The served model a request's `model` maps to; None when it maps to none."""
        return self.aliases().get(model) if model else None
