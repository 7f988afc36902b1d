#!/usr/bin/env bash
# A real browser for the chat-page test: Debian's chromium and its WebDriver (idempotent).
set -euo pipefail
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
            || echo "fetch_serve_assets: could not install chromium; the browser test will skip" >&2
    else
        echo "fetch_serve_assets: chromium/chromedriver missing and not root; the browser test will skip" >&2
    fi
fi
