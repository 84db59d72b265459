#!/usr/bin/env bash
# The whole loop once, on the embedded default: set up, generate the sample RLDS dataset, finetune the tiny
# CogACT-architecture model on CPU, serve the checkpoint over WebSocket, drive one ManiSkill3 episode through it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
export TF_CPP_MIN_LOG_LEVEL=2
PORT="${PORT:-8000}"

echo "== train (dataset=sample, model=cogact_tiny, CPU)"
$PY train.py experiment=quickstart | tee /tmp/quickstart-train.log
CKPT="$(grep '^checkpoint: ' /tmp/quickstart-train.log | tail -1 | cut -d' ' -f2-)"

echo "== serve $CKPT on port $PORT"
mkdir -p outputs
$PY serve.py ckpt="$CKPT" host=127.0.0.1 port="$PORT" > outputs/quickstart-serve.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
$PY -c "from serving import wait_for_server; wait_for_server('127.0.0.1', $PORT, timeout=180)"

echo "== evaluate one ManiSkill3 episode through the server"
$PY eval_maniskill.py ckpt="$CKPT" server="127.0.0.1:$PORT" env_id=PushCube-v1 num_episodes=1 \
  prompt="push the cube to the goal region" | tee /tmp/quickstart-eval.log
RESULTS="$(grep '^results: ' /tmp/quickstart-eval.log | tail -1 | cut -d' ' -f2-)"

echo
echo "checkpoint:  $CKPT"
echo "statistics:  $CKPT/dataset_statistics.json"
echo "images:      $(dirname "$RESULTS")/images"
echo "results:     $RESULTS"
echo "server log:  outputs/quickstart-serve.log"
