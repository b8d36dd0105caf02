"""The result cache's mappings on the submit side: the OpenAI `metadata.vlmq_cache`, the
submitter's tenant, and how a cached result shows in the OpenAI output file."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from vlmq.producer.builders import caption, with_tenant
from vlmq.producer.bulk import BadLine, OpenAIReader, openai_output
from vlmq.schemas import keys
from vlmq.schemas.job import Job, JobState, Result, Usage


def line(metadata: Any = None) -> str:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    if metadata is not None:
        body["metadata"] = metadata
    return json.dumps({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": body})


def test_openai_metadata_vlmq_cache_is_the_jobs_cache_mode() -> None:
    reader = OpenAIReader("b1")
    for mode in ("use", "refresh", "off"):
        job = OpenAIReader("b1").line(1, line({"vlmq_cache": mode}))
        assert isinstance(job, Job) and job.cache == mode
    plain = reader.line(1, line({"other": "x", keys.CACHE_SCOPE_FIELD: "victim"}))
    assert isinstance(plain, Job) and plain.cache == "use"
    assert plain.metadata == {"custom_id": "r1"}  # a request body never names a tenant
    bad = OpenAIReader("b1").line(1, line({"vlmq_cache": "always"}))
    assert isinstance(bad, BadLine) and "vlmq_cache" in bad.reason


def test_the_submitters_tenant_wins_over_the_jobs() -> None:
    job = caption("s3://b/k.jpg", job_id="j", metadata={keys.CACHE_SCOPE_FIELD: "victim", "k": "v"})
    assert with_tenant(job, None) is job
    assert with_tenant(job, "me").metadata == {keys.CACHE_SCOPE_FIELD: "me", "k": "v"}


def test_a_cached_result_keeps_usage_and_says_so_in_the_openai_output() -> None:
    usage = Usage(prompt_tokens=100, completion_tokens=9)
    r = Result("j2", JobState.SUCCEEDED, text="a cat", usage=usage, metadata={"custom_id": "r2"})
    cached = msgspec.structs.replace(r, cached=True, cache_age_s=3.5, cache_source="j1")
    plain, hit = openai_output(r), openai_output(cached)
    assert "vlmq_cache" not in plain["response"]
    assert hit["response"]["vlmq_cache"] == {"cached": True, "age_s": 3.5, "source": "j1"}
    assert hit["response"]["body"]["usage"] == plain["response"]["body"]["usage"]
    assert hit["response"]["body"]["usage"]["total_tokens"] == 109
