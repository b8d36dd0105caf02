"""OpenAI's own Batch API example, unchanged: point the SDK at `vlmq api` with its two
environment variables and run it.

    export OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=$(vlmq api key create me)
    python examples/openai_batch.py batchinput.jsonl
"""

from __future__ import annotations

import sys
import time

from openai import OpenAI

client = OpenAI()

batch_input_file = client.files.create(file=open(sys.argv[1], "rb"), purpose="batch")  # noqa: SIM115

batch = client.batches.create(
    input_file_id=batch_input_file.id,
    endpoint="/v1/chat/completions",
    completion_window="24h",
    metadata={"description": "nightly eval job"},
)

while batch.status not in ("completed", "failed", "expired", "cancelled"):
    time.sleep(1)
    batch = client.batches.retrieve(batch.id)

print(batch.status, batch.request_counts, file=sys.stderr)
if batch.output_file_id:
    file_response = client.files.content(batch.output_file_id)
    print(file_response.text)
