"""vLLM, in process: `AsyncLLM` with continuous batching; every request submitted at once.

Prompts come from the model's own chat template (processor, else tokenizer), so each
model family gets its own image placeholders; images go in as PIL, already resized by the
worker, in `multi_modal_data`. Engine options keep vLLM's names (`-e max_num_seqs=16`,
`-e limit_mm_per_prompt='{"image": 4}'`, `-e tokenizer_mode=mistral`, ...): they are passed
to `AsyncEngineArgs` as given.
"""

from __future__ import annotations

import re
import time
from typing import Any

from vlmq.core.settings import parse_pairs
from vlmq.schemas.errors import VlmqError
from vlmq.worker.engines.base import EngineConfigError, EngineDead, EngineOutput, EngineRequest
from vlmq.worker.engines.mapping import engine_error, hf_messages, vllm_sampling_kwargs

_PAIRS = re.compile(r"^\w+=[^=,]+(,\w+=[^=,]+)*$")


def _mapping(value: Any) -> Any:
    """`image=4` or `image=4,video=1` (how vllm serve's guides write --limit-mm-per-prompt)
    into the dict AsyncEngineArgs takes; JSON values arrive as dicts already."""
    if isinstance(value, str) and _PAIRS.match(value):
        return {k: int(v) if v.isdigit() else v for k, v in parse_pairs(value.split(",")).items()}
    return value


class VllmEngine:
    name = "vllm"

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
        }
        self.engine_args |= {k: _mapping(v) for k, v in engine_args.items()}
        self.priority = engine_args.get("scheduling_policy") == "priority"
        self._llm: Any = None
        self._template: Any = None
        self._image_token: int | None = None
        self._dead = False

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
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
        self._template = self._chat_template_owner()
        # Image placeholders in the prompt are the image tokens (Qwen-VL, LLaVA, ...).
        self._image_token = getattr(self._llm.model_config.hf_config, "image_token_id", None)

    def _chat_template_owner(self) -> Any:
        """The processor when the model ships one (it knows the image tokens), else the
        tokenizer."""
        from transformers import AutoProcessor, AutoTokenizer

        trust = bool(self.engine_args.get("trust_remote_code", False))
        try:
            proc = AutoProcessor.from_pretrained(self.path, trust_remote_code=trust)
            if getattr(proc, "chat_template", None):
                return proc
        except (OSError, ValueError, TypeError, KeyError):
            pass
        return AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust)

    def prompt(self, request: EngineRequest) -> str:
        return str(
            self._template.apply_chat_template(
                hf_messages(request.messages), tokenize=False, add_generation_prompt=True
            )
        )

    async def generate(self, request: EngineRequest) -> EngineOutput:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        kw = vllm_sampling_kwargs(request.sampling, request.response_format)
        if "structured_outputs" in kw:
            kw["structured_outputs"] = StructuredOutputsParams(**kw["structured_outputs"])
        params = SamplingParams(**kw, ignore_eos=self.ignore_eos, output_kind=RequestOutputKind.DELTA)
        inputs: dict[str, Any] = {"prompt": self.prompt(request)}
        if request.images:
            inputs["multi_modal_data"] = {"image": request.images}
        t0, ttft = time.perf_counter(), None
        text: list[str] = []
        tokens = 0  # DELTA outputs: each chunk holds only the new tokens
        final: Any = None
        try:
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
            image_tokens=prompt.count(self._image_token) if self._image_token is not None else 0,
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
        return {"running": self._llm.output_processor.get_num_unfinished_requests()}
