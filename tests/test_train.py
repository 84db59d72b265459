from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from models import Observation, load_policy

REPO = Path(__file__).resolve().parent.parent


def _run_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "VLA_DATA_DIR": str(tmp_path.parent / "data"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "WANDB_MODE": "disabled",
    }
    return subprocess.run(
        [sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_smoke_run_writes_a_self_describing_checkpoint(tmp_path: Path) -> None:
    aux = ["dataset.sources.0.aux_key=observation/object_pos", "model.aux_dim=2"]  # the named target's xy
    result = _run_train(tmp_path, "model=cogact_tiny", "dataset=sample", "debug=smoke", *aux)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("checkpoint: ")
    ckpt = Path(last.split(" ", 1)[1])
    assert {"config.yaml", "dataset_statistics.json", "model.safetensors", "meta.json"} <= {
        p.name for p in ckpt.iterdir()
    }
    stats = json.loads((ckpt / "dataset_statistics.json").read_text())
    assert set(stats["sample"]) >= {"action", "proprio", "num_transitions", "num_trajectories"}
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 6
    saved = OmegaConf.load(ckpt / "config.yaml")
    assert saved.unnorm_key == "sample" and saved.robot.camera_size == 64  # the sample dataset's 64 px images
    assert (tmp_path.parent / "data" / "rlds" / "sample" / "1.0.0" / "dataset_info.json").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert any("val/loss" in r and "val/aux_loss" in r for r in records)
    assert any("train/aux_loss" in r for r in records) and len(stats["sample"]["aux"]["q01"]) == 2
    # Logged every 2 steps: the lr step 2 trained at (the warmup's 0 was step 1's; cosine decay starts after it).
    assert records[0]["step"] == 2 and records[0]["train/lr"] == pytest.approx(1e-4)
    assert "1 process(es), mixed precision no" in result.stdout


@pytest.mark.slow
def test_multirun_runs_one_job_per_value(tmp_path: Path) -> None:
    result = _run_train(
        tmp_path, "-m", "debug=smoke", "max_steps=2", "save_every=2", "val_every=2", "optimizer.lr=1e-4,3e-4"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = [line.split(" ", 1)[1] for line in result.stdout.splitlines() if line.startswith("checkpoint: ")]
    assert len(checkpoints) == 2 and len(set(checkpoints)) == 2
    lrs = sorted(OmegaConf.load(Path(c, "config.yaml")).optimizer.lr for c in checkpoints)
    assert lrs == [1e-4, 3e-4]


@pytest.mark.slow
def test_a_sweep_may_change_the_precision_between_jobs(tmp_path: Path) -> None:
    """And under bf16 a LoRA run stores its frozen base in bf16 (cast_frozen): it trains, validates and saves a
    checkpoint that loads into a float32 model."""
    result = _run_train(
        tmp_path,
        "-m",
        "debug=smoke",
        "finetune=lora",
        "max_steps=2",
        "save_every=2",
        "val_every=2",
        "mixed_precision=no,bf16",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixed precision no\n" in result.stdout
    assert re.search(r"mixed precision bf16, [0-9.]+M frozen weights stored in bf16", result.stdout)
    for line in result.stdout.splitlines():
        if line.startswith("checkpoint: "):
            policy = load_policy(line.split(" ", 1)[1])
            assert {p.dtype for p in policy.parameters()} == {torch.float32}
            image = np.zeros((policy.image_size, policy.image_size, 3), np.uint8)
            assert np.isfinite(policy.predict_action(Observation(image, "push the cube"))).all()
    for job in (tmp_path / "sweep").iterdir():
        if job.is_dir():
            records = [json.loads(r) for r in (job / "metrics.jsonl").read_text().splitlines()]
            assert any(np.isfinite(r.get("val/loss", np.nan)) for r in records), job


@pytest.mark.slow
def test_logged_loss_is_the_mean_over_accumulated_micro_batches_and_logged_steps(tmp_path: Path) -> None:
    """At lr 0 the weights never change, so the same micro-batches give the same losses with or without
    accumulation: 2 steps of 2 accumulated micro-batches, logged every 2 steps, report the mean of all four."""
    frozen = ["debug=smoke", "optimizer.lr=0", "scheduler=constant", "val_every=100"]
    single = _run_train(tmp_path / "single", *frozen, "max_steps=4", "log_every=1", "save_every=4")
    assert single.returncode == 0, single.stderr[-3000:]
    accumulated = _run_train(
        tmp_path / "accumulated", *frozen, "max_steps=2", "grad_accum_steps=2", "log_every=2", "save_every=2"
    )
    assert accumulated.returncode == 0, accumulated.stderr[-3000:]
    each = _losses(tmp_path / "single" / "run")
    assert sorted(each) == [1, 2, 3, 4] and len(set(each.values())) == 4
    assert _losses(tmp_path / "accumulated" / "run") == {2: pytest.approx(np.mean(list(each.values())), rel=1e-5)}


def test_resume_refuses_another_process_count_and_explains_a_longer_schedule(tmp_path: Path) -> None:
    from training.checkpoints import check_resume_settings

    settings = {"max_steps": 6, "scheduler.num_training_steps": 6}
    state = {"settings": settings, "overrides": ["debug=smoke"], "num_processes": 2}
    check_resume_settings(state, settings, tmp_path, num_processes=2)
    with pytest.raises(ValueError, match=r"trained on 2 process\(es\), on 1: the global batch"):
        check_resume_settings(state, settings, tmp_path, num_processes=1)
    longer = {**settings, "scheduler.num_training_steps": 8}
    with pytest.raises(ValueError, match=r"schedule's length is max_steps.*scheduler=constant"):
        check_resume_settings(state, longer, tmp_path, num_processes=2)
    check_resume_settings({"settings": settings}, settings, tmp_path, num_processes=4)  # saved before it was recorded


def test_a_run_saved_before_a_setting_existed_resumes_with_its_old_behaviour(tmp_path: Path) -> None:
    """Settings added later (dataset.balance_weights, finetune.lora.projector) compare as their old behaviour; the
    robot's action scale, read only by evaluation, may change."""
    from hydra import compose, initialize_config_dir

    from training.checkpoints import check_resume_settings, run_settings

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        overrides = ["dataset=custom_rlds", "finetune=lora", "robot=libero_franka", "paths.data_dir=/data"]
        now = run_settings(compose("train", overrides=overrides))
    assert now["dataset.balance_weights"] is False and not any(k.startswith("robot.action_scale") for k in now)
    old = {k: v for k, v in now.items() if k not in ("dataset.balance_weights", "finetune.lora.projector")}
    old |= {"robot.action_scale.position": 1.0, "robot.action_scale.rotation": 1.0}
    check_resume_settings({"settings": old}, now, tmp_path)
    with pytest.raises(ValueError, match=r"finetune.lora.projector: the run has False, this command True"):
        check_resume_settings({"settings": old}, {**now, "finetune.lora.projector": True}, tmp_path)


def test_a_resumed_run_may_find_its_data_in_another_dir(tmp_path: Path) -> None:
    """Settings under paths.data_dir / cache_dir are stored by those names: a run resumed with its data moved (to a
    node's local disk) trains on; a run saved with the absolute paths resumes while its data lies where it lay."""
    from hydra import compose, initialize_config_dir

    from training.checkpoints import check_resume_settings, movable_paths, run_settings

    def settings(data_dir: str) -> tuple[dict, dict]:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=["dataset=custom_rlds", f"paths.data_dir={data_dir}"])
        return run_settings(cfg), movable_paths(cfg)

    (shared, _), (moved, paths) = settings("/shared/data"), settings("/scratch/data")
    assert shared["dataset.sources"][0]["data_dir"] == "<paths.data_dir>/rlds"
    check_resume_settings({"settings": shared}, moved, tmp_path, paths=paths)
    absolute = {**shared, "dataset.sources": [{**shared["dataset.sources"][0], "data_dir": "/shared/data/rlds"}]}
    check_resume_settings({"settings": absolute}, shared, tmp_path, paths=settings("/shared/data")[1])
    with pytest.raises(ValueError, match=r"dataset.sources: the run has"):
        check_resume_settings({"settings": absolute}, moved, tmp_path, paths=paths)


def test_precision_follows_the_launcher_unless_set_and_a_conflicting_accumulation_is_refused(monkeypatch) -> None:
    from training.loop import _accelerator, _reset_accelerate_state

    cfg = OmegaConf.create(
        {"device": "cpu", "mixed_precision": None, "grad_accum_steps": 1, "batch_size": 2, "max_grad_norm": 1.0}
    )
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what accelerate launch sets from launch/*.yaml
    try:
        assert _accelerator(cfg).mixed_precision == "bf16"
    finally:
        _reset_accelerate_state()
    try:
        assert _accelerator(OmegaConf.merge(cfg, {"mixed_precision": "no"})).mixed_precision == "no"
    finally:
        _reset_accelerate_state()
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    try:
        with pytest.raises(ValueError, match=r"grad_accum_steps=1 but the launcher sets 4"):
            _accelerator(cfg)
    finally:
        _reset_accelerate_state()


def test_slurm_tasks_of_a_submitit_job_become_the_processes_of_one_run() -> None:
    script = (
        "import os; from training.loop import join_slurm_tasks; join_slurm_tasks(); "
        "print(*(os.environ.get(k) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR')))"
    )
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "42",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}

    def run(env: dict) -> str:
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout.strip()

    assert run({**base, **slurm}) == "3 1 4 gpu07"
    assert run({**base, **slurm, "SLURM_NTASKS": "1"}) == "None None None None"  # one task: a single process
    assert run({**base, **slurm, "WORLD_SIZE": "8"}).endswith("8 None")  # torchrun's or accelerate's own


def _losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in lines]
    assert len(steps) == len(set(steps)), steps  # one record per step, validation's merged in
    return {m["step"]: m["train/loss"] for m in lines}


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path: Path, finetune: str) -> None:
    # Logged every 2 steps, saved every 3: the mean logged at step 4 spans the interruption (steps 3 and 4).
    common = ["debug=smoke", "scheduler=constant", "log_every=2", "save_every=3", "val_every=3", "loader.augment=true"]
    common.append(f"finetune={finetune}")
    full = _run_train(tmp_path / "full", *common, "max_steps=6")
    assert full.returncode == 0, full.stderr[-3000:]
    first = _run_train(tmp_path / "part", *common, "max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    # Resuming with other settings (here the defaults' lr and scheduler) is refused before anything is touched.
    state = (tmp_path / "part" / "run" / "state" / "trainer.json").read_text()
    other = _run_train(tmp_path / "part", "debug=smoke", "log_every=2", "max_steps=6", "resume=true")
    assert other.returncode != 0
    assert "scheduler._target_" in other.stderr and "python train.py debug=smoke scheduler=constant" in other.stderr
    # Under LoRA the resume state holds the trained weights only; the frozen base is rebuilt as the run began.
    with safe_open(str(tmp_path / "part" / "run" / "state" / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    with safe_open(str(tmp_path / "part" / "run" / "checkpoints" / "step_000003" / "model.safetensors"), "pt") as f:
        every = set(f.keys())
    if finetune == "lora":
        assert saved < every and any("lora_" in k for k in saved)
        assert all("lora_" in k or not k.startswith(("vision_backbone.", "llm_backbone.")) for k in saved)
    else:
        assert saved == every
    assert (tmp_path / "part" / "run" / "state" / "trainer.json").read_text() == state
    resumed = _run_train(tmp_path / "part", *common, "max_steps=6", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 3" in resumed.stdout
    uninterrupted, continued = _losses(tmp_path / "full" / "run"), _losses(tmp_path / "part" / "run")
    assert sorted(continued) == [2, 3, 4, 6]  # logged at 2, 4, 6; validated at 3 and 6
    for step in (4, 6):
        assert continued[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7), step
    index = json.loads((tmp_path / "part" / "run" / "checkpoints" / "index.json").read_text())
    assert sorted(index["checkpoints"]) == ["step_000003", "step_000006"]
    if finetune == "full":  # resuming a finished run trains nothing and names the checkpoint it had saved
        again = _run_train(tmp_path / "part", *common, "max_steps=6", "resume=true")
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stdout.strip().splitlines()[-1] == f"checkpoint: {tmp_path}/part/run/checkpoints/step_000006"


@pytest.mark.slow
def test_a_lora_run_saved_with_the_older_vit_targets_resumes(tmp_path: Path) -> None:
    """Runs saved before 2026-12-03 adapted the ViTs' patch embedding (and SigLIP's unused pool) too: resuming one
    builds its adapters where its state has them."""
    common = ["debug=smoke", "finetune=lora_openvla", "scheduler=constant", "save_every=3", "val_every=3"]
    legacy = "+finetune.lora.vision_targets=[qkv,proj,fc1,fc2]"
    first = _run_train(tmp_path, *common, legacy, "max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    trainer = tmp_path / "run" / "state" / "trainer.json"
    state = json.loads(trainer.read_text())  # as the older code recorded it: no vision_targets setting
    del state["settings"]["finetune.lora.vision_targets"]
    state["overrides"].remove(legacy)
    trainer.write_text(json.dumps(state))
    resumed = _run_train(tmp_path, *common, "max_steps=6", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 3" in resumed.stdout


@pytest.mark.slow
def test_resume_without_state_fails_before_training(tmp_path: Path) -> None:
    result = _run_train(tmp_path, "debug=smoke", "resume=true")
    assert result.returncode != 0
    assert "holds no training state" in result.stderr


def test_a_new_run_in_a_runs_dir_is_refused_before_it_touches_it(tmp_path: Path) -> None:
    """Forgetting resume=true (or two runs stamped the same second) must not overwrite a run's state and records."""
    (tmp_path / "run" / "checkpoints" / "step_000003").mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 3, "train/loss": 1.0}\n')
    result = _run_train(tmp_path, "debug=smoke")
    assert result.returncode != 0
    assert f"{tmp_path}/run holds a run already" in result.stderr and "resume=true continues it" in result.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 3, "train/loss": 1.0}\n'
    assert not (tmp_path / "run" / "state").exists()


@pytest.mark.slow
def test_optuna_search_minimizes_the_returned_validation_loss(tmp_path: Path) -> None:
    result = _run_train(
        tmp_path,
        "-m",
        "hparams_search=optuna_lr",
        "debug=smoke",
        "max_steps=2",
        "save_every=2",
        "val_every=2",
        "hydra.sweeper.n_trials=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len([line for line in result.stdout.splitlines() if line.startswith("checkpoint: ")]) == 2
    optimization = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert optimization.name == "optuna" and set(optimization.best_params) >= {"optimizer.lr"}
    assert 0 < optimization.best_value < 10


@pytest.mark.slow
def test_two_process_ddp_on_cpu_writes_one_checkpoint_and_every_rank_state(tmp_path: Path) -> None:
    env = {**os.environ, "VLA_DATA_DIR": str(tmp_path / "data"), "TF_CPP_MIN_LOG_LEVEL": "2", "WANDB_MODE": "disabled"}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    result = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "train.py",
            "debug=smoke",
            "max_steps=2",
            "save_every=2",
            "val_every=2",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line for line in result.stdout.splitlines() if line.startswith("checkpoint: ")] == [
        f"checkpoint: {tmp_path}/run/checkpoints/step_000002"
    ]
    state = {p.name for p in (tmp_path / "run" / "state").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainer.json"} <= state


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_keeps_earlier_checkpoints(tmp_path: Path) -> None:
    result = _run_train(tmp_path, "debug=smoke", "optimizer.lr=1e30", "max_grad_norm=0", "save_every=1")
    assert result.returncode != 0
    assert "FloatingPointError: loss is" in result.stderr and "stopped" in result.stderr
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept and all((tmp_path / "run" / "checkpoints" / k / "model.safetensors").is_file() for k in kept)


def test_optional_input_sizes_are_checked_before_training() -> None:
    from types import SimpleNamespace

    from datasets.rlds import RLDSSource
    from serving.observation import check_observation_keys
    from training.loop import check_input_sizes, check_inputs_used

    source = RLDSSource(name="mine", data_dir="/nowhere", aux_key="observation/object_pos")
    stats = {"mine": {"proprio": {"q01": [0.0] * 8}, "aux": {"q01": [0.0] * 6}}}
    check_input_sizes(SimpleNamespace(proprio_dim=8, aux_dim=6), [source], stats)
    check_input_sizes(SimpleNamespace(proprio_dim=None, aux_dim=None), [source], stats)
    with pytest.raises(ValueError, match=r"model.aux_dim=2 but 'mine''s observation/object_pos has 6 values"):
        check_input_sizes(SimpleNamespace(proprio_dim=8, aux_dim=2), [source], stats)
    no_state = RLDSSource(name="mine", data_dir="/nowhere", state_key=None)
    with pytest.raises(ValueError, match=r"model.proprio_dim=8 but dataset 'mine' sets no state_key"):
        check_input_sizes(SimpleNamespace(proprio_dim=8, aux_dim=None), [no_state], {"mine": {}})
    keys = {"image": "image", "prompt": "prompt", "state": None}
    check_observation_keys(keys, SimpleNamespace(proprio_dim=None, reads_wrist_image=False))
    with pytest.raises(ValueError, match=r"model.proprio_dim=8 but robot.observation_keys.state is null"):
        check_observation_keys(keys, SimpleNamespace(proprio_dim=8, reads_wrist_image=False))
    check_observation_keys({**keys, "state": "s"}, SimpleNamespace(proprio_dim=8, reads_wrist_image=False))
    one_camera = SimpleNamespace(reads_wrist_image=False)
    check_inputs_used(one_camera, OmegaConf.create({"use_wrist_image": False}))
    with pytest.raises(ValueError, match=r"loader\.use_wrist_image=true but SimpleNamespace reads"):
        check_inputs_used(one_camera, OmegaConf.create({"use_wrist_image": True}))
    two_cameras = SimpleNamespace(reads_wrist_image=True)
    check_inputs_used(two_cameras, OmegaConf.create({"use_wrist_image": True}))
    with pytest.raises(ValueError, match=r"model\.wrist_image=true but loader\.use_wrist_image=false"):
        check_inputs_used(two_cameras, OmegaConf.create({"use_wrist_image": False}))
    with pytest.raises(ValueError, match=r"dataset\(s\) \['mine'\] set no wrist_image_key"):
        check_inputs_used(two_cameras, OmegaConf.create({"use_wrist_image": True}), [source])
    with pytest.raises(ValueError, match=r"model.wrist_image=true but robot.observation_keys.wrist_image is null"):
        check_observation_keys(keys, SimpleNamespace(proprio_dim=None, reads_wrist_image=True))


def test_validation_loss_does_not_depend_on_the_global_rng(sample_rlds) -> None:
    """The validation loss draws its noise from a fixed seed (keep_best and sweeps compare like with like) and leaves
    training's RNG stream where it was."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from datasets.rlds import LoaderConfig, RLDSSource, compute_statistics, make_frame_dataset
    from training.validation import validate

    source = RLDSSource(name="sample", data_dir=str(sample_rlds))
    stats = {"sample": compute_statistics(source, 7, None)}
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        policy = instantiate(compose("train", overrides=["model=cogact_tiny"]).model)
    policy.set_statistics(stats)
    cfg = LoaderConfig(image_size=policy.image_size, window=policy.action_horizon, batch_size=4, val_fraction=0.2)
    held_out = make_frame_dataset([source], stats, cfg, split="val")
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        results.append(validate(policy, held_out, stats, ["sample"], max_batches=3))
        assert torch.equal(torch.get_rng_state(), before)
    assert results[0] == results[1] and np.isfinite(results[0]["val/loss"])


@pytest.mark.slow
def test_a_two_camera_model_trains_on_a_dataset_with_a_wrist_camera(tmp_path: Path) -> None:
    from datasets.build_rlds import main as build_rlds
    from models import load_policy

    rng = np.random.default_rng(0)
    (tmp_path / "episodes").mkdir()
    for i in range(6):
        np.savez(
            tmp_path / "episodes" / f"ep{i}.npz",
            image=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
            wrist_image=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
            state=rng.normal(size=(10, 8)).astype(np.float32),
            action=np.concatenate([rng.uniform(-1, 1, (10, 6)), rng.integers(0, 2, (10, 1))], 1).astype(np.float32),
            language_instruction=np.array("open the drawer"),
        )
    build_rlds(["episodes", "--source", str(tmp_path / "episodes"), "--out", str(tmp_path / "rlds"), "--name", "two"])
    dataset = [
        "dataset=custom_rlds",
        f"dataset.root={tmp_path / 'rlds'}",
        "dataset.sources.0.name=two",
        "dataset.sources.0.wrist_image_key=observation/wrist_image",
    ]
    common = ["debug=smoke", "robot=libero_franka", "max_steps=2", "save_every=2", "val_every=2", *dataset]
    result = _run_train(tmp_path, *common, "model.wrist_image=true", "loader.val_fraction=0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = Path(result.stdout.strip().splitlines()[-1].split(" ", 1)[1])
    saved = OmegaConf.load(ckpt / "config.yaml")
    assert saved.model.wrist_image and saved.loader.use_wrist_image  # the loader followed the model
    assert load_policy(ckpt).metadata()["wrist_image"] is True
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loss" in r for r in records)
    refused = _run_train(tmp_path / "again", *common, "model.wrist_image=false", "loader.use_wrist_image=true")
    assert refused.returncode != 0 and "reads the external camera only" in refused.stderr


@pytest.mark.slow
def test_balanced_weights_draw_each_source_by_its_size(tmp_path: Path) -> None:
    from datasets.sample import build_sample_dataset

    build_sample_dataset(tmp_path / "rlds", "small", num_episodes=4, steps=5, image_size=16, num_shards=1)
    build_sample_dataset(tmp_path / "rlds", "large", num_episodes=4, steps=15, image_size=16, num_shards=1)
    sources = "[{name: small, data_dir: ${dataset.root}}, {name: large, data_dir: ${dataset.root}}]"
    mixture = ["dataset=custom_rlds", f"dataset.root={tmp_path / 'rlds'}", f"dataset.sources={sources}"]
    common = ["debug=smoke", "max_steps=1", "save_every=1", "unnorm_key=small", *mixture]
    result = _run_train(tmp_path / "balanced", *common, "dataset.balance_weights=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixture: small 25.0%, large 75.0% of the training frames" in result.stdout  # 20 and 60 transitions
    result = _run_train(tmp_path / "by_weight", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixture: small 50.0%, large 50.0% of the training frames" in result.stdout


def test_a_resumed_run_forgets_the_records_of_the_steps_it_trains_again(tmp_path: Path) -> None:
    from training.loop import MetricsLogger

    logger = MetricsLogger(tmp_path / "metrics.jsonl", OmegaConf.create({"logger": None}), enabled=True)
    for step in (1, 2, 3, 4):  # saved at 3, crashed after 4
        logger.log(step, {"train/loss": float(step)})
    logger.forget_after(3)
    logger.log(4, {"train/loss": 4.5})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.5)]
    with open(tmp_path / "metrics.jsonl", "a") as f:  # killed mid-write
        f.write('{"step": 5, "train/lo')
    logger.forget_after(4)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[-1] == json.dumps({"step": 4, "train/loss": 4.5})


def test_a_nan_gradient_stops_the_run_before_the_update(tmp_path: Path) -> None:
    from accelerate import Accelerator

    from training.loop import _reset_accelerate_state, check_gradients

    _reset_accelerate_state()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    model.weight.grad, model.bias.grad = torch.full((2, 3), 4.0), torch.zeros(2)
    check_gradients(accelerator, model, 1.0, 7, "ckpt")  # finite: clipped to norm 1
    assert model.weight.grad.norm().item() == pytest.approx(1.0, rel=1e-4)
    model.weight.grad = torch.full((2, 3), 4.0)
    check_gradients(accelerator, model, 0.0, 7, "ckpt")  # 0: no clipping
    assert model.weight.grad.norm().item() == pytest.approx(4.0 * 6**0.5, rel=1e-4)
    model.weight.grad[0, 0] = math.nan
    for max_norm in (1.0, 0.0):
        with pytest.raises(FloatingPointError, match="gradient norm is nan at step 7; stopped before the update"):
            check_gradients(accelerator, model, max_norm, 7, "ckpt")
    _reset_accelerate_state()


def test_retention_names_only_kept_checkpoints(tmp_path: Path) -> None:
    from training.checkpoints import prune_checkpoints

    for step, loss in ((1, 0.5), (2, 0.9), (3, 0.7)):
        ckpt = tmp_path / "checkpoints" / f"step_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "meta.json").write_text(json.dumps({"metrics": {"val/loss": loss}}))
    index = prune_checkpoints(tmp_path, keep_last=1, keep_best=0, metric="val/loss")
    assert sorted(index["checkpoints"]) == ["step_000003"]
    assert index["best"] == index["latest"] == str(tmp_path / "checkpoints" / "step_000003")
    (tmp_path / "checkpoints" / "step_000004").mkdir()  # a later save with a worse loss, keep_last=0
    (tmp_path / "checkpoints" / "step_000004" / "meta.json").write_text(json.dumps({"metrics": {"val/loss": 0.8}}))
    index = prune_checkpoints(tmp_path, keep_last=0, keep_best=1, metric="val/loss")
    assert index["latest"] == index["best"] == str(tmp_path / "checkpoints" / "step_000003")


def test_a_resume_on_changed_data_is_refused(tmp_path: Path) -> None:
    from training.checkpoints import check_resume_statistics

    saved = {"d": {"action": {"q01": [0.1, -1.0], "mask": [True, False]}, "num_transitions": 10}}
    (tmp_path / "dataset_statistics.json").write_text(json.dumps(saved))
    check_resume_statistics(tmp_path, json.loads(json.dumps(saved)))
    check_resume_statistics(
        tmp_path, {"d": {**saved["d"], "action": {"q01": [0.1 + 1e-12, -1.0], "mask": [True, False]}}}
    )
    changed = {"d": {**saved["d"], "action": {"q01": [0.2, -1.0], "mask": [True, False]}, "num_transitions": 11}}
    with pytest.raises(ValueError, match=r"differ from those .* trained with .*: d\.action\.q01, d\.num_transitions"):
        check_resume_statistics(tmp_path, changed)
