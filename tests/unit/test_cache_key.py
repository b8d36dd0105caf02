"""The result cache's key (worker/cache.py): stable for the same request, different for
anything that decides the answer, blind to what does not (ids, URLs, metadata)."""

from __future__ import annotations

import msgspec
import pytest

from vlmq.producer.builders import caption, moderate
from vlmq.schemas import keys
from vlmq.schemas.codec import decode_job, encode_job
from vlmq.schemas.job import Job, Sampling
from vlmq.worker.cache import KEY_VERSION, applies, request_key, scope_of
from vlmq.worker.engines.fake import FakeEngine
from vlmq.worker.render import Sizing
from vlmq.worker.settings import WorkerSettings

S = WorkerSettings()
PIC, OTHER = b"\xff\xd8 picture bytes", b"\xff\xd8 other bytes"
SIZING: list[Sizing] = [(S.min_pixels, S.max_pixels)]


def key(job: Job, blob: bytes = PIC, settings: WorkerSettings = S, engine: FakeEngine | None = None) -> str:
    return request_key(job, [blob], SIZING, engine or FakeEngine("m"), settings)


def test_the_key_is_a_pinned_digest_of_the_request() -> None:
    # Pinned: a change to what goes into the key must bump KEY_VERSION (and this value).
    job = caption("s3://b/cat.jpg", "Describe.", job_id="j1")
    assert KEY_VERSION == 1
    assert key(job) == "1056a0c63d930329973d514c611866bf9b17b680276e9005285bc71c535ad205"
    value, _ = encode_job(job)
    assert key(job) == key(decode_job(value))  # through the wire: the same


def test_ids_urls_and_metadata_do_not_change_the_key() -> None:
    a = caption("s3://b/cat.jpg", "Describe.", job_id="j1", batch_id="b1", metadata={"k": "1"})
    b = caption("https://cdn.example.com/copy.jpg", "Describe.", job_id="j2", priority=5, cache="refresh")
    assert key(a) == key(b)  # content, not URL


@pytest.mark.parametrize(
    "change",
    [
        lambda j: msgspec.structs.replace(j, sampling=Sampling(max_tokens=64)),
        lambda j: msgspec.structs.replace(j, sampling=Sampling(max_tokens=128, seed=7)),
        lambda j: msgspec.structs.replace(j, sampling=Sampling(max_tokens=128, stop=["."])),
        lambda j: caption("s3://b/cat.jpg", "Describe briefly.", job_id="j1"),
        lambda j: moderate("s3://b/cat.jpg", ["ok", "nsfw"], prompt="Describe.", job_id="j1"),
    ],
)
def test_what_decides_the_answer_changes_the_key(change: object) -> None:
    job = caption("s3://b/cat.jpg", "Describe.", job_id="j1")
    assert key(change(job)) != key(job)  # type: ignore[operator]


def test_image_bytes_model_options_engine_and_preprocessing_change_the_key() -> None:
    job = caption("s3://b/cat.jpg", "Describe.", job_id="j1")
    base = key(job)
    assert key(job, OTHER) != base
    assert key(job, engine=FakeEngine("other-model")) != base
    option = msgspec.structs.replace(S, engine_args={"completion_tokens": "8"})
    assert key(job, settings=option) != base  # an output-changing engine option: a miss
    neutral = msgspec.structs.replace(S, engine_args={"max_num_seqs": "8", "step_ms": "5"})
    assert key(job, settings=neutral) == base  # batching and pace do not change answers
    kind = FakeEngine("m")
    kind.name = "vllm"
    assert key(job, engine=kind) != base
    assert request_key(job, [PIC], [(S.min_pixels, S.max_pixels // 2)], FakeEngine("m"), S) != base
    fps = msgspec.structs.replace(S, video_fps=1.0)
    assert key(job, settings=fps) != base


def test_the_cache_applies_to_deterministic_requests_unless_opted_out() -> None:
    job = caption("s3://b/cat.jpg", job_id="j1")
    hot = msgspec.structs.replace(job, sampling=Sampling(temperature=0.7))
    seeded = msgspec.structs.replace(job, sampling=Sampling(temperature=0.7, seed=1))
    assert applies(job, S) and applies(seeded, S) and not applies(hot, S)
    assert applies(hot, msgspec.structs.replace(S, cache_sampled=True))
    assert not applies(msgspec.structs.replace(job, cache="off"), S)
    assert not applies(job, msgspec.structs.replace(S, cache=False))


def test_the_scope_is_the_recorded_tenant_or_shared_by_the_operator() -> None:
    a = caption("s3://b/cat.jpg", job_id="j1", metadata={keys.CACHE_SCOPE_FIELD: "team-a"})
    assert scope_of(a, S) == "team-a"
    assert scope_of(caption("s3://b/cat.jpg", job_id="j2"), S) == ""
    assert scope_of(a, msgspec.structs.replace(S, cache_scope="shared")) == "*"


def test_the_cache_field_is_bounded() -> None:
    with pytest.raises(msgspec.ValidationError, match="cache"):
        msgspec.convert(
            {"job_id": "j", "messages": [{"role": "user", "content": "x"}], "cache": "maybe"}, Job
        )
