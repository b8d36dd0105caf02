"""transformers on the CPU (or one GPU): slow but real, for the demo and machines without a GPU.

transformers has no continuous batching, so this engine micro-batches: the requests waiting
when the model frees up (same sampling settings, up to `max_batch_size`) run as one padded
`generate` in a thread of their own, which keeps the event loop serving Kafka and Redis.
Structured output goes through xgrammar, one grammar per row. Options: `max_batch_size`,
`dtype`, `device`, `threads` (torch's intra-op threads), `max_model_len`, `trust_remote_code`,
`ignore_eos` (benchmarks only).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vlmq.schemas.errors import ErrorCode, VlmqError
from vlmq.schemas.job import ResponseFormat
from vlmq.worker.embeds import EmbedSpec
from vlmq.worker.engines.base import EngineOutput, EngineRequest
from vlmq.worker.engines.mapping import engine_error, grammar, hf_gen_kwargs, hf_messages, vision_token_ids


@dataclass(eq=False)
class _Pending:
    request: EngineRequest
    future: asyncio.Future[EngineOutput]
    key: str = ""  # requests batch together only with the same generate() settings
    prompt: str = ""
    t0: float = field(default_factory=time.perf_counter)


class HfEngine:
    name = "hf"
    embeds: EmbedSpec | None = None
    takes_video = True

    def __init__(
        self,
        model: str,
        *,
        max_batch_size: int = 8,
        dtype: str = "float32",
        device: str = "cpu",
        threads: int | None = None,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        image_factor: int = 28,
        ignore_eos: bool = False,
    ) -> None:
        self.model = model
        self.ignore_eos = ignore_eos  # benchmarks with random weights: every answer max_tokens long
        self.max_batch_size = max_batch_size
        self.dtype, self.device, self.threads = dtype, device, threads
        self.max_model_len = max_model_len
        self.trust_remote_code = trust_remote_code
        self.image_factor = image_factor
        self._model: Any = None
        self._proc: Any = None
        self._vision_tokens: set[int] = set()
        self._grammars: Any = None
        self._waiting: list[_Pending] = []
        self._wake = asyncio.Event()
        self._running: dict[str, _Pending] = {}
        self._aborted: set[str] = set()
        self._loop_task: asyncio.Task[None] | None = None
        # One thread of its own: generate() holds it for seconds, and must not take a slot
        # from the image decoding pool.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vlmq-hf")

    async def start(self) -> None:
        if self._model is None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._load)
            self._loop_task = asyncio.create_task(self._serve())

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if self.threads:
            torch.set_num_threads(self.threads)
        trust = self.trust_remote_code
        self._proc = AutoProcessor.from_pretrained(self.model, trust_remote_code=trust)
        # A processor without a video processor (LLaVA-1.5) would drop a video unseen.
        self.takes_video = getattr(self._proc, "video_processor", None) is not None
        self._proc.tokenizer.padding_side = "left"  # generate() appends on the right
        self._model = (
            AutoModelForImageTextToText.from_pretrained(
                self.model, dtype=getattr(torch, self.dtype), trust_remote_code=trust
            )
            .to(self.device)
            .eval()
        )
        text = self._model.config.get_text_config()
        self.max_model_len = self.max_model_len or int(text.max_position_embeddings)
        self._vision_tokens = vision_token_ids(self._model.config)

    async def generate(self, request: EngineRequest) -> EngineOutput:
        item = _Pending(request, asyncio.get_running_loop().create_future())
        item.prompt = str(
            self._proc.apply_chat_template(
                hf_messages(request.messages), tokenize=False, add_generation_prompt=True
            )
        )
        item.key = json.dumps(
            hf_gen_kwargs(request.sampling) | {"seed": request.sampling.seed}, sort_keys=True
        )
        self._waiting.append(item)
        self._wake.set()
        return await item.future

    async def abort(self, request_id: str) -> None:
        for item in self._waiting:
            if item.request.request_id == request_id:
                self._waiting.remove(item)
                item.future.cancel()
                return
        if request_id in self._running:
            self._aborted.add(request_id)  # its row stops at the next token

    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while batch := self._take_batch():
                self._running = {p.request.request_id: p for p in batch}
                outputs: list[EngineOutput | VlmqError]
                try:
                    outputs = await asyncio.get_running_loop().run_in_executor(self._thread, self._run, batch)
                except Exception as exc:  # the whole batch failed: each job says why
                    outputs = [exc if isinstance(exc, VlmqError) else engine_error(exc)] * len(batch)
                finally:
                    self._running, self._aborted = {}, set()
                for item, out in zip(batch, outputs, strict=True):
                    if item.future.done():
                        continue
                    if isinstance(out, BaseException):
                        item.future.set_exception(out)
                    else:
                        item.future.set_result(out)

    def _take_batch(self) -> list[_Pending]:
        self._waiting = [p for p in self._waiting if not p.future.done()]  # cancelled while waiting
        if not self._waiting:
            return []
        key = self._waiting[0].key
        batch = [p for p in self._waiting if p.key == key][: self.max_batch_size]
        self._waiting = [p for p in self._waiting if p not in batch]
        return batch

    def _run(self, batch: list[_Pending]) -> list[EngineOutput | VlmqError]:
        """One padded generate() for the batch; rows whose prompt is too long fail alone."""
        import torch

        inputs = self._inputs(batch)
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        limit = int(self.max_model_len or 0)
        max_new = batch[0].request.sampling.max_tokens
        too_long = [n + max_new > limit for n in lengths]
        if any(too_long):
            return self._without_too_long(batch, too_long, lengths, limit)
        kw = hf_gen_kwargs(batch[0].request.sampling)
        if self.ignore_eos:
            kw["min_new_tokens"] = kw["max_new_tokens"]
        seed = batch[0].request.sampling.seed
        if seed is not None:
            torch.manual_seed(seed)
        stop = _RowStopper([p.request.request_id for p in batch], self._aborted)
        grammar = self._grammar([p.request.response_format for p in batch])
        with torch.inference_mode():
            out = self._model.generate(
                **inputs.to(self.device),
                **kw,
                stopping_criteria=[stop],
                tokenizer=self._proc.tokenizer,
                logits_processor=[grammar] if grammar else None,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        return [
            self._output(p, row, n, inputs["input_ids"][i], stop.first_token_at)
            for i, (p, row, n) in enumerate(zip(batch, new, lengths, strict=True))
        ]

    def _inputs(self, batch: list[_Pending]) -> Any:
        # Per prompt, nested: processors that pair images with their prompt's image tokens
        # (Llama-3.2-Vision's) need to know whose they are; the others flatten the list.
        images = [list(p.request.images) for p in batch] if any(p.request.images for p in batch) else None
        videos = [v for p in batch for v in p.request.videos]
        kw: dict[str, Any] = {}
        if videos:  # sampled already: the processor must not sample again
            kw = {
                "videos": [v.frames for v in videos],
                "video_metadata": [v.metadata() for v in videos],
                "do_sample_frames": False,
            }
        return self._proc(
            text=[p.prompt for p in batch], images=images, padding=True, return_tensors="pt", **kw
        )

    def _without_too_long(
        self, batch: list[_Pending], too_long: list[bool], lengths: list[int], limit: int
    ) -> list[EngineOutput | VlmqError]:
        ok = [p for p, bad in zip(batch, too_long, strict=True) if not bad]
        done = iter(self._run(ok) if ok else [])
        return [
            VlmqError(
                ErrorCode.PROMPT_TOO_LONG,
                f"prompt of {n} tokens + max_tokens {p.request.sampling.max_tokens} "
                f"exceeds max_model_len {limit}",
            )
            if bad
            else next(done)
            for p, bad, n in zip(batch, too_long, lengths, strict=True)
        ]

    def _output(
        self, item: _Pending, row: Any, prompt_tokens: int, prompt_ids: Any, first_token_at: float | None
    ) -> EngineOutput:
        tok = self._proc.tokenizer
        ends = set(_as_list(self._model.generation_config.eos_token_id)) | {tok.pad_token_id}
        ids = row.tolist()
        cut = next((i for i, t in enumerate(ids) if t in ends), None)
        finish = "stop" if cut is not None else "length"
        if item.request.request_id in self._aborted:
            finish = "abort"
        text = tok.decode(ids[:cut], skip_special_tokens=True)
        for s in item.request.sampling.stop or []:
            if s in text:  # vLLM leaves the stop string out; so do we
                text, finish = text[: text.index(s)], "stop"
        return EngineOutput(
            text=text,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(ids[:cut]) + (cut is not None),
            image_tokens=sum(int((prompt_ids == t).sum()) for t in self._vision_tokens),
            ttft_s=first_token_at - item.t0 if first_token_at else None,
        )

    def _grammar(self, formats: list[ResponseFormat | None]) -> _GrammarRows | None:
        if not any(formats):
            return None
        if self._grammars is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(
                self._proc.tokenizer, vocab_size=self._model.config.get_text_config().vocab_size
            )
            self._grammars = xgr.GrammarCompiler(info)
        return _GrammarRows([_compile(self._grammars, f) if f else None for f in formats])

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for item in self._waiting:
            item.future.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)

    def renderer(self) -> None:
        return None  # takes decoded images

    def healthy(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def stats(self) -> dict[str, Any]:
        return {"running": len(self._running) + len(self._waiting), "waiting": len(self._waiting)}


def _as_list(value: Any) -> list[int]:
    return list(value) if isinstance(value, list | tuple) else [value] if value is not None else []


def _compile(compiler: Any, fmt: ResponseFormat) -> Any:
    rule = grammar(fmt)
    if rule is None:
        raise VlmqError(ErrorCode.UNSUPPORTED, f"response format {type(fmt).__name__} is not supported")
    kind, spec = rule
    if kind == "json":  # compact: random or small models otherwise fill max_tokens with blanks
        return compiler.compile_json_schema(json.dumps(spec), any_whitespace=False)
    return compiler.compile_regex(spec)


class _RowStopper:
    """A transformers StoppingCriteria per row: stops aborted requests mid-batch and notes
    when the first token came (time to first token for the whole batch)."""

    def __init__(self, request_ids: list[str], aborted: set[str]) -> None:
        self.request_ids, self.aborted = request_ids, aborted
        self.first_token_at: float | None = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        return torch.tensor([r in self.aborted for r in self.request_ids], device=input_ids.device)


class _GrammarRows:
    """A logits processor that masks each constrained row by its own xgrammar matcher and
    leaves free rows alone (xgrammar's own hf helper wants a grammar on every row)."""

    def __init__(self, grammars: list[Any]) -> None:
        import xgrammar as xgr

        self.rows = [i for i, g in enumerate(grammars) if g is not None]
        self.matchers = {i: xgr.GrammarMatcher(grammars[i]) for i in self.rows}
        vocab = grammars[self.rows[0]].tokenizer_info.vocab_size
        self.mask = xgr.allocate_token_bitmask(len(grammars), vocab)
        self.started = False

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import xgrammar as xgr

        live = []
        for i in self.rows:
            m = self.matchers[i]
            if self.started and not m.is_terminated():
                m.accept_token(int(input_ids[i, -1]))
            if not m.is_terminated():
                m.fill_next_token_bitmask(self.mask, i)
                live.append(i)
        self.started = True
        if live:
            xgr.apply_token_bitmask_inplace(scores, self.mask.to(scores.device), indices=live)
        return scores
