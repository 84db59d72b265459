"""Load official CogACT weights: `CogACT/CogACT-{Small,Base,Large}` on the Hub (gated: HF_TOKEN) or a local run dir

<run>/checkpoints/<name>.pt = {"model": {"projector", "llm_backbone", "vision_backbone", "action_model"
                                        [, "ema_diffusion"]}}, plus <run>/config.json, dataset_statistics.json

The module names inside are Prismatic's: the vision backbone's two ViTs are `dino_featurizer` and
`siglip_featurizer`, which OpenVLA's HF export (and this project) call `featurizer` and `fused_featurizer`.
CogACT's trainer saves only the modules it trained: a run with a frozen vision backbone holds no `vision_backbone`,
and CogACT then keeps timm's pretrained ViTs (here: `model.vision_backbone.pretrained=true`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from datasets.hub import local_or_hub

MODULE_KEYS = ("vision_backbone", "projector", "llm_backbone", "action_model")
PRISMATIC_VISION_NAMES = {"dino_featurizer.": "featurizer.", "siglip_featurizer.": "fused_featurizer."}


def project_vision_names(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Prismatic vision backbone's state dict under this project's module names (other names pass unchanged)."""
    renamed = {}
    for name, value in source.items():
        prefix = next((p for p in PRISMATIC_VISION_NAMES if name.startswith(p)), None)
        renamed[PRISMATIC_VISION_NAMES[prefix] + name[len(prefix) :] if prefix else name] = value
    return renamed


def resolve_run_dir(pretrained: str) -> Path:
    """A local run dir as is; otherwise a Hub repo id downloaded into the HF cache."""
    return local_or_hub(pretrained, repo_type="model", what="run dir")


def find_checkpoint_file(run_dir: Path) -> Path:
    files = sorted((run_dir / "checkpoints").glob("*.pt"))
    if not files:
        raise FileNotFoundError(f"{run_dir}/checkpoints/ holds no *.pt file (official CogACT layout)")
    return files[-1]


def load_official_weights(model: nn.Module, pretrained: str) -> dict[str, list[str]]:
    """Load each module strictly; returns {"loaded": [...], "kept": [...]} and raises on key mismatches with the
    lists of missing and unexpected keys, and on a module the checkpoint lacks (it would stay randomly initialised):
    only `ema_diffusion` (started from `action_model`, as CogACT does) and, for a model whose ViTs load timm's
    pretrained weights, `vision_backbone` may be absent."""
    run_dir = resolve_run_dir(pretrained)
    checkpoint = find_checkpoint_file(run_dir)
    # Memory-mapped: each tensor is read as it is copied into the model, not a second 30 GB held in RAM.
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["model"]
    report = {"loaded": [], "kept": []}
    problems = []
    for key in (*MODULE_KEYS, "ema_diffusion"):
        module = getattr(model, key, None)
        if module is None:
            continue
        source = state.get(key)
        if source is None and key == "ema_diffusion":
            source = state.get("action_model")  # as CogACT does: EMA starts from the live head
        if source is None:
            if key == "vision_backbone" and getattr(module, "pretrained", False):
                report["kept"].append(key)  # timm's pretrained ViTs, as CogACT keeps them
                continue
            hint = (
                " (a CogACT run trained with a frozen vision backbone saves none: it keeps timm's pretrained ViTs; "
                "set model.vision_backbone.pretrained=true to load them)"
                if key == "vision_backbone"
                else ""
            )
            raise KeyError(
                f"{checkpoint} holds no {key!r} weights (it has {sorted(state)}): the model's {key} would stay "
                f"randomly initialised{hint}"
            )
        if key == "vision_backbone":
            source = project_vision_names(source)
        new_keys = ()
        if key in ("action_model", "ema_diffusion") and module.net.state_embedder is not None:
            source, new_keys = _with_state_token(module, source)
        result = module.load_state_dict(source, strict=False)
        missing = [name for name in result.missing_keys if not name.startswith(new_keys)]
        if missing or result.unexpected_keys:
            problems.append(f"{key}: missing {missing[:20]}, unexpected {result.unexpected_keys[:20]}")
        report["loaded"].append(key)
    if problems:
        raise KeyError(f"{run_dir} does not match the model:\n" + "\n".join(problems))
    return report


def _with_state_token(head: nn.Module, source: dict) -> tuple[dict, tuple[str, ...]]:
    """An official action head's weights for a head with a state token (proprio_input="token"): the positional
    embedding's condition row and action rows go where that head keeps them (rows 0 and 2...), the state token's row
    and its embedder keep their fresh init. Returns the weights and the key prefixes the official file lacks."""
    official = source.get("net.positional_embedding")
    positions = head.net.positional_embedding.detach().clone()
    if official is None or tuple(official.shape) != (positions.shape[0] - 1, *positions.shape[1:]):
        return source, ()  # load_state_dict then reports the mismatch: missing keys or the two shapes
    positions[0], positions[2:] = official[0], official[1:]
    return {**source, "net.positional_embedding": positions}, ("net.state_embedder.",)
