"""Where a run keeps its checkpoints, which ones it keeps, and its resume-only training state.

<run>/checkpoints/step_000500/     deployable (models.checkpoint)      kept: the last k and the best k
<run>/checkpoints/index.json       every kept checkpoint with its metrics, and the best one
<run>/state/                       resume-only: accelerate state (model, optimizer, scheduler, RNG) + trainer.json
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open

from datasets.atomic import replace_dir, write_json_atomic
from datasets.statistics import STATISTICS_FILE
from models.policy import Policy

STEP_PREFIX = "step_"
# Top-level keys a resumed run may change: how long it runs and what it records, not what or how it trains.
RESUMABLE_KEYS = frozenset(
    {
        "resume",
        "device",
        "max_steps",
        "log_every",
        "save_every",
        "val_every",
        "val_batches",
        "checkpoint",
        "logger",
        "paths",
    }
)
# The path settings (under `paths`) whose values a resumed run may change: where the data and the cache lie.
MOVABLE_PATHS = ("data_dir", "cache_dir")
# Nested settings only evaluation reads (eval_maniskill.py's action mapping): they may change on resume too.
EVAL_ONLY_PREFIXES = ("robot.action_scale.",)
# Settings added after runs were saved without them, with the value that gives the behaviour those runs trained with.
ADDED_SETTINGS = {"dataset.balance_weights": False, "finetune.lora.projector": False, "cast_frozen": False}


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob(f"{STEP_PREFIX}[0-9]*"))


def _metric(ckpt: Path, name: str) -> float:
    meta = ckpt / "meta.json"
    value = json.loads(meta.read_text()).get("metrics", {}).get(name) if meta.is_file() else None
    return float(value) if value is not None else math.inf


def prune_checkpoints(run_dir: Path, keep_last: int, keep_best: int, metric: str) -> dict:
    """Delete checkpoints that are neither among the last `keep_last` nor the best `keep_best` (lowest metric);
    writes checkpoints/index.json. Returns the index."""
    checkpoints = list_checkpoints(run_dir)
    by_metric = sorted((c for c in checkpoints if math.isfinite(_metric(c, metric))), key=lambda c: _metric(c, metric))
    keep = set(checkpoints[-keep_last:] if keep_last > 0 else []) | set(by_metric[:keep_best])
    for ckpt in checkpoints:
        if ckpt not in keep:
            shutil.rmtree(ckpt)
    kept = [c for c in checkpoints if c in keep]
    best = next((c for c in by_metric if c in keep), None)  # with keep_best=0, the best of those kept
    index = {
        "metric": metric,
        "best": str(best) if best else None,
        "latest": str(kept[-1]) if kept else None,
        "checkpoints": {c.name: _metric(c, metric) for c in kept},
    }
    write_json_atomic(
        run_dir / "checkpoints" / "index.json",
        {**index, "checkpoints": {k: (v if math.isfinite(v) else None) for k, v in index["checkpoints"].items()}},
    )
    return index


def _unprefixed(key: str) -> str:
    return key.removeprefix("module.")  # a DDP wrapper's state-dict names


def keep_trained_weights(accelerator: Accelerator, policy: Policy, trained: set[str]) -> None:
    """Have the resume state hold only the weights that train (Policy.trained_state_keys): under LoRA on a 7B model
    that is a few hundred MB instead of the whole frozen base (about 30 GB in float32) at every save. The frozen
    rest is rebuilt from the base, as at the start of the run. FSDP and DeepSpeed states are left as accelerate saves
    them (launch/fsdp.yaml's FULL_STATE_DICT gathers the whole model and optimizer on rank 0: host RAM to match).
    `trained`: Policy.trained_state_keys(), taken before accelerate wrapped the model."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    if len(trained) == len(policy.state_dict()):
        return

    def drop_frozen(models: list, weights: list[dict], output_dir: str) -> None:
        for state in weights:
            for key in [k for k in state if _unprefixed(k) not in trained]:
                del state[key]

    accelerator.register_save_state_pre_hook(drop_frozen)


def save_training_state(accelerator: Accelerator, run_dir: Path, trainer_state: dict) -> None:
    """Replace <run>/state atomically (written beside it, then renamed); all ranks must call this."""
    final, tmp = run_dir / "state", run_dir / ".state.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its own RNG state into tmp
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / "trainer.json", trainer_state)
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()


def _flatten(tree: object, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def run_settings(cfg: DictConfig) -> dict:
    """What the run trains and how, as {dotted key: resolved value}: every key of cfg but RESUMABLE_KEYS."""
    tree = {}
    for key in cfg:
        if key in RESUMABLE_KEYS:
            continue
        node = cfg[key]
        tree[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    settings = json.loads(json.dumps(_flatten(tree)))  # as trainer.json stores them (tuples become lists)
    paths = movable_paths(cfg)
    return {k: _unpathed(v, paths) for k, v in settings.items() if not k.startswith(EVAL_ONLY_PREFIXES)}


def movable_paths(cfg: DictConfig) -> dict[str, str]:
    """{"<paths.data_dir>": its value now, ...}: the dirs a run's data and cache may move between on resume (to a
    node's local disk, another cwd). Settings name what lies under them by these names; the statistics check
    (check_resume_statistics) guards the data itself."""
    values = {key: OmegaConf.select(cfg, f"paths.{key}", throw_on_resolution_failure=False) for key in MOVABLE_PATHS}
    return {f"<paths.{key}>": str(value) for key, value in values.items() if value is not None}


def _unpathed(value: object, paths: dict[str, str]) -> object:
    if isinstance(value, str):
        for name, path in sorted(paths.items(), key=lambda item: -len(item[1])):  # data/cache before data
            if value == path or value.startswith(path.rstrip("/") + "/"):
                return name + value[len(path.rstrip("/")) :]
        return value
    if isinstance(value, list):
        return [_unpathed(item, paths) for item in value]
    if isinstance(value, dict):
        return {key: _unpathed(item, paths) for key, item in value.items()}
    return value


def check_resume_settings(
    trainer_state: dict, now: dict, run_dir: Path, num_processes: int = 1, paths: dict[str, str] | None = None
) -> None:
    """A resumed run trains with the settings its first part did (`now`: this command's run_settings; a different
    batch size would also shift the data position), on as many processes: ValueError naming every setting that
    differs, with the command line the run was started with. paths: movable_paths of this command, to read the
    settings of runs saved before they were stored by path name (their data must lie where it lay)."""
    processes = trainer_state.get("num_processes", num_processes)
    if processes != num_processes:
        raise ValueError(
            f"resume=true continues {run_dir}, which trained on {processes} process(es), on {num_processes}: the "
            "global batch and every rank's slice of the data would change; launch it as it was launched"
        )
    saved = trainer_state.get("settings")
    if saved is None:  # a state saved before the settings were recorded
        return
    saved = {k: _unpathed(v, paths or {}) for k, v in saved.items() if not k.startswith(EVAL_ONLY_PREFIXES)}

    def value(settings: dict, key: str) -> object:
        return settings.get(key, ADDED_SETTINGS.get(key, "<unset>"))

    differ = sorted(k for k in saved.keys() | now.keys() if value(saved, k) != value(now, k))
    if not differ:
        return
    rows = "\n".join(f"  {k}: the run has {value(saved, k)!r}, this command {value(now, k)!r}" for k in differ)
    overrides = " ".join(trainer_state.get("overrides") or [])
    if "scheduler.num_training_steps" in differ:
        rows += (
            "\n  (the schedule's length is max_steps: a longer run changes the learning rate of the steps already "
            "taken; max_steps may change with scheduler=constant)"
        )
    raise ValueError(
        f"resume=true continues {run_dir} with the settings it started with, but these differ:\n{rows}\n"
        f"Start it as it was started: python train.py {overrides} resume=true hydra.run.dir={run_dir} "
        f"(only {', '.join(sorted(RESUMABLE_KEYS - {'resume'}))} may change on resume)"
    )


def check_resume_statistics(run_dir: Path, statistics: dict) -> None:
    """A resumed run normalizes as its first part did: ValueError naming the entries of the statistics computed now
    that differ from the run's dataset_statistics.json (the data changed under the run)."""
    path = run_dir / STATISTICS_FILE
    if not path.is_file():
        return
    saved = _flatten(json.loads(path.read_text()))
    now = _flatten(json.loads(json.dumps(statistics)))
    differ = sorted(k for k in saved.keys() | now.keys() if not _same(saved.get(k), now.get(k)))
    if differ:
        raise ValueError(
            f"resume=true, but the dataset's statistics differ from those {run_dir} trained with ({path}): "
            f"{', '.join(differ[:8])}{' ...' if len(differ) > 8 else ''}. The data changed under the run: "
            "restore it, or start a new run"
        )


def _same(a: object, b: object) -> bool:
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def read_trainer_state(run_dir: Path) -> dict:
    """<run>/state/trainer.json: step, data position, best metric, the run's settings and command-line overrides."""
    state_dir = run_dir / "state"
    if not (state_dir / "trainer.json").is_file():
        raise FileNotFoundError(
            f"resume=true but {state_dir} holds no training state; point hydra.run.dir at the run to continue"
        )
    return json.loads((state_dir / "trainer.json").read_text())


def load_training_state(accelerator: Accelerator, run_dir: Path, policy: Policy) -> None:
    """Model, optimizer, scheduler and every rank's RNG from <run>/state. A state holding only the trained weights
    (keep_trained_weights) must hold exactly those: then the frozen rest keeps the values the model was built with."""
    state_dir = run_dir / "state"
    weights = state_dir / "model.safetensors"
    partial = False
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            saved = {_unprefixed(k) for k in f.keys()}
        every, trained = set(policy.state_dict()), policy.trained_state_keys()
        partial = saved != every
        if partial and saved != trained:
            raise ValueError(
                f"{weights} does not hold the weights this run trains: missing {sorted(trained - saved)[:5]}, "
                f"unexpected {sorted(saved - trained)[:5]} (a different model or finetune mode?)"
            )
    accelerator.load_state(str(state_dir), strict=not partial)
