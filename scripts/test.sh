#!/usr/bin/env bash
# Set up, then run the whole test suite (fast and slow tests; gpu tests skip themselves without a GPU).
# The simulator tests render with SAPIEN in-process; they run in their own pytest process, because creating a
# rendering env in a process that has already loaded TensorFlow and the rest of the suite segfaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/python -m pytest -m "not gpu" --ignore=tests/test_sim.py "$@"
.venv/bin/python -m pytest -m "not gpu" tests/test_sim.py "$@"
