"""A minimal OpenAI-compatible /v1/chat/completions server, for testing the `openai` engine
over real HTTP. Deterministic answers: a hash of the text parts and of each image's bytes.
`SLOW` in a prompt makes it wait 30 s (to test abort); the first request whose prompt holds
`RETRY` gets a 429.

    python -m tests.servers.openai_stub PORT
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sys
from typing import Any

from aiohttp import web

STATE: dict[str, Any] = {"retried": set(), "cancelled": 0}


def answer(body: dict[str, Any]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for m in body["messages"]:
        content = m["content"]
        parts: list[dict[str, Any]] = (
            [{"type": "text", "text": content}] if isinstance(content, str) else content
        )
        for p in parts:
            if p["type"] == "text":
                h.update(p["text"].encode())
            else:
                h.update(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))
    if "structured_outputs" in body and "choice" in body["structured_outputs"]:
        choices = body["structured_outputs"]["choice"]
        return str(choices[int(h.hexdigest(), 16) % len(choices)])
    return f"stub:{h.hexdigest()}"


async def chat(request: web.Request) -> web.Response:
    body = await request.json()
    prompt = json.dumps(body["messages"])
    if "RETRY" in prompt and prompt not in STATE["retried"]:
        STATE["retried"].add(prompt)
        return web.json_response({"error": "slow down"}, status=429)
    if body.get("model") != "stub-model":
        return web.json_response({"error": {"message": "model not found"}}, status=404)
    if "SLOW" in prompt:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:  # the client hung up: an abort
            STATE["cancelled"] += 1
            raise
    text = answer(body)
    return web.json_response(
        {
            "id": "x",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
        }
    )


async def stats(_: web.Request) -> web.Response:
    return web.json_response({"cancelled": STATE["cancelled"], "retried": len(STATE["retried"])})


def main(port: int) -> None:
    app = web.Application(handler_args={"handler_cancellation": True})
    app.add_routes([web.post("/v1/chat/completions", chat), web.get("/stats", stats)])
    web.run_app(app, host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    main(int(sys.argv[1]))
