#!/usr/bin/env bash
# Test-only assets that come from package registries (downloaded, never built or imported).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p third_party

# llama.cpp's tokenizer test vectors (ggml-vocab-*.gguf + .inp/.out) from the llama-cpp-python sdist.
if [ ! -d third_party/llama-vocab ]; then
    tmp=$(mktemp -d)
    .venv/bin/python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d "$tmp"
    tar xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp" --wildcards '*/models/ggml-vocab-*'
    mkdir -p third_party/llama-vocab.tmp
    mv "$tmp"/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-* third_party/llama-vocab.tmp/
    mv third_party/llama-vocab.tmp third_party/llama-vocab
    rm -rf "$tmp"
fi
