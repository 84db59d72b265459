#!/usr/bin/env bash
# Set up, then run the whole test suite (fast and slow tests; gpu tests skip themselves without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m pytest -m "not gpu" "$@"
