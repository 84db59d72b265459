"""The policy contract every model family implements, and the observation it is given.

A policy knows no wire protocol and no simulator: the server and the evaluator hand it a canonical observation
(`Observation`) and get back an un-normalized action chunk in the dataset's action convention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn


@dataclass
class Observation:
    """One canonical observation.

    image: uint8 [H, W, 3] primary (external) camera, already at the model's resolution.
    prompt: the task instruction in natural language.
    wrist_image: optional uint8 [H, W, 3].
    state: optional float32 [S] proprioception, raw (un-normalized).
    """

    image: np.ndarray
    prompt: str
    wrist_image: np.ndarray | None = None
    state: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


class Policy(nn.Module):
    """Base class of every trainable policy.

    Subclasses implement `compute_loss` (training, normalized batch) and `predict_action_batch` (inference,
    un-normalized chunks). `predict_action` and `reset` come for free.
    """

    action_dim: int
    action_horizon: int
    image_size: int
    # True when the policy was trained on random crops (loader.augment): inference takes the central crop of the same
    # area (datasets.crop). Set from the checkpoint's config by models.load_policy.
    center_crop: bool = False
    # [top, left, height, width] fractions of the external camera's image the policy was trained on
    # (loader.image_roi), or None for the whole image. Set from the checkpoint's config by models.load_policy.
    image_roi: tuple[float, float, float, float] | None = None
    # px of the camera images it trained on (robot.camera_size, which train.py records), or None when unknown.
    camera_size: int | None = None

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """batch: "image" uint8 [B, H, W, 3], "prompt" list[str], "action" float [B, T, A] normalized,
        "action_pad_mask" bool [B, T]. Returns (scalar loss, metrics)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        # Training goes through forward so that DDP / FSDP wrappers see the call.
        return self.compute_loss(batch)

    @torch.no_grad()
    def predict_action_batch(self, observations: list[Observation]) -> np.ndarray:
        """Returns un-normalized float32 action chunks [B, T, A]."""
        raise NotImplementedError

    def predict_action(self, observation: Observation) -> np.ndarray:
        """Returns one un-normalized float32 action chunk [T, A]."""
        return self.predict_action_batch([observation])[0]

    def on_optimizer_step(self) -> None:
        """Called by the training loop after every optimizer step (e.g. to update an EMA)."""

    def reset(self) -> None:
        """Forget per-episode state. Chunk prediction itself is stateless; ensembles keep their own history."""

    def metadata(self) -> dict:
        """What a client needs to know about this policy (sent by the server on connect)."""
        return {
            "model": type(self).__name__,
            "action_dim": self.action_dim,
            "action_horizon": self.action_horizon,
            "image_size": self.image_size,
            "center_crop": self.center_crop,
            "image_roi": None if self.image_roi is None else list(self.image_roi),
            "camera_size": self.camera_size,
        }
