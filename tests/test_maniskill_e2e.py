"""A miniature of the end-to-end recipe: ManiSkill3 motion-planning demos -> replay to pd_ee_delta_pose RGB -> RLDS
-> train -> serve -> evaluate (benchmarks/maniskill_e2e.py --mini)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from sim.maniskill import STATE_DIM

REPO = Path(__file__).resolve().parent.parent


def _run_module(module: str, *args: str) -> str:
    """`python -m module args...` from the repo root; its stdout, or the test fails with its stderr's tail."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", module, *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_recipe_miniature_walks_every_stage(tmp_path: Path) -> None:
    # A camera size of its own: replayed from a copy of the recording whose env kwargs set the cameras' size.
    recipe = ["--mini", "--camera-size", "96", "--work-dir", str(tmp_path)]
    _run_module("benchmarks.maniskill_e2e", *recipe)
    (dataset,) = (tmp_path / "data_96px" / "rlds" / "maniskill_e2e_pushcube").iterdir()
    info = json.loads((dataset / "dataset_info.json").read_text())
    assert int(info["splits"][0]["shardLengths"][0]) == 2  # two demonstrations became two RLDS episodes
    (results,) = (tmp_path / "eval").glob("*/PushCube-v1/results.json")
    record = json.loads(results.read_text())
    assert record["num_episodes"] == 1 and record["config"]["prompt"]
    assert record["config"]["image_size"] == 96, "rendered at the demonstrations' size, which the checkpoint records"
    (replayed,) = (tmp_path / "demos_96px" / "PushCube-v1").glob("PushCube-v1.rgb.pd_ee_delta_pose.*.h5")
    with h5py.File(replayed) as demos:
        assert demos["traj_0/obs/sensor_data/base_camera/rgb"].shape[1:] == (96, 96, 3)
    (stats,) = (tmp_path / "runs").glob("*/dataset_statistics.json")
    entry = json.loads(stats.read_text())["maniskill_e2e"]
    assert entry["num_trajectories"] == 2 and entry["action"]["mask"] == [True] * 6 + [False]
    assert len(entry["proprio"]["q01"]) == STATE_DIM, "the Panda state (tcp pose, fingers, goal) is recorded"
    assert entry["proprio"]["max"][8:] == [0] * 6, "PushCube-v1 shows its goal in the image: no goal in the state"
    # The auxiliary target: cube and goal region positions from the recorded env states (goal region on the table).
    assert len(entry["aux"]["q01"]) == 6 and entry["aux"]["max"][5] == entry["aux"]["min"][5]

    # The checkpoint evaluated again, with a sampling setting of its own: no stage but the evaluation runs.
    (checkpoint,) = (tmp_path / "runs").glob("*/checkpoints/step_*")
    _run_module(
        "benchmarks.maniskill_e2e", *recipe, "--ckpt", str(checkpoint), "--eval-override", "sampling.cfg_scale=1"
    )
    assert len(list((tmp_path / "runs").iterdir())) == 1, "no second training run"
    evaluations = sorted((tmp_path / "eval").glob("*/PushCube-v1/results.json"))
    assert len(evaluations) == 2 and json.loads(evaluations[-1].read_text())["config"]["ckpt"] == str(checkpoint)
    metadata = [json.loads(path.read_text())["config"]["server_metadata"] for path in evaluations]
    assert [m["cfg_scale"] for m in metadata] == [1.5, 1.0], "the override reached the served model"

    # The diagnostics the README quotes (benchmarks/e2e_probe.py) run on the miniature's checkpoint and dataset.
    probe_args = ["--rlds", str(tmp_path / "data_96px" / "rlds"), "--seeds", "100000", "--max-steps", "8"]
    probe = _run_module("benchmarks.e2e_probe", str(checkpoint), *probe_args, "--val-batches", "1")
    assert "PickCube-v1 seed 100000: " in probe and "; grasped: " in probe
    response = probe.split("for a 5 cm goal shift: ")[1].splitlines()[0]
    assert [part.split(":")[0] for part in response.split("; ")] == ["goal +x", "goal +y", "goal +z"], response
    frames = int(probe.split("object-position head on ")[1].split()[0])
    mean = probe.split("mean")[1].splitlines()[0]
    errors = [float(v) for v in mean.strip(" []").split(",")]
    assert frames > 0 and len(errors) == 6 and all(e >= 0 for e in errors)


@pytest.mark.slow
def test_recipe_miniature_with_the_wrist_camera(tmp_path: Path) -> None:
    """Demos replayed on panda_wristcam, both cameras in the RLDS set, a policy reading both, evaluated with both."""
    _run_module("benchmarks.maniskill_e2e", "--mini", "--wrist-camera", "--work-dir", str(tmp_path))
    (replayed,) = (tmp_path / "demos_wrist" / "PushCube-v1").glob("PushCube-v1.rgb.pd_ee_delta_pose.*.h5")
    with h5py.File(replayed) as demos:
        base, hand = (demos[f"traj_0/obs/sensor_data/{c}/rgb"][()] for c in ("base_camera", "hand_camera"))
    assert base.shape == hand.shape and not (base == hand).all(), "two views of the scene"
    (dataset,) = (tmp_path / "data_wrist" / "rlds" / "maniskill_e2e_pushcube").iterdir()
    assert "wrist_image" in (dataset / "features.json").read_text()
    (config,) = (tmp_path / "runs").glob("*/checkpoints/step_*/config.yaml")
    assert "wrist_image: true" in config.read_text()
    (results,) = (tmp_path / "eval").glob("*/PushCube-v1/results.json")
    record = json.loads(results.read_text())
    assert record["num_episodes"] == 1 and record["config"]["server_metadata"]["wrist_image"] is True
    assert record["config"]["wrist_camera"] == "hand_camera"


def test_evaluating_a_checkpoint_needs_the_task_demos_for_its_budget(monkeypatch, tmp_path: Path) -> None:
    from benchmarks import maniskill_e2e

    checkpoint, work = tmp_path / "step_000010", tmp_path / "work"
    checkpoint.mkdir()
    (checkpoint / "config.yaml").write_text("model: {}\n")
    argv = ["maniskill_e2e", "--tasks", "PickCube-v1", "--ckpt", str(checkpoint), "--work-dir", str(work)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=r"--ckpt: no replayed PickCube-v1 demonstrations under .*work/demos/PickCube"):
        maniskill_e2e.main()
    assert not work.exists(), "nothing recorded, built or trained for an evaluation"


def test_demo_stages_are_redone_when_their_output_holds_another_count(tmp_path: Path) -> None:
    from benchmarks.maniskill_e2e import discard, recorded

    trajectory = tmp_path / "PickCube-v1.h5"
    trajectory.write_bytes(b"")
    episodes = [{"episode_id": i, "elapsed_steps": 70} for i in range(2)]
    trajectory.with_suffix(".json").write_text(json.dumps({"episodes": episodes}))
    assert recorded(trajectory) == 2
    trajectory.with_suffix(".json").write_text('{"episodes": [{"episode_id": 0')  # a recording cut short
    assert recorded(trajectory) == 0
    discard(trajectory, 100)
    assert not list(tmp_path.iterdir())


def test_training_gets_one_source_per_recorded_task_sharing_one_unnorm_key() -> None:
    from hydra import compose, initialize_config_dir

    from benchmarks.maniskill_e2e import TASKS, sources_override

    def sources(*overrides: str) -> list:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=["experiment=maniskill_e2e", "paths.data_dir=/d", *overrides])
        return [dict(s) for s in cfg.dataset.sources]

    every_task = sources()
    assert [s["name"] for s in every_task] == [
        "maniskill_e2e_pushcube",
        "maniskill_e2e_pickcube",
        "maniskill_e2e_stackcube",
    ]
    assert {s["unnorm_key"] for s in every_task} == {"maniskill_e2e"} and {s["weight"] for s in every_task} == {1.0}
    assert sources(sources_override(list(TASKS))) == every_task  # the override round-trips through Hydra's grammar
    (stack,) = sources(sources_override(["StackCube-v1"]))
    assert stack == every_task[2] and stack["data_dir"] == "/d/rlds" and stack["image_key"] == "observation/image"
    push, pick = sources(sources_override(["PushCube-v1", "PickCube-v1"], {"PickCube-v1": 2.0}))
    assert (push["weight"], pick["weight"]) == (1.0, 2.0) and pick == {**every_task[1], "weight": 2.0}
    with pytest.raises(SystemExit, match="no dataset source"):
        sources_override(["PegInsertionSide-v1"])
    (wrist,) = sources(sources_override(["PickCube-v1"], wrist=True))
    assert wrist == {**every_task[1], "wrist_image_key": "observation/wrist_image"}


def test_replays_render_other_cameras_from_a_copy_of_the_recordings_metadata(tmp_path: Path) -> None:
    from benchmarks.maniskill_e2e import Cameras

    source = tmp_path / "PickCube-v1.h5"
    source.write_bytes(b"h5")
    kwargs = {"control_mode": "pd_joint_pos", "sensor_configs": {"shader_pack": "default"}}
    source.with_suffix(".json").write_text(json.dumps({"env_info": {"env_kwargs": kwargs}, "episodes": []}))
    assert Cameras().recording(source) == source and Cameras().dir(tmp_path, "demos") == tmp_path / "demos"
    both = Cameras(96, wrist=True)
    variant = both.recording(source)
    assert variant == tmp_path / "PickCube-v1_wrist_96px.h5" and variant.read_bytes() == b"h5"  # linked, not copied
    changed = json.loads(variant.with_suffix(".json").read_text())["env_info"]["env_kwargs"]
    assert changed == {
        **kwargs,
        "robot_uids": "panda_wristcam",
        "sensor_configs": {**kwargs["sensor_configs"], "width": 96, "height": 96},
    }
    assert both.dir(tmp_path, "data") == tmp_path / "data_wrist_96px"
    assert json.loads(source.with_suffix(".json").read_text())["env_info"]["env_kwargs"] == kwargs, "left as it was"


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (
            ["--eval-tasks", "PickCube-v1"],
            "--eval-tasks ['PickCube-v1'] are not among the trained --tasks ['PushCube-v1']",
        ),
        (
            ["--task-weights", "PickCube-v1=2"],
            "--task-weights ['PickCube-v1'] are not among the trained --tasks ['PushCube-v1']",
        ),
        (
            ["--task-demos", "PushCube-v1=50", "StackCube-v1=20"],
            "--task-demos ['StackCube-v1'] are not among the trained --tasks ['PushCube-v1']",
        ),
        (["--ckpt", "/nonexistent/step_000010"], "--ckpt /nonexistent/step_000010 is not a checkpoint dir"),
        (["--eval-seed", "40"], "--eval-seed 40: seeds below 100000 may be demonstrations' seeds"),
        (["--task-weights", "PushCube-v1"], "expected TASK=FLOAT, got 'PushCube-v1'"),
        (["--task-demos", "PushCube-v1=many"], "expected TASK=INT, got 'PushCube-v1=many'"),
    ],
)
def test_task_arguments_are_checked_before_any_stage(
    flag: list[str], message: str, monkeypatch, capsys, tmp_path: Path
) -> None:
    from benchmarks import maniskill_e2e

    argv = ["maniskill_e2e", "--tasks", "PushCube-v1", *flag, "--work-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        maniskill_e2e.main()
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "rejected before any stage ran"
