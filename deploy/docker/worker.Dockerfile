# vlmq GPU worker. Engine by build arg:
#   docker build -f deploy/docker/worker.Dockerfile -t vlmq-worker:vllm .
#   docker build -f deploy/docker/worker.Dockerfile --build-arg ENGINE=lmdeploy \
#     --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 -t vlmq-worker:lmdeploy .
# vLLM 0.26 wheels link CUDA 13 (libcudart.so.13); LMDeploy's TurboMind links CUDA 12.8.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG ENGINE=vllm
ARG VLLM_VERSION=0.26.0
ARG LMDEPLOY_VERSION=0.18.0
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY schemas ./schemas
COPY core ./core
COPY producer ./producer
COPY worker ./worker
COPY api ./api
COPY cli ./cli
COPY deploy/__init__.py deploy/stack.py deploy/cli.py ./deploy/
RUN python3 -m venv /opt/vlmq \
    && if [ "$ENGINE" = "vllm" ]; then pin="vllm==${VLLM_VERSION}"; else pin="lmdeploy==${LMDEPLOY_VERSION}"; fi \
    && /opt/vlmq/bin/pip install --no-cache-dir "$pin" ".[worker,${ENGINE}]"

FROM ${CUDA_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home vlmq \
    && mkdir -p /models && chown vlmq /models
COPY --from=build /opt/vlmq /opt/vlmq
ENV PATH=/opt/vlmq/bin:$PATH \
    HF_HOME=/models/hf \
    PYTHONUNBUFFERED=1 \
    VLMQ_LOG_FORMAT=json \
    VLMQ_METRICS_PORT=9400 \
    VLMQ_METRICS_HOST=0.0.0.0 \
    VLMQ_DRAIN_TIMEOUT_S=60
VOLUME ["/models"]
USER 10001
EXPOSE 9400
# The worker drains on SIGTERM (stop intake, finish or hand back, commit). Give it a stop
# timeout longer than VLMQ_DRAIN_TIMEOUT_S: compose stop_grace_period, k8s
# terminationGracePeriodSeconds.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9400/healthz', timeout=4)"]
ENTRYPOINT ["vlmq", "worker"]
