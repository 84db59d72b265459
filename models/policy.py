"""The policy contract every model family implements, and the observation it is given.

A policy knows no wire protocol and no simulator: the server and the evaluator hand it a canonical observation
(`Observation`) and get back an un-normalized action chunk in the dataset's action convention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from datasets.statistics import normalize, select_statistics, unnormalize


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

    Subclasses implement `compute_loss` (training, normalized batch) and `predict_normalized` (inference, normalized
    chunks), and have a `device`. The statistics, un-normalized `predict_action_batch` / `predict_action`, `reset` and
    `metadata` come for free; a policy that acts otherwise overrides `predict_action_batch`.
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
    # Size of the normalized proprio state it reads (batch["state"], Observation.state), or None for none.
    proprio_dim: int | None = None
    # True for a policy that reads the wrist camera (batch["wrist_image"], Observation.wrist_image); train.py refuses
    # loader.use_wrist_image for one that does not (the frames would be decoded for nothing).
    reads_wrist_image: bool = False
    # Which checkpoint it was loaded from, {"name", "step"} (models.load_policy), sent in the server's metadata so that
    # a client can tell two servers of the same config apart and a results file names what it evaluated.
    checkpoint: dict | None = None
    # State-dict prefixes of weights that follow the trained ones without a gradient (CogACT: its head's EMA).
    derived_state_prefixes: tuple[str, ...] = ()
    # The modules whose weights may be stored in half precision (cast_backbone): the pretrained VLM. The rest (an
    # action head, its EMA, small projections) stays float32, as CogACT serves its VLM in bf16 and its DiT in fp32.
    backbone_modules: tuple[str, ...] = ()
    # dataset_statistics.json content and the key of its entry that (un-)normalizes: set_statistics.
    statistics: dict | None = None
    unnorm_key: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def released_statistics(self, pretrained: str) -> dict:
        """The dataset statistics published with the released weights `pretrained` (dataset_statistics.json's
        format, keyed by unnorm_key): what a checkpoint of the released model un-normalizes with. Refused when the
        release does not make every weight of this model (a module of its own would be random)."""
        raise NotImplementedError(f"{type(self).__name__} has no released weights with statistics")

    def trained_state_keys(self) -> set[str]:
        """The state-dict entries that training changes: the trainable parameters and the weights derived from them
        (derived_state_prefixes). The others are frozen base weights, which loading rebuilds from the base: a LoRA
        checkpoint and the resume state hold only these."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k for k in self.state_dict() if k in trainable or k.startswith(self.derived_state_prefixes)}

    def cast_backbone(self, dtype: torch.dtype, frozen_only: bool = False) -> int:
        """Store the backbone modules' floating-point parameters in dtype (with frozen_only, the frozen ones alone:
        trainable weights, LoRA adapters among them, stay float32 for the optimizer). Buffers keep their dtype.
        Returns the number of values cast."""
        cast = 0
        for name in self.backbone_modules:
            for parameter in getattr(self, name).parameters():
                if parameter.is_floating_point() and not (frozen_only and parameter.requires_grad):
                    parameter.data = parameter.data.to(dtype)
                    cast += parameter.numel()
        return cast

    def set_statistics(self, statistics: dict, unnorm_key: str | None = None) -> None:
        """Statistics (dataset_statistics.json) used to un-normalize predictions; unnorm_key picks the dataset."""
        self.unnorm_key, entry = select_statistics(statistics, unnorm_key)
        if len(entry["action"]["q01"]) != self.action_dim:
            raise ValueError(
                f"statistics {self.unnorm_key!r} describe {len(entry['action']['q01'])}-dim actions, "
                f"the model predicts {self.action_dim}"
            )
        self.statistics = statistics

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """batch: "image" uint8 [B, H, W, 3], "prompt" list[str], "action" float [B, T, A] normalized,
        "action_pad_mask" bool [B, T]. Returns (scalar loss, metrics)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        # Training goes through forward so that DDP / FSDP wrappers see the call.
        return self.compute_loss(batch)

    @torch.no_grad()
    def predict_normalized(
        self,
        images: torch.Tensor,
        prompts: list[str],
        states: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        wrist_images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """images uint8 [B, S, S, 3]; states normalized proprio [B, S] or None; wrist_images uint8 [B, S, S, 3], given
        to a policy that reads them (reads_wrist_image) only. Returns normalized chunks [B, T, A]."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict_normalized (models/policy.py)")

    @torch.no_grad()
    def predict_action_batch(self, observations: list[Observation]) -> np.ndarray:
        """Returns un-normalized float32 action chunks [B, T, A]."""
        if self.statistics is None:
            raise RuntimeError("no dataset statistics set: load the model with models.load_policy(ckpt_dir)")
        _, entry = select_statistics(self.statistics, self.unnorm_key)
        images = torch.from_numpy(np.stack([o.image for o in observations]))
        states = None
        if self.proprio_dim and all(o.state is not None for o in observations):
            if "proprio" not in entry:
                raise RuntimeError(f"statistics {self.unnorm_key!r} have no proprio entry to normalize states with")
            states = torch.from_numpy(normalize(np.stack([o.state for o in observations]), entry["proprio"]))
        prompts = [o.prompt for o in observations]
        extra = {}
        if self.reads_wrist_image:
            if any(o.wrist_image is None for o in observations):
                raise ValueError("this policy reads the wrist camera: every observation needs its wrist_image")
            extra["wrist_images"] = torch.from_numpy(np.stack([o.wrist_image for o in observations]))
        normalized = self.predict_normalized(images, prompts, states, **extra).float().cpu().numpy()
        return unnormalize(normalized, entry["action"])

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
            "unnorm_key": self.unnorm_key,
            "state_dim": self.proprio_dim,
            "wrist_image": self.reads_wrist_image,
            "checkpoint": self.checkpoint,
        }
