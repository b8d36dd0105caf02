"""The engine protocol: what the worker needs from vLLM, LMDeploy, transformers or a fake.

The worker hands every request to `generate` as soon as its images are ready and awaits
them all concurrently: batching is the engine's job (continuous batching), never ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import msgspec

from vlmq.schemas.job import Message, ResponseFormat, Sampling

if TYPE_CHECKING:
    from PIL.Image import Image

    from vlmq.worker.embeds import Embedding, EmbedSpec
    from vlmq.worker.render import RendererFactory
    from vlmq.worker.video import Video


class EngineConfigError(ValueError):
    """An engine option the engine does not take: the worker stops at start and says which."""


class EngineDead(RuntimeError):
    """The engine cannot serve any more requests (its process died, its loop stopped). Not
    the job's fault: the worker stops without ending the job, and another worker redoes it."""


class EngineRequest(msgspec.Struct, kw_only=True):
    """A job ready for an engine: messages as sent, and either its images (videos) decoded
    and resized, in order, or (engines with a renderer) the finished input the renderer made."""

    request_id: str
    messages: list[Message]
    images: list[Image]
    videos: list[Video] = []
    embeds: list[Embedding] = []
    rendered: Any = None
    sampling: Sampling
    response_format: ResponseFormat | None = None
    priority: int = 0


class EngineOutput(msgspec.Struct, kw_only=True):
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tokens: int = 0
    ttft_s: float | None = None


@runtime_checkable
class Engine(Protocol):
    name: str
    model: str
    image_factor: int  # resize images to multiples of this (patch size x merge size)
    takes_video: bool  # whether it takes VideoRef parts (others fail them `unsupported_input`)
    embeds: EmbedSpec | None  # the image embeddings it takes, once started (None: none)

    async def start(self) -> None: ...

    async def generate(self, request: EngineRequest) -> EngineOutput: ...

    async def abort(self, request_id: str) -> None: ...

    async def close(self) -> None: ...

    def healthy(self) -> bool: ...

    def renderer(self) -> RendererFactory | None:
        """What builds this engine's input renderer in the worker's image processes (None:
        the engine takes decoded images and renders them itself)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Engine counters: "running" (requests inside the engine) feeds vlmq_engine_running;
        "waiting" (those not yet scheduled) paces the image stage."""
        ...
