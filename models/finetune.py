"""Finetuning modes: which parameters of a policy train (`finetune=full|head_only|frozen_vision`)."""

from __future__ import annotations

from torch import nn

FROZEN_MODULES = {
    "full": (),
    "frozen_vision": ("vision_backbone",),
    "head_only": ("vision_backbone", "projector", "llm_backbone"),
}


def apply_finetune_mode(model: nn.Module, mode: str) -> dict[str, int]:
    """Freeze the modules the mode names; the EMA copy never trains. Returns total and trainable parameter counts."""
    if mode not in FROZEN_MODULES:
        raise ValueError(f"finetune.mode={mode!r} unknown; expected one of {sorted(FROZEN_MODULES)}")
    model.requires_grad_(True)
    for name in FROZEN_MODULES[mode]:
        module = getattr(model, name, None)
        if module is None:
            raise ValueError(f"finetune.mode={mode!r} freezes `{name}`, which {type(model).__name__} does not have")
        module.requires_grad_(False)
    if getattr(model, "ema_diffusion", None) is not None:
        model.ema_diffusion.requires_grad_(False)
    return count_parameters(model)


def count_parameters(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}
