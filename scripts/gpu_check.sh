#!/usr/bin/env bash
# The GPU check (under 5 minutes on one GPU; run it wherever a CUDA device is available):
#   1. every device-marked test on CUDA as well as CPU (device placement, dtypes, every projected mode stepping,
#      Q-GaLore, WeLore / CUBER device paths), plus the resume and mode tests with CUDA tensors;
#   2. step time, peak memory and host syncs of one training step per mode on a LLaMA-1B shape (bf16, batch
#      1 x 256; torch AdamW fused and bitsandbytes AdamW8bit as baselines), with the fake-tensor memory estimate
#      (benchmarks/training_memory.py) beside the measured peak for two rows, written to
#      benchmarks/results/device_step_cuda.{md,png}.
# Uses the python on PATH (a CUDA build of torch==2.13.0 with the project installed: pip install -e ".[dev]").
set -euo pipefail
cd "$(dirname "$0")/.."
python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA device visible")'
python -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
HF_HUB_OFFLINE=1 python -m pytest -q -m device tests/
HF_HUB_OFFLINE=1 python benchmarks/device_step.py --device cuda --estimate "torch AdamW" galore_8bit+layerwise "$@"
