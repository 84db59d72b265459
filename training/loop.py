"""One accelerate training loop: data -> policy.compute_loss -> optimizer, with validation, logging, checkpoints and
exact resume. CPU, one GPU, DDP, FSDP and DeepSpeed all come from `accelerate launch` (see launch/)."""

from __future__ import annotations

import copy
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    InitProcessGroupKwargs,
    broadcast_object_list,
    set_seed,
)
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm import tqdm

from datasets.atomic import write_json_atomic
from datasets.rlds import (
    LoaderConfig,
    balance_by_size,
    compute_all_statistics,
    count_episodes,
    image_side,
    iterate_torch,
    make_frame_dataset,
    open_builder,
    sources_from_config,
)
from datasets.statistics import STATISTICS_FILE, check_unnormalized_ranges, default_unnorm_key
from models.checkpoint import save_checkpoint
from models.finetune import apply_finetune, saved_vision_targets
from models.policy import Policy
from serving.observation import check_observation_keys
from training.checkpoints import (
    check_resume_settings,
    check_resume_statistics,
    keep_trained_weights,
    list_checkpoints,
    load_training_state,
    movable_paths,
    prune_checkpoints,
    read_trainer_state,
    run_settings,
    save_training_state,
)
from training.validation import validate


def _fsdp_version(accelerator: Accelerator) -> int | None:
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    return accelerator.state.fsdp_plugin.fsdp_version


def casts_frozen(cfg: DictConfig, accelerator: Accelerator) -> bool:
    """Whether this run stores its frozen backbone weights in bf16: cast_frozen under mixed_precision=bf16, but not
    under FSDP or DeepSpeed, which flatten a block's weights into one tensor of one dtype (and DeepSpeed's bf16 casts
    the whole model itself). The run's settings record this, not cast_frozen itself: it changes nothing elsewhere."""
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    return bool(cfg.get("cast_frozen", False)) and accelerator.mixed_precision == "bf16" and not sharded


def cast_frozen_weights(model: Policy, cfg: DictConfig, accelerator: Accelerator) -> int:
    """Store the frozen backbone weights in bf16 when the run does (casts_frozen): half their memory (a LoRA run's 7B
    base: 15 GB, not 30), as OpenVLA loads its LoRA base. Norms and embeddings then also compute from bf16 weights
    (autocast's matmuls did already). Returns the number of weights cast."""
    return model.cast_backbone(torch.bfloat16, frozen_only=True) if casts_frozen(cfg, accelerator) else 0


def check_gradients(
    accelerator: Accelerator, model: torch.nn.Module, max_grad_norm: float, step: int, checkpoint: object
) -> None:
    """Clip the gradients to max_grad_norm (0: none) and stop the run, before the update, when their norm is not
    finite: one NaN gradient would make every weight NaN, and the next checkpoint and resume state with it. Under
    fp16 the loss scaler skips such steps itself. DeepSpeed's engine clips by its own config and has already stepped
    in backward(): nothing is checked there."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    if norm is None or accelerator.mixed_precision == "fp16" or torch.isfinite(torch.as_tensor(norm)):
        return
    raise FloatingPointError(
        f"the gradient norm is {float(norm)} at step {step}; stopped before the update. Latest checkpoint: {checkpoint}"
    )


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


class MetricsLogger:
    """metrics.jsonl in the run dir, plus wandb when configured (main process only)."""

    def __init__(self, path: Path, cfg: DictConfig, enabled: bool) -> None:
        self.path, self.enabled, self.wandb = path, enabled, None
        wandb_cfg = (cfg.get("logger") or {}).get("wandb")
        if enabled and wandb_cfg is not None and wandb_cfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                mode=wandb_cfg.mode,
                tags=list(wandb_cfg.tags),
                dir=str(path.parent),
                config=OmegaConf.to_container(cfg, resolve=True),
                reinit="finish_previous",  # a sweep's next job is a run of its own, even after a failed one
            )

    def forget_after(self, step: int) -> None:
        """Drop the records of steps after `step` (a resumed run trains them again), rewriting the file atomically."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if (record := _record_step(line)) is not None and record <= step]
        if len(kept) != len(lines):
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(kept))
            tmp.replace(self.path)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None


def _record_step(line: str) -> int | None:
    """A metrics.jsonl record's step; None for a line a killed run left half-written (only the last can be)."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return None


def _loader_config(cfg: DictConfig, model: Policy) -> LoaderConfig:
    return LoaderConfig(
        image_size=model.image_size,
        window=model.action_horizon,
        action_dim=cfg.robot.action_dim,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        use_state=bool(model.proprio_dim),  # only what the model reads: then sources of other state sizes mix
        use_aux=bool(getattr(model, "aux_dim", None)),
        **OmegaConf.to_container(cfg.loader, resolve=True),
    )


def _command_line_overrides() -> list[str] | None:
    """The overrides train.py was started with (Hydra's task overrides), or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def _accelerator(cfg: DictConfig) -> Accelerator:
    """mixed_precision null: the launcher's (an accelerate config's `mixed_precision`), else none. The batch size,
    gradient accumulation and clipping are this run's, also under DeepSpeed, which reads them from its own config."""
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    # Some parameters are not used at every step (the CFG `uncondition` token only when dropout picks it; the
    # official layout's unused history embedder): DDP must not wait for their gradients.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # The other ranks wait in a barrier while rank 0 writes a checkpoint and the resume state: for a full 7B
    # finetune over 100 GB, which slow storage can take longer than NCCL's 10 minutes for.
    process_group = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=60))
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        kwargs_handlers=[ddp, process_group],
    )
    if accelerator.gradient_accumulation_steps != cfg.grad_accum_steps:
        raise ValueError(
            f"grad_accum_steps={cfg.grad_accum_steps} but the launcher sets {accelerator.gradient_accumulation_steps} "
            "(ACCELERATE_GRADIENT_ACCUMULATION_STEPS: accelerate launch --gradient_accumulation_steps, or an "
            "accelerate config's deepspeed_config): set it in one place"
        )
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None:  # no DataLoader is prepared, so DeepSpeed cannot infer the micro batch ("auto")
        deepspeed.deepspeed_config.update(
            train_micro_batch_size_per_gpu=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum_steps,
            gradient_clipping=cfg.max_grad_norm or 0.0,
        )
    return accelerator


def join_slurm_tasks() -> None:
    """In a SLURM job submitted by submitit (hydra/launcher=slurm) with several tasks, each task is one process of
    the run: export the torch.distributed variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) that
    accelerate reads, as torchrun would. Nothing otherwise (torchrun or accelerate launch set WORLD_SIZE)."""
    submitit = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    if submitit and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "WORLD_SIZE" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _reset_accelerate_state() -> None:
    """Forget this run's accelerate settings (mixed precision, accumulation), keeping the process group: the next
    job of a multirun sweep in this process may use others."""
    AcceleratorState._reset_state()
    GradientState._reset_state()


def check_inputs_used(model: Policy, loader: DictConfig, sources: list | None = None) -> None:
    """The loader decodes the cameras the model reads, from every source, and no other."""
    if model.reads_wrist_image:
        if not loader.get("use_wrist_image"):
            raise ValueError(
                "model.wrist_image=true but loader.use_wrist_image=false: the model would get no wrist frames"
            )
        lacking = [s.name for s in sources or [] if not s.wrist_image_key]
        if lacking:
            raise ValueError(
                f"model.wrist_image=true but dataset(s) {lacking} set no wrist_image_key: name the wrist camera's "
                "step feature (e.g. observation/wrist_image)"
            )
    elif loader.get("use_wrist_image"):
        raise ValueError(
            f"loader.use_wrist_image=true but {type(model).__name__} reads the external camera only: the wrist "
            "frames would be decoded, augmented and dropped (at about 60% of the loader's speed); "
            "set loader.use_wrist_image=false"
        )


def check_input_sizes(model: Policy, sources: list, statistics: dict) -> None:
    """The sizes of the optional inputs (proprio state, auxiliary target) a model takes agree with every dataset's."""
    for attribute, entry, key_field in (("proprio_dim", "proprio", "state_key"), ("aux_dim", "aux", "aux_key")):
        size = getattr(model, attribute, None)
        if not size:
            continue
        for source in sources:
            if not getattr(source, key_field):
                raise ValueError(
                    f"model.{attribute}={size} but dataset {source.name!r} sets no {key_field}: "
                    f"point it at a [{size}] step feature, or set model.{attribute}=null"
                )
            found = statistics[source.key].get(entry)
            if found is None:
                raise ValueError(
                    f"statistics of {source.name!r} have no {entry!r} entry for its {key_field}: recompute them "
                    "(delete the cached statistics of this dataset)"
                )
            if len(found["q01"]) != size:
                raise ValueError(
                    f"model.{attribute}={size} but {source.name!r}'s {getattr(source, key_field)} has "
                    f"{len(found['q01'])} values per step"
                )


def train(cfg: DictConfig) -> dict:
    """Runs the configured finetune; returns {"checkpoint": dir, "metric": best val loss, else the last train loss},
    the same on every rank."""
    check_import_hygiene()
    join_slurm_tasks()
    try:
        return _train(cfg, _accelerator(cfg))
    finally:
        _reset_accelerate_state()


def _train(cfg: DictConfig, accelerator: Accelerator) -> dict:
    set_seed(cfg.seed, device_specific=True)
    run_dir = Path(cfg.paths.output_dir)
    settings = {**run_settings(cfg), "cast_frozen": casts_frozen(cfg, accelerator)}
    resumed = read_trainer_state(run_dir) if cfg.resume else None
    if resumed is not None:
        check_resume_settings(resumed, settings, run_dir, accelerator.num_processes, movable_paths(cfg))
    elif (run_dir / "state").exists() or list_checkpoints(run_dir):
        raise FileExistsError(
            f"{run_dir} holds a run already (state/, checkpoints/): resume=true continues it; a new run needs "
            "another hydra.run.dir (it would overwrite that run's state, metrics and checkpoints)"
        )
    overrides = resumed.get("overrides") if resumed is not None else _command_line_overrides()

    # Fail fast, before any long step: data layout and sizes, then the model (base weights, HF_TOKEN), then statistics.
    with accelerator.main_process_first():
        sources = sources_from_config(cfg.dataset)
    builders = {source.name: open_builder(source, cfg.robot.action_dim) for source in sources}
    model: Policy = instantiate(cfg.model)
    if type(model).predict_normalized is Policy.predict_normalized:
        raise TypeError(
            f"{type(model).__name__} does not implement predict_normalized(images, prompts, states, generator, "
            "wrist_images) -> normalized chunks [B, T, A]: validation samples with it, and Policy's "
            "predict_action_batch un-normalizes what it returns (see models/policy.py)"
        )
    if model.action_dim != cfg.robot.action_dim:
        raise ValueError(f"model.action_dim={model.action_dim} but robot.action_dim={cfg.robot.action_dim}")
    check_observation_keys(cfg.robot.get("observation_keys") or {}, model)  # it can be served what it reads
    check_inputs_used(model, cfg.loader, sources)
    with accelerator.main_process_first():
        statistics = compute_all_statistics(sources, cfg.robot.action_dim, cfg.paths.cache_dir)
        if cfg.dataset.get("balance_weights", False):
            sources = balance_by_size(sources, cfg.robot.action_dim, cfg.paths.cache_dir)
    if len(sources) > 1:
        total = sum(source.weight for source in sources)
        shares = ", ".join(f"{source.name} {source.weight / total:.1%}" for source in sources)
        accelerator.print(f"mixture: {shares} of the training frames")
    check_unnormalized_ranges(statistics)
    check_input_sizes(model, sources, statistics)
    if resumed is not None:
        check_resume_statistics(run_dir, statistics)
    if accelerator.is_main_process:
        write_json_atomic(run_dir / STATISTICS_FILE, statistics)
    # A resumed LoRA run's adapters sit where its saved state has them (older runs adapted other ViT modules).
    targets = saved_vision_targets(run_dir / "state" / "model.safetensors") if resumed is not None else None
    counts = apply_finetune(model, cfg.finetune, targets)
    in_bf16 = cast_frozen_weights(model, cfg, accelerator)
    # Which statistics the checkpoint un-normalizes with: the one key, or the one named. With several and none named
    # the checkpoint names none, and serving it asks for unnorm_key= (as CogACT and OpenVLA do).
    unnorm_key = default_unnorm_key(statistics, cfg.unnorm_key)
    if unnorm_key is None:
        accelerator.print(
            f"the statistics hold {len(statistics)} datasets {sorted(statistics)} and unnorm_key is null: serve.py and "
            "eval_maniskill.py will need unnorm_key=<one of them>"
        )
    model.set_statistics(statistics, unnorm_key or sources[0].key)
    accelerator.print(
        f"model: {type(model).__name__} {counts['total'] / 1e6:.2f}M params, "
        f"{counts['trainable'] / 1e6:.2f}M trainable, on {accelerator.device} (device={cfg.device}), "
        f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}"
        + (f", {in_bf16 / 1e6:.2f}M frozen weights stored in bf16" if in_bf16 else "")
    )
    fsdp_version = _fsdp_version(accelerator)
    if fsdp_version is not None and getattr(model, "ema_diffusion", None) is not None:
        raise ValueError(
            "model.use_ema=true under FSDP: the EMA head and the live head are sharded differently, so the "
            "element-wise EMA update cannot run; set model.use_ema=false or launch with DDP (launch/ddp.yaml)"
        )
    # Taken before sharding, with the names the gathered state dict has: under FSDP the unwrapped module's
    # parameter names carry its wrappers' prefixes, and its state_dict() is a collective.
    trained_keys = model.trained_state_keys()

    optimizer = instantiate(cfg.optimizer)([p for p in model.parameters() if p.requires_grad])
    # Not prepared by accelerate (which would step it once per process): stepped once per optimizer step.
    scheduler = instantiate(cfg.scheduler)(optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    policy: Policy = accelerator.unwrap_model(model)
    keep_trained_weights(accelerator, policy, trained_keys)

    step, micro_batches, best = 0, 0, math.inf
    if resumed is not None:
        load_training_state(accelerator, run_dir, policy)
        step, micro_batches, best = resumed["step"], resumed["micro_batches"], resumed["best"]
        accelerator.print(f"resumed at step {step} from {run_dir / 'state'}")

    loader_cfg = _loader_config(cfg, policy)
    rank, world = accelerator.process_index, accelerator.num_processes
    train_frames = make_frame_dataset(
        sources, statistics, loader_cfg, "train", rank, world, micro_batches * cfg.batch_size
    )
    train_data = iterate_torch(train_frames, sources)
    val_data = None
    if loader_cfg.val_fraction > 0:
        if all(count_episodes(s, "val", loader_cfg.val_fraction) > 0 for s in sources):
            val_data = make_frame_dataset(sources, statistics, loader_cfg, "val")
        else:
            accelerator.print(f"validation off: loader.val_fraction={loader_cfg.val_fraction} holds out no episode")
    if val_data is not None and fsdp_version is not None:
        # Every rank would have to run the same forward passes in lockstep to gather each block's weights, and
        # sampling calls more than the wrapped forward: validate and compare the saved checkpoints instead.
        accelerator.print("validation is skipped under FSDP (sharded weights); evaluate the checkpoints instead")
        val_data = None
    keys = [s.key for s in sources]
    metric = cfg.checkpoint.metric
    if cfg.checkpoint.keep_best and metric.startswith("val/"):
        if val_data is None:
            accelerator.print(
                f"checkpoint.keep_best={cfg.checkpoint.keep_best} ranks checkpoints by {metric}, but validation is "
                "off: no checkpoint carries it, so only checkpoint.keep_last applies"
            )
        elif cfg.save_every % cfg.val_every:
            accelerator.print(
                f"checkpoint.keep_best={cfg.checkpoint.keep_best} ranks checkpoints by {metric}, but validation runs "
                f"every {cfg.val_every} steps and checkpoints are saved every {cfg.save_every}: only those saved at a "
                "validation step (and the last) carry it"
            )

    logger = MetricsLogger(run_dir / "metrics.jsonl", cfg, accelerator.is_main_process)
    logger.forget_after(step)  # a resumed run's records past its state: steps trained again from here
    # The checkpoint says what it trained on: the statistics it un-normalizes with, and the camera resolution of
    # that dataset (eval_maniskill.py renders at it unless told otherwise).
    final_cfg = copy.deepcopy(cfg)
    with open_dict(final_cfg):  # a custom robot config may lack camera_size
        final_cfg.unnorm_key = unnorm_key
        unnorm_source = next((s for s in sources if s.key == unnorm_key), sources[0])
        final_cfg.robot.camera_size = cfg.robot.get("camera_size") or image_side(
            builders[unnorm_source.name], unnorm_source.image_key
        )
    trainable_only = cfg.finetune.mode == "lora" and bool(cfg.model.get("pretrained"))
    # The latest checkpoint: a resumed run's saved one until it saves another (it may have no step left to train).
    checkpoint, last_loss = (resumed.get("checkpoint") if resumed is not None else None), math.nan
    progress = tqdm(
        total=cfg.max_steps, initial=step, desc="train", disable=not accelerator.is_main_process, dynamic_ncols=True
    )
    started, frames = time.perf_counter(), 0
    # Action (and auxiliary) losses of this optimizer step's micro-batches, then of the steps since the last log (a
    # resumed run's are restored: its first logged mean is the uninterrupted run's).
    step_losses, logged_losses = [], list(resumed.get("logged_losses", [])) if resumed is not None else []
    step_aux, logged_aux = [], list(resumed.get("logged_aux", [])) if resumed is not None else []
    model.train()
    try:
        while step < cfg.max_steps:
            batch = next(train_data)
            micro_batches += 1
            with accelerator.accumulate(model):
                loss, parts = model(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss.item()} at step {step + 1}; stopped. Latest checkpoint: {checkpoint}"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    check_gradients(accelerator, model, cfg.max_grad_norm, step + 1, checkpoint)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            frames += len(batch["prompt"]) * world
            # The action loss ("loss" of the parts; the total when a policy reports none): comparable across runs
            # that weight auxiliary losses differently, and the returned metric when validation is off.
            step_losses.append(torch.as_tensor(parts.get("loss", loss), device=loss.device).detach().float())
            if "aux_loss" in parts:
                step_aux.append(torch.as_tensor(parts["aux_loss"], device=loss.device).detach().float())
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step trained at
            scheduler.step()
            step += 1
            policy.on_optimizer_step()
            # Means over the step's micro-batches and over every rank.
            last_loss = accelerator.gather(torch.stack(step_losses).mean()).mean().item()
            logged_losses.append(last_loss)
            if step_aux:
                logged_aux.append(accelerator.gather(torch.stack(step_aux).mean()).mean().item())
            step_losses, step_aux = [], []
            throughput = frames / (time.perf_counter() - started)
            progress.update(1)
            progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", fps=f"{throughput:.0f}")
            metrics = {"train/loss": last_loss, "train/lr": lr, "train/frames_per_s": throughput}
            log_now = step % cfg.log_every == 0
            if log_now:  # the losses' means since the last log
                metrics["train/loss"] = sum(logged_losses) / len(logged_losses)
                if logged_aux:
                    metrics["train/aux_loss"] = sum(logged_aux) / len(logged_aux)
                logged_losses, logged_aux = [], []
            at_end = step == cfg.max_steps
            validate_now = val_data is not None and (step % cfg.val_every == 0 or at_end)
            if validate_now and accelerator.is_main_process:
                plot = run_dir / "validation" / f"step_{step:06d}.png"
                metrics.update(validate(policy, val_data, statistics, keys, cfg.val_batches, plot))
                best = min(best, metrics.get("val/loss", best))
            if log_now or validate_now:  # one record per step
                logger.log(step, metrics)
            if step % cfg.save_every == 0 or at_end:
                weights = accelerator.get_state_dict(model)  # a collective: gathers sharded weights (FSDP, DeepSpeed)
                if accelerator.is_main_process:
                    ckpt_dir = run_dir / "checkpoints" / f"step_{step:06d}"
                    trained = trained_keys if trainable_only else False
                    save_checkpoint(ckpt_dir, policy, final_cfg, statistics, step, metrics, trained, state_dict=weights)
                    index = prune_checkpoints(
                        run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best, cfg.checkpoint.metric
                    )
                    checkpoint = index["latest"]  # this one, unless keep_last=0 pruned it at once
                state = {"step": step, "micro_batches": micro_batches, "best": best, "checkpoint": str(checkpoint)}
                state.update(logged_losses=logged_losses, logged_aux=logged_aux)
                state.update(settings=settings, overrides=overrides, num_processes=world)
                save_training_state(accelerator, run_dir, state)
    except BaseException:
        logger.close(failed=True)
        raise
    finally:
        progress.close()
    logger.close()
    # Validation ran on rank 0: every rank returns its figure (a sweeper in each process sees the same objective).
    shared = [best if math.isfinite(best) else last_loss]
    broadcast_object_list(shared)
    return {"checkpoint": str(checkpoint) if checkpoint and accelerator.is_main_process else None, "metric": shared[0]}
