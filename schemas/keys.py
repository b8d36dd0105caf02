"""Names of topics and Redis keys. One place, so every client agrees."""

from __future__ import annotations

JOBS_TOPIC = "vlmq.jobs"
DLQ_TOPIC = "vlmq.jobs.dlq"
RESULTS_TOPIC = "vlmq.results"

PREFIX = "vlmq"
CANCEL_CHANNEL = f"{PREFIX}:cancel"  # pub/sub: payload is a job_id
NO_BATCH = f"{PREFIX}:batch:-"  # placeholder key for jobs without a batch; never written


def job_key(job_id: str) -> str:
    """Hash: state, record (the Result as JSON), attempt, terminal_writes, ..."""
    return f"{PREFIX}:job:{job_id}"


def done_channel(job_id: str) -> str:
    """Pub/sub channel that gets the terminal state the moment a job ends."""
    return f"{PREFIX}:done:{job_id}"


def batch_key(batch_id: str) -> str:
    """Hash of counters per state, plus `total`."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_done_key(batch_id: str) -> str:
    """List of the batch's job ids in the order they ended (each exactly once)."""
    return f"{PREFIX}:batch:{batch_id}:done"
