"""Validation on held-out episodes: diffusion loss, per-dimension L1 / MSE of sampled, un-normalized actions against
the data, gripper accuracy, and a PNG of predicted against true action trajectories."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from datasets.rlds import iterate_torch
from datasets.statistics import unnormalize
from models.policy import Policy


@torch.no_grad()
def validate(
    model: Policy, dataset, statistics: dict, keys: list[str], max_batches: int, plot_path: Path | None = None
) -> dict[str, float]:
    """keys[i]: the statistics key of the dataset whose frames carry dataset_index i."""
    was_training = model.training
    model.eval()
    losses, aux_losses, predicted, true, dataset_index, frame_index = [], [], [], [], [], []
    generator = torch.Generator().manual_seed(0)
    for i, batch in enumerate(iterate_torch(dataset)):
        if i >= max_batches:
            break
        # The loss's noise and timesteps come from the global RNG: drawn from a fixed seed here, so that checkpoints
        # (keep_best) and sweeps (the returned metric) are compared on the same draws, and training's stream is
        # left where it was (an exact resume does not depend on when validation ran).
        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(i)
            loss, parts = model.compute_loss(batch)
        losses.append(float(parts.get("loss", loss)))  # the action loss, also when a model adds auxiliary losses
        if "aux_loss" in parts:
            aux_losses.append(float(parts["aux_loss"]))
        extra = {"wrist_images": batch.get("wrist_image")} if model.reads_wrist_image else {}
        sample = model.predict_normalized(batch["image"], batch["prompt"], batch.get("state"), generator, **extra)
        predicted.append(sample[:, 0].float().cpu().numpy())  # the action for the current step
        true.append(batch["action"][:, 0].float().numpy())
        dataset_index.append(batch["dataset_index"].numpy())
        frame_index.append(batch["frame_index"].numpy())
    model.train(was_training)
    if not losses:
        return {}
    predicted, true = np.concatenate(predicted), np.concatenate(true)
    dataset_index, frame_index = np.concatenate(dataset_index), np.concatenate(frame_index)
    predicted_raw, true_raw = np.empty_like(predicted), np.empty_like(true)
    for i, key in enumerate(keys):
        rows = dataset_index == i
        action_stats = statistics[key]["action"]
        predicted_raw[rows] = unnormalize(predicted[rows], action_stats)
        true_raw[rows] = unnormalize(true[rows], action_stats, binarize_gripper=False)
    error = predicted_raw - true_raw
    metrics = {
        "val/loss": float(np.mean(losses)),
        "val/l1": float(np.abs(error[:, :-1]).mean()),
        "val/gripper_acc": float(((predicted_raw[:, -1] >= 0.5) == (true_raw[:, -1] >= 0.5)).mean()),
    }
    if aux_losses:
        metrics["val/aux_loss"] = float(np.mean(aux_losses))
    for d in range(error.shape[1]):
        metrics[f"val/l1_dim{d}"] = float(np.abs(error[:, d]).mean())
        metrics[f"val/mse_dim{d}"] = float((error[:, d] ** 2).mean())
    if plot_path is not None:
        plot_trajectories(plot_path, predicted_raw, true_raw, frame_index)
    return metrics


def plot_trajectories(path: Path, predicted: np.ndarray, true: np.ndarray, frame_index: np.ndarray, episodes: int = 3):
    """One column per action dimension, one row per episode (frames in order; a frame_index of 0 starts one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = [*np.flatnonzero(frame_index == 0), len(frame_index)]
    spans = [(a, b) for a, b in itertools.pairwise(starts)][:episodes] or [(0, len(frame_index))]
    dims = predicted.shape[1]
    fig, axes = plt.subplots(len(spans), dims, figsize=(2.2 * dims, 1.8 * len(spans)), squeeze=False)
    names = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"] if dims == 7 else [f"a{d}" for d in range(dims)]
    for row, (a, b) in enumerate(spans):
        for d in range(dims):
            ax = axes[row][d]
            ax.plot(true[a:b, d], color="black", linewidth=1, label="data")
            ax.plot(predicted[a:b, d], color="tab:orange", linewidth=1, label="predicted")
            ax.tick_params(labelsize=6)
            if row == 0:
                ax.set_title(names[d], fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
