"""A Qwen2-VL / Qwen2.5-VL checkpoint folder built here (no hub is reachable).

The config holds the model's public architecture values (configs/*.json); vLLM loads it
with `load_format="dummy"` (random weights, so the text is noise: throughput and batching
are what is measured). The tokenizer is a byte-level BPE without merges plus Qwen's
special tokens, with Qwen-VL's chat template; the config's special-token ids are set to
that tokenizer's ids (the embedding keeps the real vocabulary size).

    python bench/gpu/make_model.py qwen2-vl-7b /tmp/models/qwen2-vl-7b

With `--random-weights` it also writes seeded random float32 safetensors through
transformers (needs torch): how the CPU engine tests get `tiny-qwen2-vl`, a two-layer model
whose head_dim is 64 (vLLM's CPU attention rejects smaller) and whose mrope_section sums to
head_dim / 2:

    python bench/gpu/make_model.py tiny-qwen2-vl /tmp/tiny --random-weights

A config in Mistral's own format (params.json keys: Pixtral) becomes a Mistral-format
folder: params.json and the tekken.json that Pixtral-12B-2409 ships, which the PyPI package
mistral_common carries (data/tekken_240911.json: vocabulary, [IMG] tokens, 16-pixel patches,
1024-pixel images). vLLM serves it with `tokenizer_mode=mistral` and `load_format=dummy`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content "
    "or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_vocab() -> dict[str, int]:
    """GPT-2's byte-to-unicode table: 256 symbols, one per byte."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): i for i, c in enumerate(sorted(cs, key=lambda c: bs[cs.index(c)]))}


def tokenizer_json(vocab: dict[str, int], specials: list[str]) -> dict[str, object]:
    base = len(vocab)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": base + i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def build(name: str, out: Path) -> None:
    config = json.loads((Path(__file__).parent / "configs" / f"{name}.json").read_text())
    if "vision_encoder" in config:
        return build_mistral(name, config, out)
    if config["model_type"] == "llava":
        return build_llava(name, config, out)
    if config["model_type"] == "internvl":
        return build_internvl(name, config, out)
    if config["model_type"] == "mllama":
        return build_mllama(name, config, out)
    vocab = byte_vocab()
    ids = {t: len(vocab) + i for i, t in enumerate(SPECIALS)}
    config |= {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": ids["<|endoftext|>"],
                "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                "pad_token_id": ids["<|endoftext|>"],
            }
        )
    )
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(vocab, SPECIALS)))
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "model_max_length": 32768,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "unk_token": None,
                "errors": "replace",
                "chat_template": CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
                "split_special_tokens": False,
            }
        )
    )
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    proc = {
        "min_pixels": 3136,
        "max_pixels": 1280 * 28 * 28,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor" if "2_5" in config["model_type"] else "Qwen2VLProcessor",
    }
    (out / "preprocessor_config.json").write_text(json.dumps(proc))
    print(f"{name}: {out} (image_token_id {ids['<|image_pad|>']}, eos {ids['<|im_end|>']})")


LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: {% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>\n{% else %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_llava(name: str, config: dict[str, Any], out: Path) -> None:
    """LLaVA-1.5 layout (llava-hf): CLIP vision tower, `<image>` placeholders expanded by
    LlavaProcessor, a USER:/ASSISTANT: template, CLIP's square resize and crop."""
    specials = ["<|endoftext|>", "<image>"]
    vocab = byte_vocab()
    eos, image = len(vocab), len(vocab) + 1
    config["image_token_index"] = image
    config["text_config"] |= {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    out.mkdir(parents=True, exist_ok=True)
    side = config["vision_config"]["image_size"]
    files: dict[str, object] = {
        "config.json": config,
        "generation_config.json": {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos},
        "tokenizer.json": tokenizer_json(vocab, specials),
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 32768,
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "chat_template": LLAVA_TEMPLATE,
            "clean_up_tokenization_spaces": False,
        },
        "chat_template.json": {"chat_template": LLAVA_TEMPLATE},
        "preprocessor_config.json": {
            "image_processor_type": "CLIPImageProcessor",
            "processor_class": "LlavaProcessor",
            "do_resize": True,
            "size": {"shortest_edge": side},
            "do_center_crop": True,
            "crop_size": {"height": side, "width": side},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_convert_rgb": True,
            "resample": 3,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        },
        "processor_config.json": {
            "processor_class": "LlavaProcessor",
            "image_token": "<image>",
            "patch_size": config["vision_config"]["patch_size"],
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
        },
    }
    for file, data in files.items():
        (out / file).write_text(json.dumps(data, indent=1))
    print(f"{name}: {out} (image_token_id {image}, eos {eos})")


INTERNVL_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
INTERNVL_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n"
    + INTERNVL_SYSTEM
    + "<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n{% elif content['type'] == 'video' %}<video>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_internvl(name: str, config: dict[str, Any], out: Path) -> None:
    """InternVL2.5 in transformers' own InternVL layout (as OpenGVLab's -hf checkpoints: the
    InternLM2 backbone as Llama, InternViT as InternVLVision), so no remote code is needed:
    InternVLProcessor tiles each image into 448-pixel crops (GotOcr2, up to 12 and a
    thumbnail) of 256 <IMG_CONTEXT> tokens each, between <img> and </img>; InternVL2.5's
    chat template and system prompt."""
    specials = ["</s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    vocab = byte_vocab()
    ids = {t: len(vocab) + i for i, t in enumerate(specials)}
    config["image_token_id"] = ids["<IMG_CONTEXT>"]
    config["text_config"] |= {
        "bos_token_id": ids["</s>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["</s>"],
    }
    side = config["vision_config"]["image_size"][0]
    files: dict[str, object] = {
        "config.json": config,
        "generation_config.json": {
            "eos_token_id": [ids["<|im_end|>"], ids["</s>"]],
            "pad_token_id": ids["</s>"],
        },
        "tokenizer.json": tokenizer_json(vocab, specials),
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 32768,
            "eos_token": "<|im_end|>",
            "pad_token": "</s>",
            "extra_special_tokens": {
                "start_image_token": "<img>",
                "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>",
            },
            "chat_template": INTERNVL_TEMPLATE,
            "clean_up_tokenization_spaces": False,
        },
        "chat_template.json": {"chat_template": INTERNVL_TEMPLATE},
        "preprocessor_config.json": {
            "image_processor_type": "GotOcr2ImageProcessor",
            "processor_class": "InternVLProcessor",
            "crop_to_patches": False,
            "min_patches": 1,
            "max_patches": 12,
            "size": {"height": side, "width": side},
            "do_resize": True,
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
            "do_convert_rgb": True,
        },
        "processor_config.json": {"processor_class": "InternVLProcessor", "image_seq_length": 256},
    }
    out.mkdir(parents=True, exist_ok=True)
    for file, data in files.items():
        (out / file).write_text(json.dumps(data, indent=1, ensure_ascii=False))
    print(f"{name}: {out} (image_token_id {ids['<IMG_CONTEXT>']}, eos {ids['<|im_end|>']})")


MLLAMA_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|image|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_mllama(name: str, config: dict[str, Any], out: Path) -> None:
    """Llama-3.2-Vision: an <|image|> token per image in the text, whose tiles (up to 4 of
    the vision config's image_size, by the supported aspect ratios) the text layers attend
    to through their cross-attention layers; Llama 3's header-style chat template."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
    specials += ["<|eot_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>", "<|image|>"]
    vocab = byte_vocab()
    ids = {t: len(vocab) + i for i, t in enumerate(specials)}
    config["image_token_index"] = ids["<|image|>"]
    config["text_config"] |= {
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]],
        "pad_token_id": ids["<|finetune_right_pad_id|>"],
    }
    side = config["vision_config"]["image_size"]
    files: dict[str, object] = {
        "config.json": config,
        "generation_config.json": {
            "bos_token_id": ids["<|begin_of_text|>"],
            "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]],
            "pad_token_id": ids["<|finetune_right_pad_id|>"],
        },
        "tokenizer.json": tokenizer_json(vocab, specials),
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 131072,
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "pad_token": "<|finetune_right_pad_id|>",
            "chat_template": MLLAMA_TEMPLATE,
            "clean_up_tokenization_spaces": False,
        },
        "chat_template.json": {"chat_template": MLLAMA_TEMPLATE},
        "preprocessor_config.json": {
            "image_processor_type": "MllamaImageProcessor",
            "processor_class": "MllamaProcessor",
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_pad": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "max_image_tiles": config["vision_config"]["max_num_tiles"],
            "resample": 2,
            "rescale_factor": 1 / 255,
            "size": {"height": side, "width": side},
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    for file, data in files.items():
        (out / file).write_text(json.dumps(data, indent=1))
    print(f"{name}: {out} (image_token_index {ids['<|image|>']}, eos {ids['<|eot_id|>']})")


def build_mistral(name: str, config: dict[str, Any], out: Path) -> None:
    from importlib.resources import files

    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(config, indent=2))
    (out / "tekken.json").write_bytes(
        files("mistral_common").joinpath("data/tekken_240911.json").read_bytes()
    )
    print(f"{name}: {out} (Mistral format: params.json, tekken.json)")


def random_weights(out: Path, seed: int = 0) -> None:
    if (out / "params.json").exists():  # Mistral format: vLLM's load_format=dummy instead
        return
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32)
    ours = json.loads((out / "generation_config.json").read_text())
    model.save_pretrained(out)  # rewrites config.json in transformers' own layout: same model
    (out / "generation_config.json").write_text(json.dumps(ours))
    if model.config.model_type == "llava":
        _llava_hub_layout(out / "model.safetensors")


def _llava_hub_layout(path: Path) -> None:
    """transformers 5 saves the CLIP tower as `vision_tower.*`; llava-hf checkpoints (and
    vLLM's loader) have `vision_tower.vision_model.*`, which transformers loads as well."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file(
        {
            k.replace("vision_tower.", "vision_tower.vision_model.", 1)
            if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
            else k: v
            for k, v in tensors.items()
        },
        path,
        metadata={"format": "pt"},
    )


if __name__ == "__main__":
    build(sys.argv[1], Path(sys.argv[2]))
    if "--random-weights" in sys.argv[3:]:
        random_weights(Path(sys.argv[2]))
