"""The SDK's exceptions: one type per way a call can go wrong."""

from __future__ import annotations

from vlmq.core.settings import refused, unreachable
from vlmq.schemas.job import Result


class VlmqClientError(Exception):
    """Base of every SDK error. `str()` is one line that says what to do next."""

    def __str__(self) -> str:  # KeyError's own str() is the repr of its argument
        return str(self.args[0]) if self.args else type(self).__name__


class ValidationError(VlmqClientError, ValueError):
    """The job breaks the wire contract; the message names the field."""


class Unavailable(VlmqClientError, ConnectionError):
    """Redis or Kafka did not answer. `service` and `address` say which and where; `job_id`,
    when set, is the job a submit did not get to Kafka."""

    def __init__(
        self, service: str, address: str, cause: BaseException, hint: str = "", job_id: str | None = None
    ) -> None:
        self.service, self.address, self.cause, self.hint, self.job_id = service, address, cause, hint, job_id
        line = unreachable(service, address, cause, hint)
        super().__init__(line + (f" (job {job_id} was not submitted)" if job_id else ""))

    def not_submitted(self, job_id: str) -> Unavailable:
        """The same error, naming the job that was not submitted."""
        return Unavailable(self.service, self.address, self.cause, self.hint, job_id)


class Denied(VlmqClientError):
    """A service answered but refused the credentials (a wrong Redis user or password)."""

    def __init__(self, service: str, address: str, cause: BaseException) -> None:
        self.service, self.address, self.cause = service, address, cause
        super().__init__(refused(service, address, cause))


class Timeout(VlmqClientError, TimeoutError):
    """The job did not end within the time asked for (it may still end later)."""

    def __init__(self, job_id: str, timeout: float | None, state: str | None = None) -> None:
        if state == "queued":
            why = "it is still queued: no worker has taken it yet (is one running? `vlmq worker`)"
        else:
            why = "it keeps running"
        super().__init__(f"job {job_id} did not end within {timeout}s; {why}")
        self.job_id = job_id


class NotFound(VlmqClientError):
    """What was asked for does not exist (a job, a batch, images under a prefix)."""


class JobNotFound(NotFound, KeyError):
    """No record of this job: never submitted, or expired from Redis (TTL)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"job {job_id!r} not found: never submitted, or its record expired (VLMQ_RESULT_TTL_S)"
        )
        self.job_id = job_id


class BatchNotFound(NotFound, KeyError):
    """No job was ever recorded under this batch id (or its records expired)."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(
            f"batch {batch_id!r} not found: no job was submitted under it, or its records expired"
        )
        self.batch_id = batch_id


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


class Interrupted(VlmqClientError):
    """Ctrl-C stopped a command part way; the message says how to resume (exit 130)."""


class NothingToSubmit(NotFound):
    """A bulk source yielded no job (an empty or misspelled prefix, an empty file)."""
