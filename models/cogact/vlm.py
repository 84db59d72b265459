"""The Prismatic VLM that CogACT and the token policy build on: DINOv2 + SigLIP -> projector -> Llama-2."""

from __future__ import annotations

import torch

from models.cogact.llm import LlamaBackbone
from models.cogact.vision import DinoSigLIPBackbone, FusedMLPProjector
from models.policy import Policy


class PrismaticPolicy(Policy):
    """A policy on the Prismatic VLM. vision_backbone / llm_backbone: the keyword arguments of DinoSigLIPBackbone
    and LlamaBackbone. Chunks are future_action_window_size + 1 steps of action_dim values. gradient_checkpointing:
    recompute the ViTs' and the LLM's activations in the backward pass (memory for time). wrist_image: also read the
    wrist camera, through the same vision backbone and projector, its patches after the external camera's (as
    OpenVLA-OFT feeds a second camera): twice the image tokens, no new weights, so the released weights load as
    they are."""

    backbone_modules = ("vision_backbone", "projector", "llm_backbone")

    def __init__(
        self,
        vision_backbone: dict,
        llm_backbone: dict,
        image_size: int,
        action_dim: int,
        future_action_window_size: int,
        gradient_checkpointing: bool,
        wrist_image: bool = False,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.reads_wrist_image = wrist_image
        self.action_dim = action_dim
        self.action_horizon = future_action_window_size + 1
        self.vision_backbone = DinoSigLIPBackbone(image_size=image_size, **vision_backbone)
        self.llm_backbone = LlamaBackbone(**llm_backbone)
        self.projector = FusedMLPProjector(self.vision_backbone.embed_dim, self.llm_backbone.hidden_size)
        if gradient_checkpointing:
            self.vision_backbone.set_grad_checkpointing(True)
            self.llm_backbone.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def image_patches(self, images: torch.Tensor, wrist_images: torch.Tensor | None = None) -> torch.Tensor:
        """images uint8 [B, S, S, 3] -> the projected patch embeddings [B, N, D] the LLM reads; for a model that
        reads the wrist camera, wrist_images [B, S, S, 3] too -> [B, 2N, D] (external patches first). A model that
        does not ignores wrist_images."""
        for name, batch in (("images", images), ("wrist images", wrist_images)):
            if batch is not None and batch.shape[1:3] != (self.image_size, self.image_size):
                raise ValueError(f"{name} are {tuple(batch.shape[1:3])}, the model expects {self.image_size} px square")
        if not self.reads_wrist_image:
            return self._project(self.vision_backbone(images.to(self.device)))
        if wrist_images is None or len(wrist_images) != len(images):
            raise ValueError(
                "this model reads the wrist camera too (model.wrist_image=true): training needs the dataset's "
                "wrist_image_key and loader.use_wrist_image=true, clients the robot's observation_keys.wrist_image; "
                f"got {'none' if wrist_images is None else len(wrist_images)} wrist images for {len(images)} images"
            )
        both = self._project(self.vision_backbone(torch.cat([images, wrist_images]).to(self.device)))
        return torch.cat(both.chunk(2), dim=1)  # one pass of the ViTs over both cameras

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        """The projector over the ViTs' features, in the projector's dtype (the two may differ: cast_backbone)."""
        return self.projector(features.to(next(self.projector.parameters()).dtype))

    def hidden_states(
        self, patches: torch.Tensor, prompts: list[str], suffixes: list[list[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The LLM's last-layer hidden states [B, N + L, D] over the image patches, the prompt (with the cognition
        tokens) and each row's suffix ids, and each row's sequence index of its last token [B] (right padding)."""
        input_ids, text_mask = self.llm_backbone.tokenize(prompts, patches.device, suffixes)
        hidden = self.llm_backbone(*self.llm_backbone.with_image(patches, input_ids, text_mask))
        return hidden, patches.shape[1] + text_mask.sum(dim=1) - 1

    def check_actions(self, actions: torch.Tensor) -> None:
        """Refuse a batch of action chunks [B, T, A] of another window or size than the model's."""
        if actions.shape[1:] != (self.action_horizon, self.action_dim):
            raise ValueError(
                f"batch actions are {tuple(actions.shape[1:])}, the model expects "
                f"[{self.action_horizon}, {self.action_dim}] (window x action_dim)"
            )
