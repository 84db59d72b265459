"""dataset_statistics.json (CogACT / OpenVLA format) and BOUNDS_Q99 normalization. No TensorFlow here.

{"<unnorm_key>": {"action":  {"mean", "std", "max", "min", "q01", "q99", "mask"},
                  "proprio": {"mean", "std", "max", "min", "q01", "q99"},
                  "num_transitions": N, "num_trajectories": M}}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

STATISTICS_FILE = "dataset_statistics.json"
NORM_STATS_FILE = "norm_stats.json"
_EPS = 1e-8


def summarize(values: np.ndarray) -> dict[str, list[float]]:
    """mean/std/max/min/q01/q99 over axis 0 of values [N, D] (as OpenVLA: population std, linear quantiles)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or len(values) == 0:
        raise ValueError(f"statistics need a non-empty [N, D] array, got shape {values.shape}")
    return {
        "mean": values.mean(0).tolist(),
        "std": values.std(0).tolist(),
        "max": values.max(0).tolist(),
        "min": values.min(0).tolist(),
        "q01": np.quantile(values, 0.01, axis=0).tolist(),
        "q99": np.quantile(values, 0.99, axis=0).tolist(),
    }


def normalize(x: np.ndarray, stats: dict, mask: np.ndarray | None = None) -> np.ndarray:
    """BOUNDS_Q99: x_n = clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1) on masked dims; dims with min == max -> 0."""
    x = np.asarray(x, dtype=np.float32)
    q01, q99 = np.asarray(stats["q01"], np.float32), np.asarray(stats["q99"], np.float32)
    mask = _mask(stats, x.shape[-1]) if mask is None else np.asarray(mask, bool)
    normed = np.clip(2 * (x - q01) / (q99 - q01 + _EPS) - 1, -1, 1)
    constant = np.asarray(stats["min"], np.float32) == np.asarray(stats["max"], np.float32)
    normed = np.where(constant, 0.0, normed)
    return np.where(mask, normed, x).astype(np.float32)


def unnormalize(x_n: np.ndarray, stats: dict, binarize_gripper: bool = True) -> np.ndarray:
    """Inverse at inference (CogACT): clip to [-1, 1], gripper (last dim) -> {0, 1} at 0.5, then
    act = where(mask, 0.5 (a + 1)(q99 - q01) + q01, a). The gripper is binarized only where it is not normalized
    (mask false, CogACT's case): a normalized one (e.g. -1 close / +1 open) is un-normalized like the other dims."""
    a = np.clip(np.asarray(x_n, dtype=np.float32), -1, 1)
    q01, q99 = np.asarray(stats["q01"], np.float32), np.asarray(stats["q99"], np.float32)
    mask = _mask(stats, a.shape[-1])
    if binarize_gripper and not mask[-1]:
        a[..., -1] = (a[..., -1] >= 0.5).astype(np.float32)
    return np.where(mask, 0.5 * (a + 1) * (q99 - q01) + q01, a).astype(np.float32)


def check_unnormalized_ranges(statistics: dict) -> None:
    """The action dimensions left un-normalized (mask false) must already lie where `unnormalize` returns them: in
    [-1, 1] (it clips), and the last one, the gripper, in [0, 1] (it is binarized at 0.5, CogACT's 1 = open). A
    gripper recorded as -1 / +1 or in degrees would train on one scale and be served on another: ValueError."""
    for key, entry in statistics.items():
        action = entry["action"]
        dims = len(action["min"])
        for d in np.flatnonzero(~_mask(action, dims)):
            low, high = (0.0, 1.0) if d == dims - 1 else (-1.0, 1.0)
            found = (float(action["min"][d]), float(action["max"][d]))
            if found[0] < low - 1e-6 or found[1] > high + 1e-6:
                what = "the gripper, binarized at 0.5 at inference" if d == dims - 1 else "clipped at inference"
                raise ValueError(
                    f"statistics {key!r}: action dim {d} is not normalized (action_mask false) and lies in "
                    f"[{found[0]:g}, {found[1]:g}], outside [{low:g}, {high:g}] ({what}): map it with the source's "
                    "action_transform (e.g. gripper_signed_to_unit for -1 close / +1 open) or normalize it "
                    "(action_mask true)"
                )


def _mask(stats: dict, dim: int) -> np.ndarray:
    mask = np.asarray(stats.get("mask", [True] * dim), dtype=bool)
    if mask.shape != (dim,):
        raise ValueError(f"statistics mask has {mask.shape[0]} dims, the values have {dim}")
    return mask


def load_statistics(path: str | Path) -> dict:
    """Read a dataset_statistics.json file (or the one inside a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / STATISTICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no dataset statistics at {path} (expected {STATISTICS_FILE})")
    try:
        stats = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); expected {STATISTICS_FILE}'s map of datasets") from None
    if not isinstance(stats, dict):
        raise ValueError(f"{path} holds a JSON {type(stats).__name__}; expected a map of unnorm_key -> statistics")
    for key, entry in stats.items():
        if not isinstance(entry, dict) or "action" not in entry or "q01" not in entry["action"]:
            raise ValueError(f"{path}: entry {key!r} lacks action.q01/q99; not a dataset_statistics.json")
    return stats


def default_unnorm_key(stats: dict, unnorm_key: str | None) -> str | None:
    """unnorm_key when given, else the only key of the statistics; None when they hold several (one must be named)."""
    return unnorm_key or (next(iter(stats)) if len(stats) == 1 else None)


def select_statistics(stats: dict, unnorm_key: str | None) -> tuple[str, dict]:
    """The entry for unnorm_key; it may be omitted only when the file holds exactly one key."""
    unnorm_key = default_unnorm_key(stats, unnorm_key)
    if unnorm_key is None:
        raise ValueError(f"these statistics hold several datasets {sorted(stats)}: pass unnorm_key=<one of them>")
    if unnorm_key not in stats:
        raise KeyError(f"unnorm_key {unnorm_key!r} not in the statistics; available: {sorted(stats)}")
    return unnorm_key, stats[unnorm_key]


def to_norm_stats(entry: dict) -> dict:
    """openpi's norm_stats.json for one dataset entry."""
    keep = ("mean", "std", "q01", "q99")
    out = {"actions": {k: entry["action"][k] for k in keep}}
    if "proprio" in entry:
        out["state"] = {k: entry["proprio"][k] for k in keep}
    return {"norm_stats": out}
