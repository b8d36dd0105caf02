"""LMDeploy: its async engine (PyTorch or TurboMind backend), images as PIL.

Options keep LMDeploy's names: `backend` (pytorch | turbomind), `tp`, `session_len`,
`cache_max_entry_count`, `max_batch_size`, `dtype`, ... (`_BACKEND_KEYS`; PyTorch's
`enable_mp_engine` runs its engine in a process of its own), `vision_max_batch_size`
(VisionConfig.max_batch_size), `chat_template` (ChatTemplateConfig model_name),
`trust_remote_code`. LMDeploy's Pipeline runs its AsyncEngine on a loop in a thread of its
own and the engine only works from that loop (requests awaited from another loop hang, seen
on the H100), so every call is handed to that loop and awaited from ours.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from vlmq.worker.embeds import EmbedSpec
from vlmq.worker.engines.base import EngineConfigError, EngineOutput, EngineRequest
from vlmq.worker.engines.mapping import engine_error, lmdeploy_gen_kwargs, lmdeploy_messages
from vlmq.worker.render import tensor_bytes

if TYPE_CHECKING:
    from vlmq.schemas.job import Message
    from vlmq.worker.render import Prepared

T = TypeVar("T")

# Engine-config fields (LMDeploy's names) a worker passes through, per backend.
_COMMON_KEYS = {
    "tp",
    "session_len",
    "cache_max_entry_count",
    "max_batch_size",
    "dtype",
    "max_prefill_token_num",
    "quant_policy",
    "enable_prefix_caching",
}
_BACKEND_KEYS = {
    # enable_mp_engine: the PyTorch engine in a process of its own (ZMQ), as LMDeploy's
    # api_server runs it: the worker's interpreter keeps only the pipeline's front end.
    "pytorch": _COMMON_KEYS | {"block_size", "eager_mode", "enable_mp_engine", "mp_engine_backend"},
    "turbomind": _COMMON_KEYS | {"cache_block_seq_len", "num_tokens_per_iter"},
}


class LmdeployEngine:
    name = "lmdeploy"
    embeds: EmbedSpec | None = None
    takes_video = False

    def __init__(
        self,
        model: str,
        *,
        backend: str = "pytorch",
        vision_max_batch_size: int = 8,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
        image_factor: int = 28,
        **options: Any,
    ) -> None:
        if backend not in _BACKEND_KEYS:
            raise EngineConfigError(f"LMDeploy backend {backend!r} is not one of {', '.join(_BACKEND_KEYS)}")
        unknown = set(options) - _BACKEND_KEYS[backend]
        if unknown:
            raise EngineConfigError(
                f"unknown LMDeploy option(s) for the {backend} backend: {', '.join(sorted(unknown))}"
            )
        self.model = model
        self.backend = backend
        self.options = options
        self.vision_max_batch_size = vision_max_batch_size
        self.chat_template = chat_template
        self.trust_remote_code = trust_remote_code
        self.image_factor = image_factor
        self._pipe: Any = None
        self._ids = itertools.count(1)
        self._sessions: dict[str, int] = {}
        # Requests handed over that have no first token yet (queued in the pipeline's loop,
        # its preprocessing or its scheduler): LMDeploy's `waiting`, which paces the image
        # stage. Its own `get_schedule_metrics().waiting_seqs` counts the scheduler's queue
        # only (where a flood does not sit) and is a round trip to an mp engine.
        self._unstarted: set[str] = set()

    def backend_config(self) -> Any:
        from lmdeploy import PytorchEngineConfig, TurbomindEngineConfig

        cls = PytorchEngineConfig if self.backend == "pytorch" else TurbomindEngineConfig
        return cls(**self.options)

    async def start(self) -> None:
        if self._pipe is not None:  # started already (e.g. shared by a benchmark)
            return
        from lmdeploy import ChatTemplateConfig, VisionConfig, pipeline

        template = ChatTemplateConfig(model_name=self.chat_template) if self.chat_template else None
        self._pipe = pipeline(
            self.model,
            backend_config=self.backend_config(),
            chat_template_config=template,
            vision_config=VisionConfig(max_batch_size=self.vision_max_batch_size),
            trust_remote_code=self.trust_remote_code,
        )

    async def _on_engine_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._pipe.internal_thread.loop
        fut = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.cancel()
            raise

    async def generate(self, request: EngineRequest) -> EngineOutput:
        self._unstarted.add(request.request_id)
        try:
            return await self._on_engine_loop(self._generate(request))
        finally:
            self._unstarted.discard(request.request_id)

    async def _generate(self, request: EngineRequest) -> EngineOutput:
        from lmdeploy import GenerationConfig

        engine = self._pipe.async_engine
        session_id = next(self._ids)
        self._sessions[request.request_id] = session_id
        gen = GenerationConfig(**lmdeploy_gen_kwargs(request.sampling, request.response_format))
        t0, ttft = time.perf_counter(), None
        text: list[str] = []
        last: Any = None
        try:
            if request.rendered is None:
                prepared = await engine.preprocess(
                    lmdeploy_messages(request.messages, request.images), session_id, gen_config=gen
                )
            else:  # rendered in an image process: the engine still checks length and config
                ids = request.rendered["input_ids"]
                prepared = await engine.preprocess(None, session_id, gen_config=gen, input_ids=ids)
                prepared.inputs = request.rendered
            async for out in engine.generate(prepared, stream_response=True):
                if ttft is None and out.generate_token_len:
                    ttft = time.perf_counter() - t0
                    self._unstarted.discard(request.request_id)
                text.append(out.response)  # GenOut: `response` is the new text
                last = out
        except Exception as exc:
            raise engine_error(exc) from None
        finally:
            self._sessions.pop(request.request_id, None)
        if last is not None and last.finish_reason == "error":
            raise engine_error(RuntimeError("LMDeploy finished the request with an error"))
        return EngineOutput(
            text="".join(text),
            finish_reason=last.finish_reason if last else None,
            prompt_tokens=last.input_token_len if last else 0,
            completion_tokens=last.generate_token_len if last else 0,
            ttft_s=ttft,
        )

    async def abort(self, request_id: str) -> None:
        session_id = self._sessions.get(request_id)
        if session_id is None or self._pipe is None:
            return
        session = self._pipe.async_engine.session_mgr.get(session_id, create_if_not_exists=False)
        if session is not None:
            await self._on_engine_loop(session.async_abort())

    async def close(self) -> None:
        if self._pipe is not None:
            self._pipe.close()

    def renderer(self) -> LmdeployRendererFactory | None:
        if self._pipe is None:
            raise RuntimeError("start the engine first: its renderer is built from its config")
        if self.backend != "pytorch":
            return None  # TurboMind runs the vision tower in the front end's preprocessing
        dtype = getattr(self._pipe.async_engine.vl_encoder, "mm_feature_dtype", None)
        return LmdeployRendererFactory(
            self.model, self.chat_template, self.trust_remote_code, str(dtype).removeprefix("torch.")
        )

    def healthy(self) -> bool:
        return self._pipe is not None

    def stats(self) -> dict[str, Any]:
        return {"running": len(self._sessions), "waiting": len(self._unstarted)}


class LmdeployRendererFactory:
    """Builds, in an image process, LMDeploy's own prompt processor (chat template, tokenizer,
    the model's HF image processor) from the engine's model folder and chat template, as its
    pipeline builds it: the PyTorch engine then gets the finished input (token ids and
    pixel tensors) instead of preprocessing on its front end's one thread."""

    def __init__(self, model: str, chat_template: str | None, trust: bool, feature_dtype: str) -> None:
        self.model = model
        self.chat_template = chat_template
        self.trust = trust
        self.feature_dtype = feature_dtype

    def __call__(self) -> LmdeployRenderer:
        return LmdeployRenderer(self)


class LmdeployRenderer:
    def __init__(self, spec: LmdeployRendererFactory) -> None:
        import lmdeploy.vl.engine as vl_engine
        import torch
        from lmdeploy import ChatTemplateConfig, PytorchEngineConfig, VisionConfig
        from lmdeploy.model import get_chat_template
        from lmdeploy.serve.processors import MultimodalProcessor
        from lmdeploy.tokenizer import Tokenizer

        # The engine resolved the features' dtype on its GPU. Asking again here would open a
        # CUDA context in every image process (lmdeploy.utils.is_bf16_supported), or, on a
        # machine without one, resolve another dtype than the engine's.
        dtype = getattr(torch, spec.feature_dtype, None)
        vl_engine._resolve_mm_feature_dtype = lambda *_: dtype
        encoder = vl_engine.ImageEncoder(
            spec.model, "pytorch", VisionConfig(), PytorchEngineConfig(), trust_remote_code=spec.trust
        )
        template = ChatTemplateConfig(model_name=spec.chat_template) if spec.chat_template else None
        self._processor = MultimodalProcessor(
            Tokenizer(spec.model, trust_remote_code=spec.trust),
            get_chat_template(spec.model, template, trust_remote_code=spec.trust),
            vl_encoder=encoder,
            backend="pytorch",
        )
        self._loop = asyncio.new_event_loop()  # the processor's API is async; one loop per process

    def render(self, messages: list[Message], inputs: Prepared) -> tuple[Any, int]:
        prompt = lmdeploy_messages(messages, inputs.images)
        out = self._loop.run_until_complete(self._processor.get_prompt_input(prompt, do_preprocess=True))
        return out, tensor_bytes(out.get("multimodal"))
