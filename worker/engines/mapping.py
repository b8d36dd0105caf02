"""Every translation between vlmq and an engine: messages, sampling, structured output,
whole request bodies, and engine errors back to vlmq's codes. Pure functions, no engine
imports, so CI checks every mapping without a GPU."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

from vlmq.schemas.errors import ErrorCode, VlmqError
from vlmq.schemas.job import (
    ChoiceFormat,
    JsonSchemaFormat,
    Message,
    RegexFormat,
    ResponseFormat,
    Sampling,
    TextPart,
)
from vlmq.worker.engines.base import EngineRequest

# Image embeddings stand where their image would: the template's image placeholder.
_PLACEHOLDER = {"image": "image", "image_embeds": "image", "video": "video"}


def hf_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Chat messages in the form Hugging Face chat templates take: each image (video) becomes
    an `{"type": "image"}` (`{"type": "video"}`) placeholder where it stood; the template emits
    the model's own tokens (Qwen2-VL's <|vision_start|><|image_pad|>..., Llama-3.2-Vision's
    <|image|>, ...)."""
    out = []
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": [{"type": "text", "text": m.content}]})
            continue
        parts = [
            {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": _PLACEHOLDER[p.kind]}
            for p in m.content
        ]
        out.append({"role": m.role, "content": parts})
    return out


def openai_messages(
    messages: list[Message], image_urls: list[str], video_urls: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """OpenAI chat messages; the i-th image (video) part becomes `image_urls[i]`
    (`video_urls[i]`), data: URLs; videos as vLLM's `video_url` parts."""
    return _with_media(
        messages,
        image_urls,
        lambda url: {"type": "image_url", "image_url": {"url": url}},
        video_urls,
        lambda url: {"type": "video_url", "video_url": {"url": url}},
    )


def _with_media(
    messages: list[Message],
    images: Sequence[Any],
    part: Callable[[Any], dict[str, Any]],
    videos: Sequence[Any] = (),
    video_part: Callable[[Any], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Chat messages with the i-th ImageRef replaced by `part(images[i])` (and the i-th
    VideoRef by `video_part(videos[i])`), text kept as is."""
    its = {
        "image": (iter(images), part),
        "video": (iter(videos), video_part),
        "image_embeds": (iter(()), None),
    }
    out: list[dict[str, Any]] = []
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts = []
        for p in m.content:
            if isinstance(p, TextPart):
                parts.append({"type": "text", "text": p.text})
                continue
            items, make = its[p.kind]
            if make is None:
                raise VlmqError(ErrorCode.UNSUPPORTED_INPUT, f"this engine takes no {p.kind} input")
            parts.append(make(next(items)))
        out.append({"role": m.role, "content": parts})
    return out


def vision_token_ids(config: Any) -> set[int]:
    """The token ids a model's prompt holds an image's (a video's) features in, from its
    HF config: what `image_tokens` counts."""
    ids = (getattr(config, name, None) for name in ("image_token_id", "video_token_id"))
    return {t for t in ids if t is not None}


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
    if (structured := structured_outputs(fmt)) is not None:
        kw["structured_outputs"] = structured
    return kw


def structured_outputs(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    """vLLM's StructuredOutputsParams keywords for a response format; None for free text."""
    if isinstance(fmt, JsonSchemaFormat):
        return {"json": fmt.schema}
    if isinstance(fmt, RegexFormat):
        return {"regex": fmt.pattern}
    if isinstance(fmt, ChoiceFormat):
        return {"choice": list(fmt.choices)}
    return None


def grammar(fmt: ResponseFormat | None) -> tuple[Literal["json", "regex"], Any] | None:
    """For engines that take only a JSON schema or a regex (xgrammar, LMDeploy): ("json",
    schema) or ("regex", pattern), a choice list being the regex of its alternatives."""
    spec = structured_outputs(fmt)
    if spec is None:
        return None
    if "json" in spec:
        return "json", spec["json"]
    if "regex" in spec:
        return "regex", spec["regex"]
    return "regex", choice_regex(spec["choice"])


def openai_body(
    request: EngineRequest,
    image_urls: list[str],
    model: str,
    video_urls: Sequence[str] = (),
    structured: str = "vllm",
) -> dict[str, Any]:
    """A `/v1/chat/completions` body; images (videos) as the given (data:) URLs. JSON goes as
    OpenAI's `response_format`; choice and regex as vLLM's `structured_outputs` extension, or
    for llama.cpp servers (`structured="llama.cpp"`: llama-server, llama-box) a choice as a
    GBNF `grammar` (they have no regex)."""
    s = request.sampling
    body: dict[str, Any] = {
        "model": model,
        "messages": openai_messages(request.messages, image_urls, video_urls),
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
    }
    if s.seed is not None:
        body["seed"] = s.seed
    if s.stop:
        body["stop"] = list(s.stop)
    if s.top_k is not None:
        body["top_k"] = s.top_k
    if s.repetition_penalty != 1.0:
        body["repetition_penalty"] = s.repetition_penalty
    fmt = request.response_format
    if isinstance(fmt, JsonSchemaFormat):
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "vlmq", "schema": fmt.schema},
        }
    elif structured == "llama.cpp" and isinstance(fmt, ChoiceFormat):
        body["grammar"] = gbnf_choice(fmt.choices)
    elif structured == "llama.cpp" and isinstance(fmt, RegexFormat):
        msg = "llama.cpp servers take no regex output (use a choice or JSON)"
        raise VlmqError(ErrorCode.UNSUPPORTED_INPUT, msg)
    elif (spec := structured_outputs(fmt)) is not None:
        body["structured_outputs"] = spec
    return body


_GBNF_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def gbnf_choice(choices: Sequence[str]) -> str:
    """A llama.cpp (GBNF) grammar whose only sentences are the choices, each a quoted literal."""

    def literal(text: str) -> str:
        return '"' + "".join(_GBNF_ESCAPES.get(c, c if c >= " " else f"\\x{ord(c):02x}") for c in text) + '"'

    return "root ::= " + " | ".join(literal(c) for c in choices)


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
    rule = grammar(fmt)
    if rule is not None and rule[0] == "json":
        kw["response_format"] = {"type": "json_schema", "json_schema": {"name": "vlmq", "schema": rule[1]}}
    elif rule is not None:
        kw["response_format"] = {"type": "regex_schema", "regex_schema": rule[1]}
    return kw


def choice_regex(choices: list[str]) -> str:
    """A choice list for engines that only take regexes: the alternatives, escaped."""
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


_TOO_LONG = re.compile(
    r"(longer than the maximum model length|exceeds? (the )?max(imum)?[ _]model[ _]len"
    r"|maximum context length|reduce the length of the input prompt|max_model_len"
    r"|(prompt|input) is too long|too many tokens|session_len)",
    re.I,
)


# vLLM: "At most 0 video(s) may be provided in one prompt" (a model without video input).
_NO_VIDEO = re.compile(r"(at most 0 video|(does not|doesn't) support video|video.{0,40}not supported)", re.I)


def error_code(message: str) -> ErrorCode:
    """The most specific code for an engine's error text (an exception's or a server's)."""
    if _TOO_LONG.search(message):
        return ErrorCode.PROMPT_TOO_LONG
    if _NO_VIDEO.search(message):
        return ErrorCode.UNSUPPORTED_INPUT
    lowered = message.lower()
    if "structured" in lowered or "grammar" in lowered:
        return ErrorCode.UNSUPPORTED
    return ErrorCode.ENGINE_ERROR


def engine_error(exc: BaseException) -> VlmqError:
    """An engine's exception as a vlmq error with the most specific code. A wrapper that
    says nothing itself (vLLM's EngineGenerateError) is shown with what it wraps."""
    text = str(exc) or str(exc.__cause__ or exc.__context__ or "")
    return VlmqError(error_code(text), f"{type(exc).__name__}: {text}"[:1000])


def http_error(status: int, message: str) -> VlmqError:
    """An OpenAI-compatible server's 4xx answer as a vlmq error."""
    code = error_code(message)
    lowered = message.lower()
    if code is ErrorCode.ENGINE_ERROR and (status == 404 or ("model" in lowered and "not found" in lowered)):
        code = ErrorCode.UNKNOWN_MODEL
    return VlmqError(code, message if code is not ErrorCode.ENGINE_ERROR else f"HTTP {status}: {message}")


def lmdeploy_messages(messages: list[Message], images: list[Any]) -> list[dict[str, Any]]:
    """GPT-4V-style messages as LMDeploy takes them, with the decoded PIL images inline
    (`image_data`), in the order their ImageRefs stood."""
    return _with_media(messages, images, lambda img: {"type": "image_data", "image_data": {"data": img}})
