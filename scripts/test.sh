#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite offline.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
export HF_HOME="$(mktemp -d)"
cd "$ROOT"
python -m pytest -q "$@"
