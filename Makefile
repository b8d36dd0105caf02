# The two commands a newcomer needs: `make demo` and `make test`. Each makes its own
# virtualenv (.venv) and installs what it needs; never a CUDA torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint typecheck unit deploy-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

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

test: lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .vlmq .pytest_cache .mypy_cache .ruff_cache
