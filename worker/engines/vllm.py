"""vLLM, in process: `AsyncLLM` with continuous batching; every request submitted at once.

Prompts come from the model's own chat template (processor, else tokenizer), so each
model family gets its own image placeholders; images go in as PIL, already resized by the
worker, in `multi_modal_data`. Engine options keep vLLM's names (`-e max_num_seqs=16`,
`-e limit_mm_per_prompt='{"image": 4}'`, `-e tokenizer_mode=mistral`, ...): they are passed
to `AsyncEngineArgs` as given.
"""

from __future__ import annotations

import time
from typing import Any

from vlmq.schemas.errors import VlmqError
from vlmq.worker.engines.base import EngineOutput, EngineRequest
from vlmq.worker.engines.mapping import engine_error, hf_messages, vllm_sampling_kwargs


class VllmEngine:
    name = "vllm"

    def __init__(self, model: str, *, image_factor: int = 28, ignore_eos: bool = False,
                 **engine_args: Any) -> None:
        self.model = str(engine_args.get("served_model_name") or model)
        self.path = model
        self.image_factor = image_factor
        # Benchmarks with random weights: every answer max_tokens long, whatever the noise.
        self.ignore_eos = ignore_eos
        self.engine_args = {"model": model, **engine_args}
        self.priority = engine_args.get("scheduling_policy") == "priority"
        self._llm: Any = None
        self._template: Any = None
        self._dead = False

    async def start(self) -> None:
        if self._llm is not None:  # started already (e.g. shared by a benchmark)
            return
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_args))
        self._template = self._chat_template_owner()

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
        return str(self._template.apply_chat_template(
            hf_messages(request.messages), tokenize=False, add_generation_prompt=True))

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
            async for out in self._llm.generate(inputs, params, request_id=request.request_id,
                                                priority=request.priority if self.priority else 0):
                piece = out.outputs[0]
                if ttft is None and piece.token_ids:
                    ttft = time.perf_counter() - t0
                text.append(piece.text)
                tokens += len(piece.token_ids)
                final = out
        except VlmqError:
            raise
        except Exception as exc:
            self._dead = type(exc).__name__ == "EngineDeadError"
            raise engine_error(exc) from None
        return EngineOutput(
            text="".join(text), finish_reason=final.outputs[0].finish_reason,
            prompt_tokens=len(final.prompt_token_ids or []), completion_tokens=tokens, ttft_s=ttft,
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
        return {}
