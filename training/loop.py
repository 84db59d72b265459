"""One accelerate training loop: data -> policy.compute_loss -> optimizer, with validation, logging and checkpoints."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from datasets.rlds import LoaderConfig, compute_all_statistics, iterate_torch, make_frame_dataset, sources_from_config
from datasets.statistics import STATISTICS_FILE, write_json_atomic
from models.checkpoint import save_checkpoint
from models.finetune import apply_finetune_mode
from models.policy import Policy


def check_import_hygiene() -> None:
    """HF `datasets` would be shadowed by this repo's datasets/ package and breaks accelerate's data loading."""
    spec = importlib.util.find_spec("datasets")
    repo = Path(__file__).resolve().parent.parent
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != repo / "datasets":
        raise RuntimeError(f"`import datasets` resolves to {spec and spec.origin}, not {repo / 'datasets'}")
    try:
        importlib.metadata.version("datasets")
    except importlib.metadata.PackageNotFoundError:
        return
    raise RuntimeError(
        "HF `datasets` is installed in this environment; it clashes with this repo's datasets/ package. "
        "Remove it: pip uninstall -y datasets"
    )


class JsonlLogger:
    """metrics.jsonl in the run dir, plus wandb when configured."""

    def __init__(self, path: Path, cfg: DictConfig, enabled: bool) -> None:
        self.path, self.enabled, self.wandb = path, enabled, None
        wandb_cfg = cfg.logger.get("wandb") if cfg.get("logger") else None
        if enabled and wandb_cfg is not None and wandb_cfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                mode=wandb_cfg.mode,
                tags=list(wandb_cfg.tags),
                dir=str(path.parent),
                config=OmegaConf.to_container(cfg, resolve=True),
            )

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _loader_config(cfg: DictConfig, model: Policy) -> LoaderConfig:
    return LoaderConfig(
        image_size=model.image_size,
        window=model.action_horizon,
        action_dim=cfg.robot.action_dim,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        **OmegaConf.to_container(cfg.loader),
    )


@torch.no_grad()
def validate(model: Policy, dataset, statistics: dict, max_batches: int) -> dict[str, float]:
    """Diffusion loss on held-out episodes, plus L1 / gripper accuracy of sampled (normalized) chunks."""
    model.eval()
    losses, l1, gripper = [], [], []
    for i, batch in enumerate(iterate_torch(dataset)):
        if i >= max_batches:
            break
        loss, _ = model.compute_loss(batch)
        losses.append(loss.item())
        predicted = model.predict_normalized(batch["image"], batch["prompt"]).float().cpu().clamp(-1, 1)
        true = batch["action"].float()
        l1.append((predicted - true).abs().mean().item())
        gripper.append(((predicted[..., -1] >= 0.5) == (true[..., -1] >= 0.5)).float().mean().item())
    model.train()
    if not losses:
        return {}
    return {
        "val/loss": float(np.mean(losses)),
        "val/action_l1": float(np.mean(l1)),
        "val/gripper_acc": float(np.mean(gripper)),
    }


def train(cfg: DictConfig) -> dict:
    """Runs the configured finetune; returns {"checkpoint": dir, "metric": best val loss, else the last train loss}."""
    check_import_hygiene()
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum_steps
    )
    set_seed(cfg.seed, device_specific=True)
    run_dir = Path(cfg.paths.output_dir)

    sources = sources_from_config(cfg.dataset)
    with accelerator.main_process_first():
        statistics = compute_all_statistics(sources, cfg.robot.action_dim, cfg.paths.cache_dir)
    if accelerator.is_main_process:
        write_json_atomic(run_dir / STATISTICS_FILE, statistics)

    model: Policy = instantiate(cfg.model)
    if model.action_dim != cfg.robot.action_dim:
        raise ValueError(f"model.action_dim={model.action_dim} but robot.action_dim={cfg.robot.action_dim}")
    counts = apply_finetune_mode(model, cfg.finetune.mode, OmegaConf.to_container(cfg.finetune.get("lora") or {}))
    unnorm_key = cfg.unnorm_key or sources[0].key
    model.set_statistics(statistics, unnorm_key)
    accelerator.print(
        f"model: {type(model).__name__} {counts['total'] / 1e6:.2f}M params, {counts['trainable'] / 1e6:.2f}M trainable"
    )

    loader_cfg = _loader_config(cfg, model)
    train_data = iterate_torch(
        make_frame_dataset(
            sources, statistics, loader_cfg, "train", accelerator.process_index, accelerator.num_processes
        ),
        sources,
    )
    val_data = make_frame_dataset(sources, statistics, loader_cfg, "val") if loader_cfg.val_fraction > 0 else None

    optimizer = instantiate(cfg.optimizer)([p for p in model.parameters() if p.requires_grad])
    scheduler = instantiate(cfg.scheduler)(optimizer)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    policy: Policy = accelerator.unwrap_model(model)

    logger = JsonlLogger(run_dir / "metrics.jsonl", cfg, accelerator.is_main_process)
    final_cfg = OmegaConf.merge(cfg, {"unnorm_key": unnorm_key})
    step, best, last_loss, checkpoint = 0, math.inf, math.nan, None
    progress = tqdm(total=cfg.max_steps, desc="train", disable=not accelerator.is_main_process, dynamic_ncols=True)
    started, frames = time.perf_counter(), 0
    model.train()
    while step < cfg.max_steps:
        batch = next(train_data)
        with accelerator.accumulate(model):
            loss, _ = model(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {step}; stopping (last good checkpoint: {checkpoint})"
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        frames += len(batch["prompt"]) * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue
        step += 1
        policy.on_optimizer_step()
        last_loss = accelerator.gather(loss.detach()).mean().item()
        progress.update(1)
        progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            elapsed = time.perf_counter() - started
            logger.log(
                step,
                {
                    "train/loss": last_loss,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/frames_per_s": frames / elapsed,
                },
            )
        metrics = {"train/loss": last_loss}
        if (
            val_data is not None
            and (step % cfg.val_every == 0 or step == cfg.max_steps)
            and accelerator.is_main_process
        ):
            metrics.update(validate(policy, val_data, statistics, cfg.val_batches))
            logger.log(step, metrics)
            best = min(best, metrics.get("val/loss", best))
        if (step % cfg.save_every == 0 or step == cfg.max_steps) and accelerator.is_main_process:
            checkpoint = save_checkpoint(
                run_dir / "checkpoints" / f"step_{step:06d}",
                policy,
                final_cfg,
                statistics,
                step,
                metrics,
                trainable_only=cfg.finetune.mode == "lora" and bool(cfg.model.get("pretrained")),
            )
        accelerator.wait_for_everyone()
    progress.close()
    logger.close()
    return {"checkpoint": str(checkpoint), "metric": best if math.isfinite(best) else last_loss}
