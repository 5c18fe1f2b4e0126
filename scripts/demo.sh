#!/usr/bin/env bash
# Main job: representative optimizer modes (MODES=all for every registered one) on the offline GLUE default (MiniLM-L6 from PyPI, shipped SST-2 subset),
# side by side: dev accuracy, optimizer-state bytes, step-time ratio to AdamW, peak memory; table + PNG.
# About 10 minutes on 2 CPU cores (5 modes x 100 steps). Scale up with e.g. `STEPS=300 EVAL=872 scripts/demo.sh` or pass key=value overrides:
#   scripts/demo.sh task=mrpc max_seq_length=128
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"
hf-lowrank env
hf-lowrank compare recipes/configs/glue/minilm_galore.yaml \
    --modes "${MODES:-adamw,galore,galore_dct,frugal,lora}" --results-dir "${RESULTS:-results/demo}" \
    max_steps="${STEPS:-100}" max_eval_samples="${EVAL:-400}" logging_steps=10 "$@"
