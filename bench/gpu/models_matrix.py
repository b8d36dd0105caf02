"""The model matrix: one row per model family of the seeds and engine, from the per-family
result files of `bench/gpu/models.sh` (bench_e2e.py: ceiling and vlmq on the same photos in
one run), and the families that did not run with their blockers (the evidence is named in
each row). Writes bench/results/gpu-models-<gpu>.json.

    python bench/gpu/models_matrix.py --gpu h200 --gpu-name "NVIDIA H200"
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"

# The seeds' families: (family, engine, the seed's flags as vlmq takes them, note).
RAN = [
    ("qwen2-vl-7b", "vllm", [], "Qwen2-VL-7B-Instruct's public config"),
    (
        "qwen2.5-vl-3b",
        "vllm",
        ['-e mm_processor_kwargs={"min_pixels": 200704, "max_pixels": 1003520}'],
        "the seed's min_pixels 256*28*28 and max_pixels 1280*28*28",
    ),
    (
        "pixtral-12b",
        "vllm",
        ["--tokenizer-mode mistral", "--limit-mm-per-prompt image=4", "-e config_format=mistral"],
        "Mistral format (params.json + tekken.json from mistral_common); vLLM 0.26 needs "
        "transformers <= 5.16.1 for its Pixtral module (PixtralRotaryEmbedding)",
    ),
    (
        "internvl2.5-8b",
        "vllm",
        [],
        "transformers' own InternVL layout (InternLM2 as Llama), not the remote-code "
        "InternVLChatModel layout: no hub here for its Python files",
    ),
    (
        "qwen2-vl-7b",
        "lmdeploy",
        ["-e backend=pytorch", "-e session_len=8192", "-e max_batch_size=128"],
        "LMDeploy's PyTorch engine; VisionConfig.max_batch_size 8 (vlmq's default)",
    ),
    (
        "internvl2.5-8b",
        "lmdeploy",
        ["-e backend=pytorch", "-e session_len=8192", "-e max_batch_size=128"],
        "LMDeploy's PyTorch engine (its internvl3_hf model); the same folder as for vLLM with "
        "random bf16 weights made on the GPU; chat template from the folder (LMDeploy's 'hf')",
    ),
    (
        "qwen2.5-vl-3b",
        "lmdeploy-turbomind",
        ["-e backend=turbomind", "-e session_len=8192", "-e max_batch_size=128"],
        "TurboMind (CUDA 12) on the CUDA 13 image: the CUDA 12 runtime and cuBLAS carried as "
        "wheels (nvidia-cuda-runtime-cu12, nvidia-cublas-cu12 12.8) on LD_LIBRARY_PATH, NCCL the "
        "image's; bench/gpu/turbomind.sh",
    ),
    (
        "qwen2.5-vl-3b",
        "lmdeploy-pytorch",
        ["-e backend=pytorch", "-e session_len=8192", "-e max_batch_size=128"],
        "the PyTorch engine on the same model, photos and run as the TurboMind row",
    ),
]
BLOCKED = [
    (
        "llama-3.2-11b-vision",
        "vllm",
        ["--enforce-eager", "--max-num-seqs 16", "--max-model-len 8192"],
        "vLLM 0.26 refuses the architecture: 'Model architecture MllamaForConditionalGeneration "
        "was supported in vLLM until v0.10.2, and is not supported anymore' "
        "(vllm/model_executor/models/registry.py, _PREVIOUSLY_SUPPORTED_MODELS). vLLM <= 0.10.2 "
        "pins torch 2.8 (CUDA 12): it cannot share the device image's torch 2.11 + CUDA 13. "
        "Unblock: vLLM <= 0.10.2 with its own torch and CUDA 12 libraries carried (~3 GB), "
        "or the hf engine (transformers' Mllama)",
    ),
    (
        "llama-3.2-11b-vision",
        "lmdeploy",
        [],
        "LMDeploy 0.18 has no Mllama model (lmdeploy/pytorch/models/module_map.py)",
    ),
    (
        "phi-3.5-vision",
        "vllm",
        ["--trust-remote-code", "--max-model-len 4096"],
        "Phi-3.5-vision's config, processor and image processor are remote code in the model's "
        "hub repository (configuration_phi3_v.py, processing_phi3_v.py, "
        "image_processing_phi3_v.py); vLLM 0.26's phi3v.py calls that processor "
        "(img_tokens, calc_num_image_tokens_from_image_size) and transformers has no Phi3V. "
        "No hub is reachable here. Unblock: a machine with the hub, or those files",
    ),
]


def ok_row(family: str, engine: str, flags: list[str], note: str, gpu: str) -> dict[str, Any]:
    file = f"gpu-models-{family}-{engine}-{gpu}.json"
    run = json.loads((RESULTS / file).read_text())
    row = run["rows"][0]
    features = {k: v["state"] for k, v in run.get("feature_jobs", {}).items()}
    return {
        "family": family,
        "engine": engine,
        "status": "ok",
        "images_per_s": row["vlmq"]["images_per_s"],
        "ceiling_images_per_s": row["ceiling"]["images_per_s"],
        "ratio": row["ratio"],
        "gpu_util_pct": row["vlmq"]["gpu_util_mean_pct"],
        "prompt_tokens": row["vlmq"]["mean_prompt_tokens"],
        "engine_start_s": run["settings"]["engine_start_s"],
        "feature_jobs": features,
        "flags": flags,
        "engine_options": run["settings"]["engine_options"],
        "note": note,
        "result_file": f"bench/results/{file}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--gpu-name", default="NVIDIA H200")
    args = ap.parse_args()
    rows = [ok_row(*r, gpu=args.gpu) for r in RAN]
    rows += [
        {"family": f, "engine": e, "status": "blocked", "images_per_s": None, "flags": fl, "blocker": why}
        for f, e, fl, why in BLOCKED
    ]
    worst = min((r for r in rows if r["status"] == "ok"), key=lambda r: r["ratio"])
    first = json.loads((RESULTS / rows[0]["result_file"].split("/")[-1]).read_text())
    out = {
        "name": "gpu-models",
        "unit": "images/s",
        "baseline": worst["ceiling_images_per_s"],
        "value": worst["images_per_s"],
        "ratio": worst["ratio"],
        "hardware": f"{args.gpu_name}, {first['hardware']}",
        "settings": {
            "photos": "300 JPEG photos of 1024x768 per row (vlmq.worker.samples.photo), one per job",
            "max_tokens": 64,
            "weights": "random, real-size public configs (vLLM load_format=dummy; LMDeploy bf16 files)",
            "baseline": "the same engine driven directly with the photos decoded and resized in memory",
            "value": "vlmq: S3 (moto) -> Kafka (tansu) -> worker -> Redis, from first submit to last result",
            "vllm": "0.26.0, enforce_eager (four cold starts in one device budget), max_num_seqs 128",
            "lmdeploy": "0.18.0, the PyTorch engine unless a row says TurboMind, cache_max_entry_count 0.6",
            "feature_jobs": "multi-image, choice and JSON-schema jobs through the same worker",
            "top_level": "baseline/value/ratio are the row with the lowest vlmq / ceiling",
        },
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "rows": rows,
    }
    path = RESULTS / f"gpu-models-{args.gpu}.json"
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    for r in rows:
        print(
            f"{r['family']:22} {r['engine']:20} {r['status']:8} {r.get('images_per_s')} {r.get('ratio', '')}"
        )


if __name__ == "__main__":
    main()
