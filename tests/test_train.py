from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent


def _run_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLA_DATA_DIR": str(tmp_path / "data"), "TF_CPP_MIN_LOG_LEVEL": "2", "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_smoke_run_writes_a_self_describing_checkpoint(tmp_path: Path) -> None:
    result = _run_train(tmp_path, "model=cogact_tiny", "dataset=sample", "debug=smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("checkpoint: ")
    ckpt = Path(last.split(" ", 1)[1])
    assert {"config.yaml", "dataset_statistics.json", "model.safetensors", "meta.json"} <= {
        p.name for p in ckpt.iterdir()
    }
    stats = json.loads((ckpt / "dataset_statistics.json").read_text())
    assert set(stats["sample"]) >= {"action", "proprio", "num_transitions", "num_trajectories"}
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 6
    assert (tmp_path / "data" / "rlds" / "sample" / "1.0.0" / "dataset_info.json").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any("val/loss" in json.loads(line) for line in lines)


@pytest.mark.slow
def test_multirun_runs_one_job_per_value(tmp_path: Path) -> None:
    result = _run_train(
        tmp_path, "-m", "debug=smoke", "max_steps=2", "save_every=2", "val_every=2", "optimizer.lr=1e-4,3e-4"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = [line.split(" ", 1)[1] for line in result.stdout.splitlines() if line.startswith("checkpoint: ")]
    assert len(checkpoints) == 2 and len(set(checkpoints)) == 2
    lrs = sorted(OmegaConf.load(Path(c, "config.yaml")).optimizer.lr for c in checkpoints)
    assert lrs == [1e-4, 3e-4]
