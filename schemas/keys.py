"""Names of topics and Redis keys. One place, so every client agrees (docs/wire.md).

Every key is `vlmq:{<shard>}:<kind>:<id>`:
- `{<shard>}` is a Redis Cluster hash tag: two hex digits of crc32(job_id), so all keys of
  one job (and its batch's partial counters for that shard) live in one slot, and one
  batch spreads over 256 slots. A single Redis ignores the tag.
- the id comes last, after a fixed `<kind>`, so no id (`:` included) can name another key.
- `sub:` keys are the producer's (what was submitted, a cancel request); every other key
  is the worker's (state, results, counters). A Redis ACL can then give producers write
  access to `vlmq:{??}:sub:*` only: they cannot forge a terminal state or a result.
"""

from __future__ import annotations

import zlib

JOBS_TOPIC = "vlmq.jobs"
DLQ_TOPIC = "vlmq.jobs.dlq"
RESULTS_TOPIC = "vlmq.results"

PREFIX = "vlmq"
SHARDS = 256  # slots one batch spreads over; the tag is this many values wide
CANCEL_CHANNEL = f"{PREFIX}:cancel"  # pub/sub: payload is a job_id (a cancel request)
PRODUCER_KEYS = f"{PREFIX}:{{??}}:sub:*"  # ACL pattern of what a producer may write


BATCHES_KEY = f"{PREFIX}:{{ix}}:sub:batches"  # zset: batch_id -> first submit (the dashboard's index)


WORKERS_KEY = f"{PREFIX}:{{workers}}:seen"  # zset: worker_id -> its last heartbeat


def worker_key(worker_id: str) -> str:
    """A worker's last heartbeat (core/workers.py), expiring after three missed beats."""
    return f"{PREFIX}:{{workers}}:beat:{worker_id}"


WORKER_CONTROL_CHANNEL = f"{PREFIX}:workers:control"  # pub/sub: a worker id, whose command changed


def worker_control_key(worker_id: str) -> str:
    """An operator's command to a worker: `pause` (take no new messages) or `drain`
    (finish in-flight jobs and stop); absent: run (core/workers.py)."""
    return f"{PREFIX}:{{workers}}:control:{worker_id}"


def batch_cancel_message(batch_id: str) -> str:
    """What goes on CANCEL_CHANNEL to cancel a whole batch: a space, which no job id has."""
    return f"batch {batch_id}"


def shard(job_id: str) -> int:
    return zlib.crc32(job_id.encode()) % SHARDS


def tag(shard_: int) -> str:
    """The hash tag of a shard, `{0a}`: fixed width, so ACL patterns can match it."""
    return f"{PREFIX}:{{{shard_:02x}}}"


def job_key(job_id: str) -> str:
    """Worker's hash: state (running or terminal), record (the Result as JSON), attempt,
    worker, lease_until, batch_id, terminal_writes. Absent while the job is queued."""
    return f"{tag(shard(job_id))}:job:{job_id}"


def submitted_key(job_id: str) -> str:
    """Producer's hash, written at submit: batch_id, submitted_at, sent (Kafka acked it)."""
    return f"{tag(shard(job_id))}:sub:job:{job_id}"


def cancel_key(job_id: str) -> str:
    """Producer's cancel request; a worker turns it into the `cancelled` state."""
    return f"{tag(shard(job_id))}:sub:cancel:{job_id}"


def done_channel(job_id: str) -> str:
    """Pub/sub channel that gets the terminal state the moment a job ends."""
    return f"{PREFIX}:done:{job_id}"


def batch_submitted_key(shard_: int, batch_id: str) -> str:
    """Producer's hash per shard: `total` jobs submitted into the batch in this shard."""
    return f"{tag(shard_)}:sub:batch:{batch_id}"


def batch_key(shard_: int, batch_id: str) -> str:
    """Worker's hash per shard: `unrecorded` (jobs a worker saw without a submit record),
    `left` (jobs no longer queued), `running`, and one counter per terminal state."""
    return f"{tag(shard_)}:batch:{batch_id}"


def batch_done_key(shard_: int, batch_id: str) -> str:
    """Worker's list per shard: the batch's job ids in the order they ended, once each."""
    return f"{tag(shard_)}:done:{batch_id}"


def index_group(batch_id: str | None, tenant: str | None) -> str:
    """The job list a job belongs to (the console's): its batch's, else its tenant's
    online requests (jobs outside any batch). The prefix keeps the two apart."""
    return f"b:{batch_id}" if batch_id else f"o:{tenant or ''}"


INDEX_BUCKETS = ("all", "open", "succeeded", "failed", "cancelled", "expired")


def index_key(shard_: int, group: str, bucket: str) -> str:
    """A zset per shard of a job list's ids by submit time: `all`, `open` (queued or
    running), one per terminal state, and `e.<code>` (failed with that error code).
    Written by enqueue.lua, finish.lua and a retried claim (claim.lua builds the same
    names for a batch's group: keep them in step)."""
    return f"{tag(shard_)}:sub:jx:{bucket}:{group}"


# -- the result cache (docs/cache.md). Workers' keys: no `sub:`, so a producer credential
# cannot write an answer. Each entry has a hash tag of its own (entries spread over the
# slots); a scope's index and the scope list are bookkeeping beside them.
CACHE_SCOPE_FIELD = "vlmq.tenant"  # job metadata: the tenant its submitter recorded
CACHE_CHANNEL = f"{PREFIX}:cache"  # pub/sub: an entry digest whose waiters should look again
CACHE_SCOPES_KEY = f"{PREFIX}:{{cache}}:scopes"  # hash: scope id -> scope name


def cache_entry_key(entry: str) -> str:
    """A cache entry (hash: answer, source, at; leader, lead_until, waiters while one runs).
    `entry` is the hex digest over the scope and the request key."""
    return f"{PREFIX}:{{c{entry[:16]}}}:cache:{entry}"


def cache_index_key(scope_id: str) -> str:
    """A scope's entries by the time they were written (zset): its size bound and purge."""
    return f"{PREFIX}:{{s{scope_id}}}:cacheidx:{scope_id}"
