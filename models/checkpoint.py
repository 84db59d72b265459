"""Deployable checkpoint dirs: everything needed to rebuild and run a policy, loadable with one call.

    <ckpt>/config.yaml                the resolved training config (model, robot, dataset, ...)
          dataset_statistics.json     statistics keyed by unnorm_key (CogACT / OpenVLA format)
          norm_stats.json             the same statistics in openpi's format
          model.safetensors           weights
          tokenizer/                  the tokenizer files, so loading never needs the network
          meta.json                   step, metrics, package versions, git revision

Resume-only training state (optimizer, scheduler, RNG) lives apart, under the run's `state/`.
"""

from __future__ import annotations

import json
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file

from datasets.atomic import building_dir, replace_dir, write_json_atomic
from datasets.crop import check_roi
from datasets.statistics import (
    NORM_STATS_FILE,
    STATISTICS_FILE,
    default_unnorm_key,
    load_statistics,
    select_statistics,
    to_norm_stats,
)
from models.finetune import add_lora_adapters, saved_vision_targets
from models.policy import Policy

PACKAGES = ("torch", "transformers", "timm", "peft", "accelerate", "tensorflow-cpu", "tensorflow", "mani_skill")


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    except OSError:
        return None
    return out.stdout.strip() or None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def save_checkpoint(
    ckpt_dir: str | Path,
    model: Policy,
    cfg: DictConfig,
    statistics: dict,
    step: int,
    metrics: dict | None = None,
    trainable_only: bool | set[str] = False,
    state_dict: dict | None = None,
) -> Path:
    """Write the dir atomically: built beside the target, then renamed over it.

    trainable_only: store just the weights that train (LoRA adapters, projector, head, EMA; or the state-dict keys
    given, taken before the model was sharded); loading rebuilds the rest from the base the config references
    (`model.pretrained`). state_dict: the full weights when they were
    gathered from a sharded (FSDP / DeepSpeed) model; by default the model's own.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    with building_dir(ckpt_dir.parent, ckpt_dir.name) as tmp:
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_json_atomic(tmp / STATISTICS_FILE, statistics)
        unnorm_key = default_unnorm_key(statistics, cfg.get("unnorm_key"))
        if unnorm_key is not None:  # openpi's file holds one dataset's statistics
            write_json_atomic(tmp / NORM_STATS_FILE, to_norm_stats(select_statistics(statistics, unnorm_key)[1]))
        state = state_dict if state_dict is not None else model.state_dict()
        if trainable_only:
            trained = trainable_only if isinstance(trainable_only, set) else model.trained_state_keys()
            state = {k: v for k, v in state.items() if k in trained}
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        tokenizer = getattr(getattr(model, "llm_backbone", None), "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        meta = {
            "step": step,
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            "unnorm_key": unnorm_key,
            "weights": "trainable_only" if trainable_only else "full",
            "base": cfg.model.get("pretrained") if trainable_only else None,
            "model_class": f"{type(model).__module__}.{type(model).__name__}",
            "packages": package_versions(),
            "git_revision": git_revision(),
        }
        write_json_atomic(tmp / "meta.json", meta)
        replace_dir(tmp, ckpt_dir)
    return ckpt_dir


def load_config(ckpt_dir: str | Path) -> DictConfig:
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_file():
        raise FileNotFoundError(
            f"{ckpt_dir} is a file; ckpt= takes the checkpoint dir that holds it ({ckpt_dir.parent})"
        )
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint dir {ckpt_dir} does not exist")
    for name in ("config.yaml", "model.safetensors", STATISTICS_FILE):
        if not (ckpt_dir / name).is_file():
            saved = sorted(p.name for p in (ckpt_dir / "checkpoints").glob("step_*"))
            hint = f"; it is a training run: pass one of its checkpoints/{saved[-3:]}" if saved else ""
            if not saved and (steps := sorted(p.name for p in ckpt_dir.glob("step_*"))):
                hint = f"; it holds checkpoints: pass one of {steps[-3:]}"
            raise FileNotFoundError(f"{ckpt_dir} is not a checkpoint dir: {name} is missing{hint}")
    return OmegaConf.load(ckpt_dir / "config.yaml")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def inference_dtype(name: str, device: str) -> torch.dtype:
    """The dtype a served VLM's weights take: "auto" is bfloat16 on a GPU (as CogACT and OpenVLA serve, half the
    memory of float32) and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: expected auto, {' or '.join(DTYPES)}")
    return DTYPES[name]


def load_policy(
    ckpt_dir: str | Path,
    device: str = "cpu",
    unnorm_key: str | None = None,
    sampling: dict | None = None,
    dtype: str = "float32",
) -> Policy:
    """Rebuild the policy from <ckpt>/config.yaml, load its weights and statistics; ready for inference.
    `sampling` overrides inference-only model settings (CogACT: cfg_scale, ddim_steps); a None value keeps the
    checkpoint's. dtype: the backbone's weights (see inference_dtype; the action head stays float32)."""
    ckpt_dir = Path(ckpt_dir)
    backbone_dtype = inference_dtype(dtype, device)
    cfg = load_config(ckpt_dir)
    meta = json.loads((ckpt_dir / "meta.json").read_text()) if (ckpt_dir / "meta.json").is_file() else {}
    # The statistics and the key they un-normalize with are checked before the (for a 7B model, minutes-long) build.
    statistics = load_statistics(ckpt_dir)
    unnorm_key = unnorm_key or cfg.get("unnorm_key")
    try:
        select_statistics(statistics, unnorm_key)
    except KeyError as error:
        raise ValueError(f"{ckpt_dir}: {error.args[0]}") from None
    trainable_only = meta.get("weights") == "trainable_only"
    # A full checkpoint holds every weight: never fetch base weights again. A LoRA one rebuilds its base first.
    overrides: dict = {"pretrained": None} if "pretrained" in cfg.model and not trainable_only else {}
    if not trainable_only and (cfg.model.get("vision_backbone") or {}).get("pretrained"):
        overrides["vision_backbone"] = {**OmegaConf.to_container(cfg.model.vision_backbone), "pretrained": False}
    for key, value in (sampling or {}).items():
        if value is None:
            continue
        if key not in cfg.model:
            raise ValueError(f"sampling.{key}: the checkpoint's model ({cfg.model.get('_target_')}) has no {key}")
        overrides[key] = value
    if "llm_backbone" in cfg.model:
        llm_cfg = OmegaConf.to_container(cfg.model.llm_backbone)
        if (ckpt_dir / "tokenizer").is_dir():
            llm_cfg["tokenizer"] = str(ckpt_dir / "tokenizer")
        if "strip_prompt" not in llm_cfg:  # saved before 2026-12-02: rebuilt as it was trained
            llm_cfg |= {"strip_prompt": False, "rms_norm_eps": llm_cfg.get("rms_norm_eps", 1e-6)}
        overrides["llm_backbone"] = llm_cfg
    try:
        model = instantiate(cfg.model, **overrides)
    except InstantiationException as error:  # the model's own refusal (e.g. a sampling setting), without Hydra's wrap
        if isinstance(error.__cause__, ValueError):
            raise ValueError(f"{ckpt_dir}: {error.__cause__}") from error
        raise
    finetune = cfg.get("finetune") or {}
    weights = ckpt_dir / "model.safetensors"
    try:
        if finetune.get("mode") == "lora":
            lora = OmegaConf.to_container(finetune.get("lora") or OmegaConf.create({}))
            lora.setdefault("vision_targets", saved_vision_targets(weights))
            add_lora_adapters(model, **lora)
        if trainable_only:
            state = load_file(str(weights))
            unexpected = sorted(set(state) - set(model.state_dict()))
            if unexpected:
                raise KeyError(f"{weights} has keys the model lacks: {unexpected[:10]}")
            model.load_state_dict(state, strict=False)
        else:
            load_model(model, str(weights), strict=True, device="cpu")
    except SafetensorError as error:
        raise ValueError(f"{weights} cannot be read ({error}): truncated or not a safetensors file") from None
    model.cast_backbone(backbone_dtype)
    model.set_statistics(statistics, unnorm_key)
    loader = cfg.get("loader") or {}
    model.center_crop = bool(loader.get("augment", False))
    model.image_roi = check_roi(loader.get("image_roi"))
    model.camera_size = (cfg.get("robot") or {}).get("camera_size")
    # Named by its run and step dir (<run>/checkpoints/step_N -> "<run>/step_N"): no server path goes to clients.
    resolved = ckpt_dir.resolve()
    run = f"{resolved.parent.parent.name}/" if resolved.parent.name == "checkpoints" else ""
    model.checkpoint = {"name": f"{run}{resolved.name}", "step": meta.get("step")}
    return model.to(torch.device(device)).eval()
