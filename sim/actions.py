"""Policy actions (dataset convention) -> ManiSkill pd_ee_delta_pose actions, and which actions of a chunk are executed.

Dataset convention of one action [7]: [dx, dy, dz, droll, dpitch, dyaw, gripper] in the robot base frame.
Controller convention (ManiSkill3 Panda pd_ee_delta_pose, root_translation:root_aligned_body_rotation):
  - xyz in [-1, 1] -> +-0.1 m, added to the end-effector position in the base frame;
  - the rotation vector r [3] is first clipped by its norm (|r| > 1 -> r / |r|), then multiplied by the
    controller's rot_lower, -0.1 rad, which gives Euler angles (a, b, c) of the delta rotation R = Rx(a) Ry(b) Rz(c)
    ("XYZ"), applied as R_target = R @ R_current in the base frame, about the end-effector position. So +1 turns the
    hand by -0.1 rad about that axis (mani_skill 3.0.1; upstream issue haosulab/ManiSkill#1469; tests/test_sim.py
    checks the sign, so an upgrade that changes it fails there). Demonstrations converted by ManiSkill's own
    replay_trajectory carry that sign; a dataset whose rotation deltas turn the right-handed way (LIBERO, a real
    robot) needs a negative robot.action_scale.rotation;
  - gripper -1 closes, +1 opens.
Rotation conversion: both conventions rotate about the base frame's axes, so no frame change is needed. For deltas of
at most 0.1 rad, Rx(a) Ry(b) Rz(c), the extrinsic roll-pitch-yaw Rz(c) Ry(b) Rx(a) and the axis-angle vector (a, b, c)
all equal I + [(a, b, c)]x to first order; they differ by at most |a||b| / 2 <= 0.005 rad, far below what a policy
resolves. So droll, dpitch, dyaw map component-wise to (a, b, c): the conversion is the identity plus the scale
robot.action_scale.rotation (dataset units -> controller units, 1.0 = -0.1 rad).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.ensemble import AdaptiveEnsembler

ACTION_DIM = 7  # dx, dy, dz, droll, dpitch, dyaw, gripper


def to_env_action(action: np.ndarray, robot: Mapping, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, int]:
    """Map one policy action [7] to the controller's action [7], clipped as the controller would clip it.

    Position and rotation deltas are multiplied by robot.action_scale.{position, rotation}; the gripper is mapped
    linearly so that robot.gripper.closed -> -1 (close) and robot.gripper.open -> +1 (open). Position and gripper
    are clipped to [low, high] (the env's action space); the rotation is clipped by its norm to the unit ball, as
    pd_ee_delta_pose does, so the returned action is exactly what the controller executes.
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
    rotation_norm = np.linalg.norm(mapped[3:6])
    clipped[3:6] = mapped[3:6] / rotation_norm if rotation_norm > 1 else mapped[3:6]
    return clipped.astype(np.float32), int(np.count_nonzero(clipped != mapped))


class ChunkExecution:
    """Which actions of each predicted chunk [T, 7] are executed before the next query: the first `execute_steps`
    (re-plan every k steps), or, with an AdaptiveEnsembler, one blended action per chunk, so that the policy is
    queried at every step (CogACT's adaptive action ensemble)."""

    def __init__(self, execute_steps: int, ensembler: AdaptiveEnsembler | None = None) -> None:
        if execute_steps < 1:
            raise ValueError(f"execute_steps must be at least 1, got {execute_steps}")
        self.execute_steps, self.ensembler = execute_steps, ensembler

    @property
    def steps_per_chunk(self) -> int:
        return 1 if self.ensembler is not None else self.execute_steps

    def reset(self) -> None:
        if self.ensembler is not None:
            self.ensembler.reset()

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        """chunk [T, 7] -> the actions to execute now [k, 7]."""
        if self.ensembler is not None:
            return self.ensembler(chunk)[None]
        return np.asarray(chunk)[: self.execute_steps]
