"""vLLM, in process: `AsyncLLM` with continuous batching; every request submitted at once.

Prompts come from the model's own chat template (processor, else tokenizer), so each
model family gets its own image placeholders; images go in as PIL, already resized by the
worker, in `multi_modal_data`. With `--image-pool process` each image process instead builds
vLLM's own renderer from this engine's config and hands over a finished input (token ids,
processed image tensors, names, placeholders), and vLLM skips its front-end preprocessing.

The multimodal processor cache is off by default (`mm_processor_cache_gb=0`): in a backlog
each image comes once, and finished inputs are rendered without it. Engine options keep
vLLM's names (`-e max_num_seqs=16`, `-e limit_mm_per_prompt='{"image": 4}'`,
`-e tokenizer_mode=mistral`, ...): they are passed to `AsyncEngineArgs` as given. With
`tokenizer_mode=mistral` (Pixtral and other Mistral-format checkpoints: params.json and
tekken.json, no HF tokenizer) mistral_common encodes the chat, image tokens included, as
vLLM's own chat path does.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from typing import Any

from vlmq.core.settings import parse_pairs
from vlmq.schemas.errors import ErrorCode, VlmqError
from vlmq.schemas.job import Message, TextPart
from vlmq.worker.embeds import Embedding, EmbedSpec
from vlmq.worker.engines.base import EngineConfigError, EngineDead, EngineOutput, EngineRequest
from vlmq.worker.engines.mapping import engine_error, hf_messages, vision_token_ids, vllm_sampling_kwargs
from vlmq.worker.render import Prepared, tensor_bytes
from vlmq.worker.video import Video

_PAIRS = re.compile(r"^\w+=[^=,]+(,\w+=[^=,]+)*$")


def _mapping(value: Any) -> Any:
    """`image=4` or `image=4,video=1` (how vllm serve's guides write --limit-mm-per-prompt)
    into the dict AsyncEngineArgs takes; JSON values arrive as dicts already."""
    if isinstance(value, str) and _PAIRS.match(value):
        return {k: int(v) if v.isdigit() else v for k, v in parse_pairs(value.split(",")).items()}
    return value


class VllmEngine:
    name = "vllm"
    embeds: EmbedSpec | None = None
    takes_video = True

    def __init__(
        self, model: str, *, image_factor: int = 28, ignore_eos: bool = False, **engine_args: Any
    ) -> None:
        self.model = str(engine_args.get("served_model_name") or model)
        self.path = model
        self.image_factor = image_factor
        # Benchmarks with random weights: every answer max_tokens long, whatever the noise.
        self.ignore_eos = ignore_eos
        # Compact JSON unless told otherwise: with free whitespace, weak (or random-weight)
        # models fill max_tokens with blanks and never close the object (seen on the H100).
        # vLLM takes this per engine, and only for the xgrammar and guidance backends.
        self.engine_args: dict[str, Any] = {
            "model": model,
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
            "mm_processor_cache_gb": 0,
        }
        self.engine_args |= {k: _mapping(v) for k, v in engine_args.items()}
        self.priority = engine_args.get("scheduling_policy") == "priority"
        self._llm: Any = None
        self._template: Any = None
        self._vision_tokens: set[int] = set()
        self._dead = False
        self._waiting = 0  # the scheduler's waiting queue, from its stats (_stat_logger)

    async def start(self) -> None:
        if self._llm is not None:  # started already (e.g. shared by a benchmark)
            return
        import dataclasses

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        unknown = set(self.engine_args) - {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        if unknown:
            raise EngineConfigError(
                f"not vLLM engine args: {', '.join(sorted(unknown))} "
                "(see `vllm serve --help` for the names this vLLM takes)"
            )
        kw = dict(self.engine_args)
        if isinstance(kw["structured_outputs_config"], dict):
            from vllm.config import StructuredOutputsConfig

            kw["structured_outputs_config"] = StructuredOutputsConfig(**kw["structured_outputs_config"])
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw), stat_loggers=[self._stat_logger()])
        self._template = chat_template_owner(self.path, self._trust, self._tokenizer_mode)
        self.embeds = embed_spec(self._llm.model_config) if self.engine_args.get("enable_mm_embeds") else None
        # Image (video) placeholders in the prompt are the image tokens (Qwen-VL, LLaVA, ...).
        self._vision_tokens = vision_token_ids(self._llm.model_config.hf_config)
        if isinstance(self._template, MistralChat):
            self._vision_tokens = self._template.image_token_ids

    @property
    def _trust(self) -> bool:
        return bool(self.engine_args.get("trust_remote_code", False))

    @property
    def _tokenizer_mode(self) -> str:
        return str(self.engine_args.get("tokenizer_mode", "auto"))

    def _stat_logger(self) -> Any:
        """A stats logger that keeps the scheduler's waiting count for `stats()`."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class Waiting(StatLoggerBase):  # type: ignore[misc]  # vLLM is not installed for mypy
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kw: Any) -> None:
                if scheduler_stats is not None:
                    engine._waiting = scheduler_stats.num_waiting_reqs

            def log_engine_initialized(self) -> None:
                pass

        return Waiting

    def prompt(self, request: EngineRequest) -> dict[str, Any]:
        """The prompt vLLM takes: text from an HF chat template, or token ids from Mistral's."""
        return chat_input(self._template, request.messages, request.images)

    def renderer(self) -> VllmRendererFactory | None:
        if self._llm is None:
            raise RuntimeError("start the engine first: its renderer is built from its config")
        if self.engine_args.get("mm_processor_cache_gb"):
            # A processor cache lives in the engine's front end; rendering elsewhere would
            # bypass it. Whoever turned it on wants it: the engine renders.
            return None
        return VllmRendererFactory(self._llm.vllm_config, self.path, self._trust, self._tokenizer_mode)

    async def generate(self, request: EngineRequest) -> EngineOutput:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        kw = vllm_sampling_kwargs(request.sampling, request.response_format)
        if "structured_outputs" in kw:
            kw["structured_outputs"] = StructuredOutputsParams(**kw["structured_outputs"])
        params = SamplingParams(**kw, ignore_eos=self.ignore_eos, output_kind=RequestOutputKind.DELTA)
        t0, ttft = time.perf_counter(), None
        text: list[str] = []
        tokens = 0  # DELTA outputs: each chunk holds only the new tokens
        final: Any = None
        try:
            inputs: dict[str, Any] = request.rendered
            if inputs is None:  # the chat template can refuse a conversation (Mistral's does)
                inputs = with_media(self.prompt(request), request.images, request.videos, request.embeds)
            async for out in self._llm.generate(
                inputs,
                params,
                request_id=request.request_id,
                priority=request.priority if self.priority else 0,
            ):
                piece = out.outputs[0]
                if ttft is None and piece.token_ids:
                    ttft = time.perf_counter() - t0
                text.append(piece.text)
                tokens += len(piece.token_ids)
                final = out
        except VlmqError:
            raise
        except Exception as exc:
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(exc, EngineDeadError):
                self._dead = True
                raise EngineDead(f"vLLM engine died: {exc}") from exc
            raise engine_error(exc) from None
        prompt = list(final.prompt_token_ids or [])
        return EngineOutput(
            text="".join(text),
            finish_reason=final.outputs[0].finish_reason,
            prompt_tokens=len(prompt),
            completion_tokens=tokens,
            ttft_s=ttft,
            image_tokens=sum(1 for t in prompt if t in self._vision_tokens),
        )

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def close(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()

    def healthy(self) -> bool:
        return self._llm is not None and not self._dead and not getattr(self._llm, "errored", False)

    def stats(self) -> dict[str, Any]:
        if self._llm is None:
            return {}
        unfinished = self._llm.output_processor.get_num_unfinished_requests()
        # The waiting count is as of the engine's last step: never more than are unfinished now.
        return {"running": unfinished, "waiting": min(self._waiting, unfinished)}


def chat_template_owner(path: str, trust: bool, tokenizer_mode: str = "auto") -> Any:
    """The processor when the model ships one (it knows the image tokens), else the tokenizer;
    Mistral's own encoder with `tokenizer_mode=mistral`."""
    if tokenizer_mode == "mistral":
        return MistralChat(path)
    from transformers import AutoProcessor, AutoTokenizer

    try:
        proc = AutoProcessor.from_pretrained(path, trust_remote_code=trust)
        if getattr(proc, "chat_template", None):
            return proc
    except (OSError, ValueError, TypeError, KeyError):
        pass
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust)


def chat_input(template: Any, messages: list[Message], images: Sequence[Any]) -> dict[str, Any]:
    if isinstance(template, MistralChat):
        return {"prompt_token_ids": template.encode(messages, images)}
    text = template.apply_chat_template(hf_messages(messages), tokenize=False, add_generation_prompt=True)
    return {"prompt": str(text)}


class MistralChat:
    """Mistral-format models' chat encoding (mistral_common, from the checkpoint's own
    tekken.json / tokenizer.model.v*). vLLM's Pixtral expects the image tokens in the prompt
    already, and their number depends on each image's size: so the images go in here too."""

    def __init__(self, path: str) -> None:
        from vllm.tokenizers.mistral import MistralTokenizer

        self._mistral = MistralTokenizer.from_pretrained(path).mistral
        ids = self._mistral.instruct_tokenizer.image_encoder.special_ids
        self.image_token_ids = {ids.img}

    def encode(self, messages: list[Message], images: Sequence[Any]) -> list[int]:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        pictures = iter(images)
        request = ChatCompletionRequest(messages=[_mistral_message(m, pictures) for m in messages])
        try:
            return list(self._mistral.encode_chat_completion(request).tokens)
        except (AssertionError, ValueError, MistralCommonException) as exc:  # it validates with asserts too
            msg = f"Mistral's chat format refused the messages: {exc}"
            raise VlmqError(ErrorCode.INVALID_JOB, msg) from None


def _mistral_message(m: Message, images: Iterator[Any]) -> Any:
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        ImageChunk,
        SystemMessage,
        TextChunk,
        UserMessage,
    )

    chunks: list[Any] = []
    for p in m.parts:
        if isinstance(p, TextPart):
            chunks.append(TextChunk(text=p.text))
        elif p.kind == "image" and m.role == "user":  # Mistral's other turns hold text only
            chunks.append(ImageChunk(image=next(images)))
        else:
            msg = f"Mistral-format models take no {p.kind} input in a {m.role} message"
            raise VlmqError(ErrorCode.UNSUPPORTED_INPUT, msg)
    if m.role == "user":
        return UserMessage(content=chunks)
    text = "".join(c.text for c in chunks)
    return SystemMessage(content=text) if m.role == "system" else AssistantMessage(content=text)


def embed_spec(model_config: Any) -> EmbedSpec:
    """The embeddings this model takes: its language backbone's hidden size; Qwen-VL-family
    models (a vision config with a spatial merge) also need each image's grid."""
    vision = getattr(model_config.hf_config, "vision_config", None)
    return EmbedSpec(model_config.get_hidden_size(), getattr(vision, "spatial_merge_size", None))


def with_media(
    prompt: dict[str, Any], images: list[Any], videos: list[Video], embeds: Sequence[Embedding] = ()
) -> dict[str, Any]:
    """A prompt with its images and videos; a video as (frames, metadata): sampled here,
    so vLLM must not sample again (Qwen2.5-VL also needs the fps to place frames in time).
    Image embeddings (checked already, worker/embeds.py) go in place of images: for Qwen-VL
    one tensor of all of them with their grids, else one [tokens, hidden] tensor each."""
    mm: dict[str, Any] = {}
    if images:
        mm["image"] = images
    if embeds:
        mm["image"] = _embeddings(embeds)
    if videos:
        mm["video"] = [(v.frames, v.metadata() | {"do_sample_frames": False}) for v in videos]
    return prompt | {"multi_modal_data": mm} if mm else prompt


def _embeddings(embeds: Sequence[Embedding]) -> Any:
    import torch
    from safetensors.torch import load

    tensors = [load(e.data)["image_embeds"] for e in embeds]
    if all(e.grid_thw for e in embeds):
        grids = torch.tensor([e.grid_thw for e in embeds], dtype=torch.int64)
        return {"image_embeds": torch.cat(tensors), "image_grid_thw": grids}
    return tensors


class VllmRendererFactory:
    """Builds, in an image process, vLLM's own renderer from the running engine's config, so
    the two cannot drift (same tokenizer, processor, limits and placeholders)."""

    def __init__(self, vllm_config: Any, path: str, trust: bool, tokenizer_mode: str = "auto") -> None:
        self.vllm_config = vllm_config
        self.path = path
        self.trust = trust
        self.tokenizer_mode = tokenizer_mode

    def __call__(self) -> VllmRenderer:
        return VllmRenderer(self.vllm_config, self.path, self.trust, self.tokenizer_mode)


class VllmRenderer:
    def __init__(self, vllm_config: Any, path: str, trust: bool, tokenizer_mode: str = "auto") -> None:
        from vllm.renderers.registry import renderer_from_config

        self._renderer = renderer_from_config(vllm_config)
        self._template = chat_template_owner(path, trust, tokenizer_mode)
        # With the processor cache and prefix caching off, vLLM names each image
        # "renderer<rank>-mm-<counter>-image-<i>" instead of hashing it, and the engine's
        # encoder cache is keyed by that name. Every process here would count from 1 under
        # the same rank: images of different jobs would share names, and so embeddings
        # (seen on an H200: wrong embeddings, and an engine dead of "1609 multimodal tokens
        # to 1840 placeholders"). A rank of this process's own makes the names unique.
        self._tag = f"-vlmq{os.getpid()}x{secrets.token_hex(6)}"
        self._renderer.api_process_rank = self._tag

    def render(self, messages: list[Message], inputs: Prepared) -> tuple[Any, int]:
        prompt = chat_input(self._template, messages, inputs.images)
        prompt = with_media(prompt, inputs.images, inputs.videos, inputs.embeds)
        # skip_mm_cache: a processor cache here would be per process, and could not agree
        # with the engine's.
        (out,) = self._renderer.render_cmpl([prompt], skip_mm_cache=True)
        self._check_names(out.get("mm_hashes") or {})
        return out, tensor_bytes(out.get("mm_kwargs"))

    def _check_names(self, hashes: dict[str, list[str]]) -> None:
        """Content hashes, or names with this process's tag: anything else could collide
        with another process's names (a vLLM whose naming changed): refuse, never guess."""
        for name in (h for names in hashes.values() for h in names):
            if name.startswith("renderer") and self._tag not in name:
                raise RuntimeError(
                    f"vLLM named an image {name!r}, which other image processes may also use; "
                    "run the worker with --image-pool thread"
                )
