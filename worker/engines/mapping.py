"""Pure translations from vlmq's request to what engines take. No engine imports here, so
CI checks every mapping without a GPU."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from vlmq.schemas.errors import ErrorCode, VlmqError
from vlmq.schemas.job import (
    ChoiceFormat,
    ImageRef,
    JsonSchemaFormat,
    Message,
    RegexFormat,
    ResponseFormat,
    Sampling,
    TextPart,
)


def hf_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Chat messages in the form Hugging Face chat templates take: each image becomes an
    `{"type": "image"}` placeholder where it stood; the template emits the model's own image
    tokens (Qwen2-VL's <|vision_start|><|image_pad|>..., Llama-3.2-Vision's <|image|>, ...)."""
    out = []
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": [{"type": "text", "text": m.content}]})
            continue
        parts = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
                 for p in m.content]
        out.append({"role": m.role, "content": parts})
    return out


def openai_messages(messages: list[Message], image_urls: list[str]) -> list[dict[str, Any]]:
    """OpenAI chat messages; the i-th image part becomes `image_urls[i]` (a data: URL)."""
    return _with_images(messages, image_urls, lambda url: {"type": "image_url", "image_url": {"url": url}})


def _with_images(messages: list[Message], images: list[Any],
                 part: Callable[[Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages with the i-th ImageRef replaced by `part(images[i])`, text kept as is."""
    it = iter(images)
    out: list[dict[str, Any]] = []
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts = [part(next(it)) if isinstance(p, ImageRef) else {"type": "text", "text": p.text}
                 for p in m.content]
        out.append({"role": m.role, "content": parts})
    return out


def vllm_sampling_kwargs(sampling: Sampling, fmt: ResponseFormat | None) -> dict[str, Any]:
    """Keyword arguments for vllm.SamplingParams (same names by design), and the structured
    output as StructuredOutputsParams kwargs under `structured_outputs`."""
    kw: dict[str, Any] = {
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "repetition_penalty": sampling.repetition_penalty,
    }
    if sampling.top_k is not None:
        kw["top_k"] = sampling.top_k
    if sampling.seed is not None:
        kw["seed"] = sampling.seed
    if sampling.stop:
        kw["stop"] = list(sampling.stop)
    if isinstance(fmt, JsonSchemaFormat):
        kw["structured_outputs"] = {"json": fmt.schema}
    elif isinstance(fmt, RegexFormat):
        kw["structured_outputs"] = {"regex": fmt.pattern}
    elif isinstance(fmt, ChoiceFormat):
        kw["structured_outputs"] = {"choice": list(fmt.choices)}
    return kw


def hf_gen_kwargs(sampling: Sampling) -> dict[str, Any]:
    """Keyword arguments for transformers' `generate`. Greedy when temperature is 0 (and then
    no sampling knobs, which transformers would warn about); top_k 0 switches its default
    top-k of 50 off, as vLLM has none."""
    kw: dict[str, Any] = {
        "max_new_tokens": sampling.max_tokens,
        "do_sample": sampling.temperature > 0,
        "repetition_penalty": sampling.repetition_penalty,
    }
    if sampling.temperature > 0:
        kw |= {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k or 0}
    if sampling.stop:
        kw["stop_strings"] = list(sampling.stop)
    return kw


def lmdeploy_gen_kwargs(sampling: Sampling, fmt: ResponseFormat | None) -> dict[str, Any]:
    """Keyword arguments for lmdeploy.GenerationConfig. Structured output goes through its
    `response_format` (xgrammar, PyTorch engine): JSON schema and regex; a choice list is
    the regex of its alternatives."""
    kw: dict[str, Any] = {
        "max_new_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "repetition_penalty": sampling.repetition_penalty,
        "do_sample": sampling.temperature > 0,
    }
    if sampling.top_k is not None:
        kw["top_k"] = sampling.top_k
    if sampling.seed is not None:
        kw["random_seed"] = sampling.seed
    if sampling.stop:
        kw["stop_words"] = list(sampling.stop)
    if isinstance(fmt, JsonSchemaFormat):
        kw["response_format"] = {"type": "json_schema",
                                 "json_schema": {"name": "vlmq", "schema": fmt.schema}}
    elif isinstance(fmt, RegexFormat):
        kw["response_format"] = {"type": "regex_schema", "regex_schema": fmt.pattern}
    elif isinstance(fmt, ChoiceFormat):
        kw["response_format"] = {"type": "regex_schema", "regex_schema": choice_regex(fmt.choices)}
    return kw


def choice_regex(choices: list[str]) -> str:
    """A choice list for engines that only take regexes: the alternatives, escaped."""
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


_TOO_LONG = re.compile(r"(longer than the maximum model length|exceeds? (the )?max(imum)?[ _]model[ _]len"
                       r"|maximum context length|reduce the length of the input prompt"
                       r"|prompt is too long|too many tokens|session_len)", re.I)


def engine_error(exc: BaseException) -> VlmqError:
    """An engine's exception as a vlmq error with the most specific code."""
    text = f"{type(exc).__name__}: {exc}"
    if _TOO_LONG.search(str(exc)):
        return VlmqError(ErrorCode.PROMPT_TOO_LONG, text)
    if "structured" in str(exc).lower() or "grammar" in str(exc).lower():
        return VlmqError(ErrorCode.UNSUPPORTED, text)
    return VlmqError(ErrorCode.ENGINE_ERROR, text)


def lmdeploy_messages(messages: list[Message], images: list[Any]) -> list[dict[str, Any]]:
    """GPT-4V-style messages as LMDeploy takes them, with the decoded PIL images inline
    (`image_data`), in the order their ImageRefs stood."""
    return _with_images(messages, images, lambda img: {"type": "image_data", "image_data": {"data": img}})
