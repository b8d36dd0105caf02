"""The vlmq producer SDK. Importable with the base install: no torch, vLLM or Pillow."""

from vlmq.core.state import BatchCounts
from vlmq.producer.builders import (
    batch_job_id,
    caption,
    embeddings,
    image,
    moderate,
    new_job_id,
    user,
    video,
)
from vlmq.producer.client import Client, Handle, SubmitReport
from vlmq.producer.errors import (
    JobCancelled,
    JobExpired,
    JobFailed,
    JobNotFound,
    Timeout,
    ValidationError,
    VlmqClientError,
)
from vlmq.producer.sync import SyncClient

__all__ = [
    "BatchCounts",
    "Client",
    "Handle",
    "JobCancelled",
    "JobExpired",
    "JobFailed",
    "JobNotFound",
    "SubmitReport",
    "SyncClient",
    "Timeout",
    "ValidationError",
    "VlmqClientError",
    "batch_job_id",
    "caption",
    "embeddings",
    "image",
    "moderate",
    "new_job_id",
    "user",
    "video",
]
