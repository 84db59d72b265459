"""Policy action (dataset convention) -> ManiSkill pd_ee_delta_pose action."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

ACTION_DIM = 7  # dx, dy, dz, droll, dpitch, dyaw, gripper


def to_env_action(action: np.ndarray, robot: Mapping, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, int]:
    """Map one policy action [7] to the controller's action [7], clipped to [low, high] (the env's action space).

    Position and rotation deltas are multiplied by robot.action_scale.{position, rotation}; the gripper is mapped
    linearly so that robot.gripper.closed -> -1 (close) and robot.gripper.open -> +1 (open).
    Returns (float32 [7], number of components that clipping changed).
    """
    action = np.asarray(action, dtype=np.float64)
    if action.shape != (ACTION_DIM,) or np.shape(low) != (ACTION_DIM,):
        raise ValueError(
            f"the action mapping needs 7-dim actions and a 7-dim action space (control_mode pd_ee_delta_pose); "
            f"got an action of shape {list(action.shape)} and an action space of shape {list(np.shape(low))}"
        )
    scale, gripper = robot["action_scale"], robot["gripper"]
    opened, closed = float(gripper["open"]), float(gripper["closed"])
    if opened == closed:
        raise ValueError(f"robot.gripper.open and robot.gripper.closed must differ, both are {opened}")
    mapped = np.concatenate(
        [
            action[:3] * float(scale["position"]),
            action[3:6] * float(scale["rotation"]),
            [2 * (action[6] - closed) / (opened - closed) - 1],
        ]
    )
    clipped = np.clip(mapped, low, high)
    return clipped.astype(np.float32), int(np.count_nonzero(clipped != mapped))
