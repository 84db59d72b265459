"""CogACT's adaptive action ensemble: blend what the last K chunks predicted for the current step, weighting each by
its cosine similarity to the newest prediction (w_i ~ exp(alpha * cos(a_i, a_newest)))."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

import numpy as np


class AdaptiveEnsembler:
    """K: how many chunks are kept (CogACT: 2 for the Google robot, 7 for Bridge); alpha: similarity temperature;
    gripper: (closed, open) values of the last dimension, to which the blend is snapped back (the nearer one), as
    CogACT's adapters re-binarize it: a blend of open and closed is no command the policy gave; None: left blended."""

    def __init__(self, horizon: int = 7, alpha: float = 0.1, gripper: tuple[float, float] | None = None) -> None:
        if horizon < 1:
            raise ValueError(f"ensemble horizon must be >= 1, got {horizon}")
        if gripper is not None and gripper[0] == gripper[1]:
            raise ValueError(f"the gripper's closed and open values must differ, got {gripper}")
        self.alpha, self.gripper = alpha, gripper
        self.history: deque[np.ndarray] = deque(maxlen=horizon)

    def reset(self) -> None:
        self.history.clear()

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        """chunk [T, A] predicted now -> the ensembled action [A] to execute now."""
        chunk = np.asarray(chunk, dtype=np.float64)
        self.history.append(chunk)
        newest_first = list(self.history)[::-1]
        # The chunk predicted i steps ago holds its prediction for now at index i.
        now = np.stack([c[min(i, len(c) - 1)] for i, c in enumerate(newest_first)])
        reference = now[0]
        cosine = now @ reference / (np.linalg.norm(now, axis=1) * np.linalg.norm(reference) + 1e-7)
        weights = np.exp(self.alpha * cosine)
        action = (weights[:, None] * now).sum(0) / weights.sum()
        if self.gripper is not None:
            closed, opened = self.gripper
            action[-1] = opened if abs(action[-1] - opened) <= abs(action[-1] - closed) else closed
        return action


def robot_gripper(robot: Mapping) -> tuple[float, float] | None:
    """A robot config's gripper values (closed, open), which AdaptiveEnsembler snaps the blend to; None when the
    config names none."""
    gripper = robot.get("gripper")
    return None if gripper is None else (float(gripper["closed"]), float(gripper["open"]))
