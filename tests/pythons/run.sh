#!/usr/bin/env bash
# The unit tests under every other Python that pyproject.toml's requires-python declares
# (3.11, the CI Python, runs every test). Each gets a venv of its own:
#   bash tests/pythons/run.sh build 3.12     # make .venv-py3.12 (make does it once)
#   bash tests/pythons/run.sh test 3.12      # run tests/unit there
set -euo pipefail
cd "$(dirname "$0")/../.."
action=$1
version=$2
venv=".venv-py$version"

find_python() {  # a python3 of version $1 (3.12): on PATH, else under pyenv's versions
  if command -v "python$1" >/dev/null 2>&1 && "python$1" -c "" 2>/dev/null; then
    command -v "python$1"
    return
  fi
  for dir in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$1".*; do
    if [ -x "$dir/bin/python3" ]; then echo "$dir/bin/python3"; return; fi
  done
  echo "no Python $1 here, and requires-python declares it: install it (pyenv install $1)" >&2
  return 1
}

case "$action" in
  build)
    rm -rf "$venv"
    "$(find_python "$version")" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -c requirements/dev.lock -e '.[worker,api,otel]' openai promql-parser \
      pytest pytest-asyncio pytest-timeout hypothesis pyyaml
    touch "$venv/.installed"
    ;;
  test)
    echo "== unit tests on $("$venv/bin/python" --version)"
    "$venv/bin/python" -m pytest tests/unit -q -p no:cacheprovider
    ;;
  *)
    echo "usage: $0 build|test VERSION" >&2
    exit 2
    ;;
esac
