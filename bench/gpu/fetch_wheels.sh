#!/usr/bin/env bash
# Download the wheels the GPU runs need into .whl/<set>/ (ignored by git), for the device's
# Python 3.12 on x86_64. Sets: vlmq (with dependencies), vllm, lmdeploy, turbomind (exact lists, --no-deps,
# from ../shared/gpu-*-wheels.txt: what was seen to serve on the lent H100).
#   bash bench/gpu/fetch_wheels.sh vlmq vllm lmdeploy
set -euo pipefail
cd "$(dirname "$0")/../.."
PLAT=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64
      --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux1_x86_64
      --platform linux_x86_64 --platform any)
PIPDL=(python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}")
# Packages the device image already has (KINDS.md); never carried.
ON_DEVICE="aiohttp|aiosignal|attrs|certifi|charset_normalizer|click|frozenlist|idna|jinja2|markupsafe|multidict|numpy|packaging|pillow|prometheus_client|propcache|python_dateutil|pyyaml|requests|rich|six|typing_extensions|urllib3|werkzeug|wrapt|yarl|markdown_it_py|mdurl|pygments|shellingham|typer|annotated_doc|protobuf|setuptools|torch|triton|transformers|tokenizers|safetensors|huggingface_hub|filelock|fsspec|psutil|regex|tqdm|sympy|networkx|mpmath|jmespath_never"
for set in "$@"; do
  dest=.whl/$set
  mkdir -p "$dest"
  case $set in
    vlmq) "${PIPDL[@]}" -d "$dest" $(grep -v '^#' bench/gpu/vlmq-wheels.txt) ;;
    *)    grep -v '^#' "bench/gpu/$set-wheels.txt" | xargs -n 20 "${PIPDL[@]}" --no-deps -d "$dest" ;;
  esac
  find "$dest" -name "*.whl" | { grep -iE "/($ON_DEVICE)-[0-9]" || true; } | xargs -r rm -f
  echo "$set: $(ls "$dest" | wc -l) wheels, $(du -sh "$dest" | cut -f1)"
done
