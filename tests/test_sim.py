"""Action mapping, env factory errors, and real ManiSkill episodes through the real server (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from serving import PolicyServer, ServerThread
from sim import default_prompt, make_env, run_episode, to_env_action
from tests.test_serving import FakePolicy

REPO = Path(__file__).resolve().parent.parent
ROBOT = OmegaConf.load(REPO / "conf/robot/maniskill_panda.yaml")
LOW, HIGH = -np.ones(7, np.float32), np.ones(7, np.float32)


def _robot(position: float = 1.0, rotation: float = 1.0, opened: float = 1.0, closed: float = 0.0) -> dict:
    return {"action_scale": {"position": position, "rotation": rotation}, "gripper": {"open": opened, "closed": closed}}


def test_action_mapping_scales_deltas() -> None:
    action = np.array([0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 1.0])
    env_action, clipped = to_env_action(action, _robot(position=2.0, rotation=0.5), LOW, HIGH)
    np.testing.assert_allclose(env_action, [0.2, -0.4, 0.6, 0.2, -0.25, 0.3, 1.0], rtol=1e-6)
    assert env_action.dtype == np.float32 and clipped == 0


@pytest.mark.parametrize(
    ("opened", "closed", "gripper", "expected"),
    [(1.0, 0.0, 1.0, 1.0), (1.0, 0.0, 0.0, -1.0), (1.0, 0.0, 0.5, 0.0), (0.0, 1.0, 1.0, -1.0), (-1.0, 1.0, -1.0, 1.0)],
)
def test_action_mapping_gripper_open_is_plus_one(opened: float, closed: float, gripper: float, expected: float) -> None:
    action = np.array([0, 0, 0, 0, 0, 0, gripper], np.float32)
    assert to_env_action(action, _robot(opened=opened, closed=closed), LOW, HIGH)[0][6] == pytest.approx(expected)


def test_action_mapping_clips_to_the_action_space_and_counts() -> None:
    env_action, clipped = to_env_action(np.array([1.5, 0, -3, 0, 0, 0.99, 0]), _robot(rotation=2.0), LOW, HIGH)
    np.testing.assert_allclose(env_action, [1, 0, -1, 0, 0, 1, -1])
    assert clipped == 3


def test_action_mapping_rejects_other_action_spaces() -> None:
    with pytest.raises(ValueError, match="pd_ee_delta_pose"):
        to_env_action(np.zeros(7), _robot(), -np.ones(8), np.ones(8))
    with pytest.raises(ValueError, match="must differ"):
        to_env_action(np.zeros(7), _robot(opened=1.0, closed=1.0), LOW, HIGH)


def test_unknown_task_errors_name_known_ones() -> None:
    with pytest.raises(ValueError, match="PushCube-v1"):
        make_env("PushBall-v9", "pd_ee_delta_pose", 64)
    with pytest.raises(ValueError, match="prompt="):
        default_prompt("PushBall-v9")


def test_task_with_missing_assets_fails_fast() -> None:
    from mani_skill.utils import assets

    if assets.is_data_source_downloaded("ycb"):
        pytest.skip("the YCB assets are downloaded here")
    with pytest.raises(RuntimeError, match="download_asset PickSingleYCB-v1"):
        make_env("PickSingleYCB-v1", "pd_ee_delta_pose", 64)


@pytest.mark.slow
def test_pushcube_episodes_through_the_server(tmp_path: Path) -> None:
    policy = FakePolicy(horizon=4, action=[2.0, 0, 0, 0, 0, 0, 1.0])  # x beyond the bounds: clipped every step
    env = make_env("PushCube-v1", ROBOT.control_mode, 64, ROBOT.camera, max_episode_steps=50)
    with ServerThread(PolicyServer(policy, ROBOT.observation_keys)) as server:
        client = WebsocketClientPolicy(server.host, server.port)
        settings = dict(camera=ROBOT.camera, max_steps=6, execute_steps=2)
        first = run_episode(env, client, ROBOT, prompt="push", seed=3, image_prefix=tmp_path / "ep", **settings)
        again = run_episode(env, client, ROBOT, prompt="push", seed=3, **settings)
        failed = run_episode(env, client, ROBOT, prompt="explode", seed=4, **settings)
    env.close()

    assert first.error is None and first.steps == 6 and first.policy_calls == 3
    assert first.clipped_steps == 6 and first.clipped_components == 6
    assert isinstance(first.success, bool) and first.latency_ms_mean > 0
    assert [Path(p).name for p in first.images] == ["ep_step000.png", "ep_step006.png"]
    assert all(Path(p).is_file() for p in first.images)
    assert again.episode_return == first.episode_return, "same seed, same actions: same episode"
    assert policy.resets == 3 and policy.seen[0].image.shape == (32, 32, 3) and policy.seen[0].prompt == "push"
    assert failed.steps == 0 and not failed.success
    assert "inference failed: ValueError" in failed.error


@pytest.mark.slow
def test_eval_entry_point_against_a_running_server(tmp_path: Path) -> None:
    with ServerThread(PolicyServer(FakePolicy(horizon=4, action=np.zeros(7)), ROBOT.observation_keys)) as server:
        result = subprocess.run(
            [
                sys.executable,
                str(REPO / "eval_maniskill.py"),
                f"server={server.host}:{server.port}",
                "robot=maniskill_panda",
                "num_episodes=2",
                "max_steps=4",
                f"hydra.run.dir={tmp_path}",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last == f"results: {tmp_path / 'results.json'}"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_episodes"] == 2 and results["success_rate"] == 0.0
    assert [e["seed"] for e in results["episodes"]] == [0, 1] and all(e["steps"] == 4 for e in results["episodes"])
    assert results["config"]["prompt"] == "push the cube to the goal region"
    assert results["config"]["image_size"] == 32
    assert len(list((tmp_path / "images").glob("*.png"))) == 4
