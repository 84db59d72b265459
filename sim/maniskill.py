"""ManiSkill3 environments for evaluation: one CPU-rendered env with square RGB cameras, and its camera image."""

from __future__ import annotations

import io
import sys

import gymnasium as gym
import numpy as np

# Tasks that run without downloaded assets, with the instruction an evaluation sends by default.
TASK_PROMPTS = {
    "PushCube-v1": "push the cube to the goal region",
    "PickCube-v1": "pick up the cube and move it to the goal position",
    "StackCube-v1": "stack the red cube on top of the green cube",
    "PullCube-v1": "pull the cube to the goal region",
    "LiftPegUpright-v1": "lift the peg and stand it upright",
    "PegInsertionSide-v1": "insert the peg into the hole in the box",
    "PlaceSphere-v1": "place the sphere into the bin",
    "PlugCharger-v1": "plug the charger into the receptacle",
    "PokeCube-v1": "use the peg to push the cube to the goal region",
    "PullCubeTool-v1": "use the tool to pull the cube to the goal region",
    "RollBall-v1": "push the ball so that it rolls to the goal region",
    "StackPyramid-v1": "stack the cubes into a pyramid",
}
# The Panda's wrist camera exists only on the panda_wristcam robot.
CAMERA_ROBOTS = {"hand_camera": "panda_wristcam"}


def default_prompt(env_id: str) -> str:
    if env_id not in TASK_PROMPTS:
        raise ValueError(f'no default prompt for {env_id}; pass prompt="..." (defaults exist for {list(TASK_PROMPTS)})')
    return TASK_PROMPTS[env_id]


def make_env(
    env_id: str, control_mode: str, image_size: int, camera: str = "base_camera", max_episode_steps: int | None = None
) -> gym.Env:
    """One env on the CPU backends whose cameras render image_size x image_size RGB; `camera` must be among them.

    hand_camera selects the panda_wristcam robot. A task whose assets are missing fails at once with the command that
    downloads them, instead of waiting on ManiSkill's download prompt.
    """
    import mani_skill.envs  # noqa: F401  registers the tasks with gymnasium

    if env_id not in gym.registry:
        raise ValueError(f"unknown ManiSkill env_id {env_id!r}; tasks that need no download: {', '.join(TASK_PROMPTS)}")
    kwargs = {"robot_uids": CAMERA_ROBOTS[camera]} if camera in CAMERA_ROBOTS else {}
    stdin, sys.stdin = sys.stdin, io.StringIO()  # ManiSkill asks on stdin before downloading: answer EOF at once
    try:
        env = gym.make(
            env_id,
            obs_mode="rgb",
            control_mode=control_mode,
            sim_backend="cpu",
            render_backend="cpu",
            sensor_configs=dict(width=image_size, height=image_size),
            max_episode_steps=max_episode_steps,
            **kwargs,
        )
    except EOFError:
        raise RuntimeError(
            f"{env_id} needs assets that are not downloaded (named above); "
            f"run `python -m mani_skill.utils.download_asset {env_id}` on a machine with network access"
        ) from None
    finally:
        sys.stdin = stdin
    cameras = list(env.observation_space["sensor_data"].keys())
    if camera not in cameras:
        env.close()
        raise ValueError(f"camera {camera!r} is not a camera of {env_id}; choose one of {cameras}")
    return env


def camera_image(obs: dict, camera: str) -> np.ndarray:
    """uint8 [H, W, 3] from obs["sensor_data"][camera]["rgb"] (a torch tensor [1, H, W, 3])."""
    return obs["sensor_data"][camera]["rgb"][0].cpu().numpy()
