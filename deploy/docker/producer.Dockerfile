# vlmq producer SDK, CLI and API server (vlmq api serve), without torch, vLLM or Pillow.
#   docker build -f deploy/docker/producer.Dockerfile -t vlmq:cli .
FROM python:3.12.8-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY core ./core
COPY producer ./producer
COPY worker ./worker
COPY api ./api
COPY cli ./cli
COPY deploy/__init__.py deploy/stack.py deploy/cli.py ./deploy/
RUN python -m venv /opt/vlmq && /opt/vlmq/bin/pip install --no-cache-dir '.[api]'

FROM python:3.12.8-slim-bookworm
RUN useradd --system --uid 10001 --create-home vlmq
COPY --from=build /opt/vlmq /opt/vlmq
ENV PATH=/opt/vlmq/bin:$PATH PYTHONUNBUFFERED=1
USER 10001
HEALTHCHECK NONE
ENTRYPOINT ["vlmq"]
CMD ["--help"]
