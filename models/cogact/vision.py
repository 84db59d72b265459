"""DINOv2 + SigLIP fused vision backbone (Prismatic's "dinosiglip"), built with timm.

Each ViT returns the patch tokens of its second-to-last block; the two are concatenated channel-wise:
[B, 3, S, S] -> [B, (S/14)^2, D_dino + D_siglip]. Module names are OpenVLA's HF export's
(`vision_backbone.featurizer`, `vision_backbone.fused_featurizer`); a native Prismatic / CogACT checkpoint's
`dino_featurizer` / `siglip_featurizer` are renamed on load (models/cogact/official.py).
"""

from __future__ import annotations

import timm
import torch
from torch import nn

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class DinoSigLIPBackbone(nn.Module):
    """`overrides` changes the timm architectures' sizes (e.g. {embed_dim: 32, depth: 2, num_heads: 2}) for tiny,
    randomly initialised variants of the same classes; `pretrained` loads timm's own weights (network)."""

    def __init__(
        self,
        image_size: int = 224,
        dino: str = "vit_large_patch14_reg4_dinov2.lvd142m",
        siglip: str = "vit_so400m_patch14_siglip_224",
        overrides: dict | None = None,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        overrides = dict(overrides or {})
        kwargs = dict(pretrained=pretrained, num_classes=0, img_size=image_size, **overrides)
        self.featurizer = timm.create_model(dino, **kwargs)
        self.fused_featurizer = timm.create_model(siglip, **kwargs)
        self.image_size, self.pretrained = image_size, pretrained
        self.embed_dim = self.featurizer.embed_dim + self.fused_featurizer.embed_dim
        self.num_patches = self.featurizer.patch_embed.num_patches
        for name, mean, std in (("dino", IMAGENET_MEAN, IMAGENET_STD), ("siglip", SIGLIP_MEAN, SIGLIP_STD)):
            self.register_buffer(f"{name}_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"{name}_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def featurizer_dtype(model: nn.Module) -> torch.dtype:
        return next(model.parameters()).dtype

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.featurizer.set_grad_checkpointing(enable)
        self.fused_featurizer.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 [B, S, S, 3] -> patch features [B, N, D]."""
        pixels = images.permute(0, 3, 1, 2).float() / 255.0  # normalized in float32, then cast to each ViT's dtype
        features = []
        for model, mean, std in (
            (self.featurizer, self.dino_mean, self.dino_std),
            (self.fused_featurizer, self.siglip_mean, self.siglip_std),
        ):
            x = ((pixels - mean) / std).to(self.featurizer_dtype(model))
            (patches,) = model.get_intermediate_layers(x, n=[len(model.blocks) - 2])
            features.append(patches)
        return torch.cat(features, dim=-1)


class FusedMLPProjector(nn.Module):
    """Prismatic's fused-gelu-mlp: D_vision -> 4 D_vision -> D_llm -> D_llm with GELUs between."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(vision_dim, 4 * vision_dim),
            nn.GELU(),
            nn.Linear(4 * vision_dim, llm_dim),
            nn.GELU(),
            nn.Linear(llm_dim, llm_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)
