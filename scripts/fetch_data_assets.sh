#!/usr/bin/env bash
# Offline data assets for the data stage that do not come as pip packages (registries only).
# Idempotent and atomic: each asset is extracted into a temp dir and moved into place whole.
#   third_party/fortunes/      Debian `fortunes` (quote files, records split by "\n%\n")
#   third_party/janeaustenr/   Debian `r-cran-janeaustenr` (R lazy-load data, read with `rdata`)
#   third_party/tiktoken/gpt2.tiktoken   GPT-2 (r50k_base) ranks from the openai-whisper sdist
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p third_party
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3

fetch_deb() {  # fetch_deb PACKAGE DEST
    local pkg=$1 dest=$2
    [ -d "third_party/$dest" ] && return 0
    local tmp
    tmp=$(mktemp -d)
    if ! (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1); then
        apt-get update >/dev/null 2>&1 || true
        (cd "$tmp" && apt-get download "$pkg" >/dev/null) || { echo "could not download Debian package $pkg" >&2; rm -rf "$tmp"; return 1; }
    fi
    dpkg-deb -x "$tmp"/"$pkg"_*.deb "$tmp/root"
    rm -rf "third_party/$dest.tmp"
    mv "$tmp/root" "third_party/$dest.tmp"
    mv "third_party/$dest.tmp" "third_party/$dest"
    rm -rf "$tmp"
}

fetch_deb fortunes fortunes || echo "warning: fortunes corpus unavailable; its tests will skip" >&2
fetch_deb r-cran-janeaustenr janeaustenr || echo "warning: Austen corpus unavailable; its tests will skip" >&2

if [ ! -f third_party/tiktoken/gpt2.tiktoken ]; then
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --no-binary :all: "openai-whisper==20250625" -d "$tmp"
    tar xzf "$tmp"/openai_whisper-20250625.tar.gz -C "$tmp" --wildcards '*/whisper/assets/gpt2.tiktoken'
    mkdir -p third_party/tiktoken
    mv "$tmp"/openai_whisper-20250625/whisper/assets/gpt2.tiktoken third_party/tiktoken/.gpt2.tiktoken.tmp
    mv third_party/tiktoken/.gpt2.tiktoken.tmp third_party/tiktoken/gpt2.tiktoken
    rm -rf "$tmp"
fi
