"""The README's thin real path, end to end: train (tfrecords) -> serve (real server, real openpi-client) -> one
ManiSkill3 episode through it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "family"), [("cogact_tiny", "CogACT"), ("flow_tiny", "FlowVLA"), ("token_vla_tiny", "TokenVLA")]
)
def test_train_serve_and_evaluate_one_episode(tmp_path: Path, model: str, family: str) -> None:
    """CogACT, and the flow-matching and token policies that plug in with one module and one YAML each, through the
    same scripts."""
    from serving import wait_for_server

    env = {**os.environ, "VLA_DATA_DIR": str(tmp_path / "data"), "TF_CPP_MIN_LOG_LEVEL": "2", "WANDB_MODE": "disabled"}
    train = subprocess.run(
        [
            sys.executable,
            "train.py",
            f"model={model}",
            "dataset=sample",
            "debug=smoke",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = train.stdout.strip().splitlines()[-1].removeprefix("checkpoint: ")

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "serve.py",
            f"ckpt={ckpt}",
            "host=127.0.0.1",
            f"port={port}",
            f"hydra.run.dir={tmp_path}/serve",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    evaluate = lambda *extra: subprocess.run(  # noqa: E731
        [
            sys.executable,
            "eval_maniskill.py",
            f"ckpt={ckpt}",
            f"server=127.0.0.1:{port}",
            "env_id=PushCube-v1",
            "num_episodes=1",
            "max_steps=8",
            'prompt="push the cube to the goal region"',
            f"hydra.run.dir={tmp_path}/eval",
            *extra,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        wait_for_server("127.0.0.1", port, timeout=180)
        evaluation = evaluate()
        horizon = 1 if family == "TokenVLA" else 16
        too_many = evaluate(f"execute_steps={horizon + 1}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    last = evaluation.stdout.strip().splitlines()[-1]
    assert last.startswith("results: ")
    results = json.loads(Path(last.removeprefix("results: ")).read_text())
    (episode,) = results["episodes"]
    assert episode["steps"] == 8 and isinstance(episode["success"], bool) and episode.get("error") is None
    assert results["config"]["server_metadata"]["model"] == family
    # by default 4 actions of each chunk, or the whole chunk of a policy that predicts fewer
    assert results["config"]["execute_steps"] == min(4, horizon)
    assert too_many.returncode != 0
    assert f"execute_steps={horizon + 1} exceeds the {horizon} actions the server replies with" in too_many.stderr
    assert list((tmp_path / "eval" / "images").glob("*.png"))
    assert server.returncode == 0
