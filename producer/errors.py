"""The SDK's exceptions: one type per way a call can go wrong."""

from __future__ import annotations

from vlmq.schemas.job import Result


class VlmqClientError(Exception):
    """Base of every SDK error."""


class ValidationError(VlmqClientError, ValueError):
    """The job breaks the wire contract; the message names the field."""


class Timeout(VlmqClientError, TimeoutError):
    """The job did not end within the time asked for (it may still end later)."""

    def __init__(self, job_id: str, timeout: float | None) -> None:
        super().__init__(f"job {job_id} did not end within {timeout}s; it keeps running")
        self.job_id = job_id


class JobNotFound(VlmqClientError, KeyError):
    """No record of this job: never submitted, or expired from Redis (TTL)."""


class JobEnded(VlmqClientError):
    """A job ended without success. `result` holds the whole record."""

    def __init__(self, result: Result) -> None:
        err = f": {result.error.code.value}: {result.error.message}" if result.error else ""
        super().__init__(f"job {result.job_id} {result.state.value}{err}")
        self.result = result


class JobFailed(JobEnded):
    """The job failed; `result.error.code` says why, `result.error.retryable` if worth retrying."""


class JobCancelled(JobEnded):
    """The job was cancelled."""


class JobExpired(JobFailed):
    """The job's deadline passed before it started."""
