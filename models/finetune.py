"""Finetuning modes: which parameters of a policy train (`finetune=full|lora|frozen_vision|head_only`).

Under `lora` the LLM gets peft LoRA adapters (all linear layers by default), the projector and the action head train
fully, and the vision backbone is frozen (or gets adapters too with `lora.vision: true`; `lora.projector: true`
gives the projector adapters instead of training it whole).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn

FROZEN_MODULES = {
    "full": (),
    "frozen_vision": ("vision_backbone",),
    "head_only": ("vision_backbone", "projector", "llm_backbone"),
    "lora": ("vision_backbone", "llm_backbone"),  # adapters are added after freezing, and they train
}
# The linear layers of each ViT block (peft matches the whole module name): OpenVLA's "all-linear" over the ViTs,
# without the heads the featurizer never runs (SigLIP's attention pool).
VISION_LORA_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"
# What checkpoints saved before 2026-12-03 adapted: name suffixes, which also caught the patch embedding's Conv2d.
LEGACY_VISION_LORA_TARGETS = ["qkv", "proj", "fc1", "fc2"]


def saved_vision_targets(weights: Path) -> str | list[str] | None:
    """The ViT target modules the adapters in a safetensors file (a checkpoint's, a run's resume state) were trained
    with: the legacy suffixes when they adapted the patch embedding, VISION_LORA_TARGETS otherwise; None without the
    file (FSDP and DeepSpeed save their states otherwise). Reads the file's header only."""
    if not weights.is_file():
        return None
    with safe_open(str(weights), "pt") as saved:
        legacy = any(".patch_embed.proj.lora_" in key for key in saved.keys())
    return LEGACY_VISION_LORA_TARGETS if legacy else VISION_LORA_TARGETS


def apply_finetune(
    model: nn.Module, finetune: DictConfig, vision_targets: str | list[str] | None = None
) -> dict[str, int]:
    """apply_finetune_mode with the `finetune` config group as composed (its mode and lora settings). vision_targets:
    the ViT modules to adapt when the config names none (a resumed run's, see saved_vision_targets)."""
    lora = OmegaConf.to_container(finetune.lora) if finetune.get("lora") is not None else None
    if lora is not None and vision_targets is not None:
        lora.setdefault("vision_targets", vision_targets)
    return apply_finetune_mode(model, finetune.mode, lora)


def apply_finetune_mode(model: nn.Module, mode: str, lora: dict | None = None) -> dict[str, int]:
    """Freeze what the mode names (the EMA copy never trains), add LoRA adapters for `lora`.
    Returns total and trainable parameter counts."""
    if mode not in FROZEN_MODULES:
        raise ValueError(f"finetune.mode={mode!r} unknown; expected one of {sorted(FROZEN_MODULES)}")
    model.requires_grad_(True)
    for name in FROZEN_MODULES[mode]:
        module = getattr(model, name, None)
        if module is None:
            raise ValueError(f"finetune.mode={mode!r} freezes `{name}`, which {type(model).__name__} does not have")
        module.requires_grad_(False)
    if mode == "lora":
        add_lora_adapters(model, **(lora or {}))
    if getattr(model, "ema_diffusion", None) is not None:
        model.ema_diffusion.requires_grad_(False)
    counts = count_parameters(model)
    if not counts["trainable"]:
        raise ValueError(
            f"finetune.mode={mode!r} freezes every module of {type(model).__name__} "
            f"({', '.join(FROZEN_MODULES[mode])}): nothing would train; pick another finetune mode"
        )
    return counts


def add_lora_adapters(
    model: nn.Module,
    r: int = 32,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    vision: bool = False,
    init: bool | str = True,
    projector: bool = False,
    vision_targets: str | list[str] = VISION_LORA_TARGETS,
) -> None:
    """Wrap the LLM (and optionally both ViTs and the projector) with peft LoRA adapters; only the adapters of those
    modules train. init: peft's init_lora_weights (True: Kaiming-uniform A; "gaussian": OpenVLA's; B starts at zero
    either way). vision_targets: the ViT modules adapted (see saved_vision_targets for saved adapters)."""
    if isinstance(model.llm_backbone.llm, PeftModel):
        raise ValueError("the LLM already carries LoRA adapters")
    common = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=init, bias="none")
    model.llm_backbone.llm = get_peft_model(model.llm_backbone.llm, LoraConfig(target_modules=target_modules, **common))
    if vision:
        vision_config = LoraConfig(target_modules=vision_targets, **common)
        backbone = model.vision_backbone
        backbone.featurizer = get_peft_model(backbone.featurizer, vision_config)
        backbone.fused_featurizer = get_peft_model(backbone.fused_featurizer, vision_config)
    if projector:
        linears = [name for name, module in model.projector.named_modules() if isinstance(module, nn.Linear)]
        model.projector = get_peft_model(model.projector, LoraConfig(target_modules=linears, **common))


def merge_lora_adapters(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weights; the model becomes a plain one again (same outputs)."""
    vision = model.vision_backbone
    adapted = ((model.llm_backbone, "llm"), (vision, "featurizer"), (vision, "fused_featurizer"), (model, "projector"))
    for owner, name in adapted:
        if isinstance(getattr(owner, name), PeftModel):
            setattr(owner, name, getattr(owner, name).merge_and_unload())
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}
