from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

import models.cogact.vision as vision
from datasets.statistics import summarize
from models import Observation, load_policy, save_checkpoint
from models.checkpoint import inference_dtype
from models.cogact.diffusion import GaussianDiffusion, cosine_betas

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def _model_cfg(**overrides: object):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["model=cogact_tiny", *[f"model.{k}={v}" for k, v in overrides.items()]])
    return cfg


def _stats() -> dict:
    rng = np.random.default_rng(0)
    values = rng.uniform(-1, 1, size=(200, 7))
    values[:, -1] = rng.integers(0, 2, 200)
    return {
        "toy": {
            "action": {**summarize(values), "mask": [True] * 6 + [False]},
            "num_transitions": 200,
            "num_trajectories": 4,
        }
    }


def _batch(model, size: int = 2) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.randint(
            0, 256, (size, model.image_size, model.image_size, 3), dtype=torch.uint8, generator=generator
        ),
        "prompt": ["pick up the apple", "push the cube to the goal region"][:size],
        "action": torch.rand(size, model.action_horizon, model.action_dim, generator=generator) * 2 - 1,
    }


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = instantiate(_model_cfg().model)
    model.set_statistics(_stats())
    return model


def test_cosine_schedule_matches_its_definition() -> None:
    betas = cosine_betas(100)
    assert betas.shape == (100,) and float(betas.max()) <= 0.999 and float(betas.min()) > 0
    diffusion = GaussianDiffusion(100)
    assert diffusion.ddim_timesteps(10) == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    assert diffusion.ddim_timesteps(3) == [68, 34, 0]  # ADM's "ddim3": the smallest stride giving exactly 3
    assert diffusion.ddim_timesteps(1) == [50]  # CogACT's special case: one step from the middle, not from t=0
    assert len(diffusion.ddim_timesteps(7)) == 7 and len(diffusion.ddim_timesteps(100)) == 100
    with pytest.raises(ValueError, match=r"ddim_steps=30: .* possible: \[1, 2, .* 25, 34, 50, 100\]"):
        diffusion.ddim_timesteps(30)
    with pytest.raises(InstantiationException, match="ddim_steps=40"):
        instantiate(_model_cfg(ddim_steps=40).model)
    bar = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    assert float(diffusion.alphas_cumprod[49]) == pytest.approx(bar(0.5) / bar(0.0), rel=1e-6)


def test_shapes_and_official_module_names(tiny) -> None:
    names = {n.split(".")[0] for n, _ in tiny.named_parameters()}
    assert names == {"vision_backbone", "projector", "llm_backbone", "action_model"}
    keys = tiny.state_dict().keys()
    assert "action_model.net.z_embedder.uncondition" in keys
    assert "llm_backbone.llm.model.layers.0.self_attn.q_proj.weight" in keys
    assert (
        "projector.projector.0.weight" in keys and "vision_backbone.fused_featurizer.blocks.0.attn.qkv.weight" in keys
    )
    batch = _batch(tiny)
    condition = tiny.cognition_features(batch["image"], batch["prompt"])
    assert condition.shape == (2, 1, tiny.llm_backbone.hidden_size)
    chunk = tiny.predict_action(Observation(image=batch["image"][0].numpy(), prompt="pick up the apple"))
    assert chunk.shape == (16, 7) and chunk.dtype == np.float32
    assert set(np.unique(chunk[:, -1])) <= {0.0, 1.0}


def test_cognition_feature_ignores_padding(tiny) -> None:
    tiny.eval()
    batch = _batch(tiny)
    short = tiny.cognition_features(batch["image"][:1], ["go"])
    padded = tiny.cognition_features(batch["image"][:1].repeat(2, 1, 1, 1), ["go", "a much longer instruction than go"])
    torch.testing.assert_close(short[0], padded[0], atol=1e-5, rtol=1e-5)


def test_sampling_is_deterministic_given_a_seed_and_cfg_matters(tiny) -> None:
    tiny.eval()
    with torch.no_grad():
        for p in tiny.action_model.net.final_layer.parameters():  # a non-trivial head, so that guidance shows
            p.normal_(0, 0.5)
    batch = _batch(tiny)
    run = lambda seed, scale: (  # noqa: E731
        setattr(tiny, "cfg_scale", scale),
        tiny.predict_normalized(batch["image"], batch["prompt"], generator=torch.Generator().manual_seed(seed)),
    )[1]
    torch.testing.assert_close(run(1, 1.5), run(1, 1.5))
    assert not torch.allclose(run(1, 1.5), run(2, 1.5))
    assert not torch.allclose(run(1, 1.5), run(1, 1.0))
    tiny.cfg_scale = 1.5


def _overfit(model, batch: dict, steps: int) -> list[tuple[float, dict]]:
    """AdamW steps on one batch; each step's (loss, parts)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    history = []
    for _ in range(steps):
        loss, parts = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((loss.item(), parts))
    return history


def test_loss_falls_when_overfitting_one_batch() -> None:
    torch.manual_seed(0)
    model = instantiate(_model_cfg().model)
    losses = [loss for loss, _ in _overfit(model, _batch(model), 60)]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])


def test_ema_tracks_the_head() -> None:
    model = instantiate(_model_cfg(use_ema=True, ema_decay=0.5).model)
    live = model.action_model.net.x_embedder.linear.weight
    ema = model.ema_diffusion.net.x_embedder.linear.weight
    assert not ema.requires_grad
    before = ema.detach().clone()
    with torch.no_grad():
        live.add_(1.0)
    model.on_optimizer_step()
    torch.testing.assert_close(ema, before + 0.5)


def test_checkpoint_round_trip_gives_identical_actions(tiny, tmp_path) -> None:
    cfg = _model_cfg()
    cfg = OmegaConf.create({"model": OmegaConf.to_container(cfg.model, resolve=True), "unnorm_key": "toy"})
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny, cfg, _stats(), step=3)
    assert {p.name for p in ckpt.iterdir()} >= {
        "config.yaml",
        "dataset_statistics.json",
        "model.safetensors",
        "meta.json",
    }
    loaded = load_policy(ckpt)
    tiny.eval()
    batch = _batch(tiny)
    a = tiny.predict_normalized(batch["image"], batch["prompt"], generator=torch.Generator().manual_seed(0))
    b = loaded.predict_normalized(batch["image"], batch["prompt"], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert not loaded.center_crop and not loaded.metadata()["center_crop"]
    assert loaded.image_roi is None and loaded.metadata()["image_roi"] is None
    augmented_cfg = OmegaConf.merge(cfg, {"loader": {"augment": True, "image_roi": [0.25, 0.0, 0.5, 1.0]}})
    augmented = save_checkpoint(tmp_path / "aug", tiny, augmented_cfg, _stats(), step=3)
    metadata = load_policy(augmented).metadata()
    assert metadata["center_crop"] is True  # trained on random crops: served the central one
    assert metadata["image_roi"] == [0.25, 0.0, 0.5, 1.0]  # and the region of interest it was trained on
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is a file; ckpt= takes the checkpoint dir"):
        load_policy(ckpt / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"it holds checkpoints: pass one of \['step_000003'\]"):
        (tmp_path / "steps" / "step_000003").mkdir(parents=True)
        load_policy(tmp_path / "steps")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        (ckpt / "model.safetensors").unlink()
        load_policy(ckpt)


def test_a_bf16_backbone_serves_the_float32_actions_within_its_precision(tiny, tmp_path) -> None:
    """dtype=bfloat16 (serve.py's auto on a GPU): the VLM's weights in bf16, the action head in float32, as CogACT
    serves; the cognition feature and the actions stay close to float32's."""
    cfg = OmegaConf.create({"model": OmegaConf.to_container(_model_cfg().model, resolve=True), "unnorm_key": "toy"})
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny, cfg, _stats(), step=1)
    full, half = load_policy(ckpt), load_policy(ckpt, dtype="bfloat16")
    dtypes = {(name.split(".")[0], p.dtype) for name, p in half.named_parameters()}
    assert dtypes == {
        ("vision_backbone", torch.bfloat16),
        ("projector", torch.bfloat16),
        ("llm_backbone", torch.bfloat16),
        ("action_model", torch.float32),
    }
    batch = _batch(tiny)
    cognition = [m.cognition_features(batch["image"], batch["prompt"]) for m in (full, half)]
    assert cognition[1].dtype == torch.float32
    assert (cognition[1] - cognition[0]).norm() / cognition[0].norm() < 0.02  # bf16 keeps 8 bits of mantissa
    actions = [
        m.predict_normalized(batch["image"], batch["prompt"], generator=torch.Generator().manual_seed(0))
        for m in (full, half)
    ]
    difference = (actions[1].clamp(-1, 1) - actions[0].clamp(-1, 1)).abs()  # as served: clipped to [-1, 1]
    assert difference.mean() < 0.01 and difference.max() < 0.2
    assert inference_dtype("auto", "cpu") == torch.float32 and inference_dtype("auto", "cuda:1") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='fp8': expected auto, float32 or bfloat16"):
        load_policy(ckpt, dtype="fp8")


def test_a_full_checkpoint_never_fetches_timms_vision_weights_again(tiny, tmp_path, monkeypatch) -> None:
    """A run trained from timm's pretrained ViTs (vision_backbone.pretrained=true) saves every weight: loading it
    builds the ViTs without timm's download (no network on a robot's PC)."""
    cfg = OmegaConf.create({"model": OmegaConf.to_container(_model_cfg().model, resolve=True), "unnorm_key": "toy"})
    cfg.model.vision_backbone.pretrained = True
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny, cfg, _stats(), step=1)

    create, asked = vision.timm.create_model, []

    def spy(name: str, **kwargs: object) -> torch.nn.Module:
        asked.append(kwargs["pretrained"])
        return create(name, **{**kwargs, "pretrained": False})

    monkeypatch.setattr(vision.timm, "create_model", spy)
    load_policy(ckpt)
    assert asked == [False, False]


@pytest.mark.gpu
def test_validation_samples_on_the_gpu_with_a_cpu_generator(tiny) -> None:
    """training.validation seeds a CPU generator whatever the model's device: the noise is drawn on the CPU and
    moved, so the GPU's actions are the CPU's."""
    batch = _batch(tiny)
    tiny.eval()
    on_cpu = tiny.predict_normalized(batch["image"], batch["prompt"], generator=torch.Generator().manual_seed(0))
    on_gpu = tiny.to("cuda").predict_normalized(
        batch["image"], batch["prompt"], generator=torch.Generator().manual_seed(0)
    )
    tiny.to("cpu")
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-3, rtol=1e-3)


def test_a_broken_checkpoint_is_named_before_the_model_is_built(tiny, tmp_path, monkeypatch) -> None:
    import shutil

    import models.checkpoint as checkpoint_module

    cfg = OmegaConf.create({"model": OmegaConf.to_container(_model_cfg().model, resolve=True), "unnorm_key": "toy"})
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints" / "step_000003", tiny, cfg, _stats(), step=3)
    assert load_policy(ckpt).metadata()["checkpoint"] == {"name": "run/step_000003", "step": 3}
    with pytest.raises(FileNotFoundError, match=r"it is a training run: pass one of its checkpoints/\['step_000003'\]"):
        load_policy(tmp_path / "run")

    def no_build(*args, **kwargs) -> None:
        raise AssertionError("the model was built before the statistics were checked")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module, "instantiate", no_build)
        with pytest.raises(
            ValueError, match=r"step_000003: unnorm_key 'bogus' not in the statistics; available: \['toy'\]"
        ):
            load_policy(ckpt, unnorm_key="bogus")
        broken = shutil.copytree(ckpt, tmp_path / "json")
        (broken / "dataset_statistics.json").write_text('{"toy": {')
        with pytest.raises(ValueError, match=r"json/dataset_statistics\.json is not valid JSON"):
            load_policy(broken)
    cut = shutil.copytree(ckpt, tmp_path / "cut")
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"cut/model\.safetensors cannot be read .*truncated or not a safetensors"):
        load_policy(cut)


def test_a_mixture_checkpoint_without_unnorm_key_asks_for_one(tiny, tmp_path) -> None:
    """Statistics of several datasets and no unnorm_key named in training: loading refuses to pick one (DESIGN 3)."""
    stats = {"toy": _stats()["toy"], "other": {**_stats()["toy"], "num_trajectories": 9}}
    stats["other"]["action"] = {**stats["other"]["action"], "q99": [3.0] * 7}
    cfg = OmegaConf.create({"model": OmegaConf.to_container(_model_cfg().model, resolve=True), "unnorm_key": None})
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny, cfg, stats, step=1)
    assert json.loads((ckpt / "meta.json").read_text())["unnorm_key"] is None
    assert not (ckpt / "norm_stats.json").exists()  # openpi's file holds one dataset
    with pytest.raises(ValueError, match=r"several datasets \['other', 'toy'\]: pass unnorm_key="):
        load_policy(ckpt)
    assert load_policy(ckpt, unnorm_key="other").metadata()["unnorm_key"] == "other"
    named = save_checkpoint(tmp_path / "named", tiny, OmegaConf.merge(cfg, {"unnorm_key": "other"}), stats, step=1)
    assert load_policy(named).unnorm_key == "other" and (named / "norm_stats.json").is_file()


def test_checkpoints_saved_before_the_prompt_fix_load_as_they_were_trained(tiny, tmp_path) -> None:
    """A config.yaml without llm_backbone.strip_prompt (saved before 2026-12-02) is rebuilt with the prompt's trailing
    space and RMSNorm eps 1e-6, as it was trained; a current one strips it, with Llama-2's eps."""
    cfg = OmegaConf.create({"model": OmegaConf.to_container(_model_cfg().model, resolve=True), "unnorm_key": "toy"})
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny, cfg, _stats(), step=3)
    current = load_policy(ckpt).llm_backbone
    assert current.strip_prompt and current.causal_lm.config.rms_norm_eps == 1e-5
    assert current.prompt("Push the cube").endswith("to push the cube?\nOut:")
    legacy_cfg = OmegaConf.load(ckpt / "config.yaml")
    del legacy_cfg.model.llm_backbone["strip_prompt"], legacy_cfg.model.llm_backbone["rms_norm_eps"]
    (ckpt / "config.yaml").write_text(OmegaConf.to_yaml(legacy_cfg))
    legacy = load_policy(ckpt).llm_backbone
    assert not legacy.strip_prompt and legacy.causal_lm.config.rms_norm_eps == 1e-6
    assert legacy.prompt("Push the cube").endswith("?\nOut: ")
    assert (
        legacy.tokenize(["push"], torch.device("cpu"))[0].shape[1]
        > current.tokenize(["push"], torch.device("cpu"))[0].shape[1]
    )


def test_sampling_settings_are_overridden_at_load(tiny, tmp_path) -> None:
    cfg = OmegaConf.create({"model": OmegaConf.to_container(_model_cfg().model, resolve=True), "unnorm_key": "toy"})
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny, cfg, _stats(), step=3)
    kept = load_policy(ckpt, sampling={"cfg_scale": None, "ddim_steps": None}).metadata()
    assert (kept["cfg_scale"], kept["ddim_steps"]) == (tiny.cfg_scale, tiny.ddim_steps) != (1.0, 4)
    loaded = load_policy(ckpt, sampling={"cfg_scale": 1.0, "ddim_steps": 4})
    assert (loaded.metadata()["cfg_scale"], loaded.metadata()["ddim_steps"]) == (1.0, 4)
    tiny.eval()
    saved = tiny.cfg_scale, tiny.ddim_steps
    tiny.cfg_scale, tiny.ddim_steps = 1.0, 4
    try:
        batch = _batch(tiny)
        a = tiny.predict_normalized(batch["image"], batch["prompt"], generator=torch.Generator().manual_seed(0))
        b = loaded.predict_normalized(batch["image"], batch["prompt"], generator=torch.Generator().manual_seed(0))
    finally:
        tiny.cfg_scale, tiny.ddim_steps = saved
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"sampling\.temperature: .* has no temperature"):
        load_policy(ckpt, sampling={"temperature": 0.5})


def test_wrong_action_window_is_refused(tiny) -> None:
    batch = _batch(tiny)
    batch["action"] = batch["action"][:, :8]
    with pytest.raises(ValueError, match=r"expects \[16, 7\]"):
        tiny.compute_loss(batch)


def test_a_crash_mid_save_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch) -> None:
    import models.checkpoint as checkpoint_module

    cfg = OmegaConf.create({"model": OmegaConf.to_container(_model_cfg().model, resolve=True), "unnorm_key": "toy"})
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny, cfg, _stats(), step=1)
    before = (ckpt / "model.safetensors").read_bytes()

    def crash(*args, **kwargs) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt", tiny, cfg, _stats(), step=2)
    assert (ckpt / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert '"step": 1' in (ckpt / "meta.json").read_text()


def test_proprio_state_conditions_the_head_and_is_normalized_at_inference() -> None:
    torch.manual_seed(0)
    model = instantiate(_model_cfg(proprio_dim=3).model)
    stats = _stats()
    stats["toy"]["proprio"] = summarize(np.random.default_rng(1).uniform(-5, 5, size=(200, 3)))
    model.set_statistics(stats)
    batch = _batch(model)
    with pytest.raises(ValueError, match=r"proprio state of 3 values"):
        model.compute_loss(batch)
    with pytest.raises(ValueError, match=r"expects \[batch, 3\]"):
        model.compute_loss({**batch, "state": torch.zeros(2, 4)})

    # The projector starts at zero, so the state changes nothing until it trains; then it moves the prediction.
    model.eval()
    predict = lambda states: model.predict_normalized(  # noqa: E731
        batch["image"], batch["prompt"], states, generator=torch.Generator().manual_seed(0)
    )
    zero, ones = torch.zeros(2, 3), torch.ones(2, 3)
    torch.testing.assert_close(predict(zero), predict(ones))
    with torch.no_grad():  # the DiT's output layer starts at zero too, which blocks every gradient below it
        model.action_model.net.final_layer.linear.weight.normal_(std=0.02)
    loss, _ = model.compute_loss({**batch, "state": ones})
    loss.backward()
    assert model.proprio_projector.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.proprio_projector.weight.normal_()
    assert not torch.allclose(predict(zero), predict(ones))

    # Inference normalizes the raw state with the statistics' proprio entry (q01 -> -1, q99 -> +1).
    raw = np.asarray(stats["toy"]["proprio"]["q99"], np.float32)
    image = batch["image"][0].numpy()
    torch.manual_seed(0)
    chunk = model.predict_action(Observation(image=image, prompt=batch["prompt"][0], state=raw))
    torch.manual_seed(0)
    normalized = model.predict_normalized(batch["image"][:1], batch["prompt"][:1], ones[:1]).numpy()
    from datasets.statistics import unnormalize

    np.testing.assert_allclose(chunk, unnormalize(normalized, stats["toy"]["action"])[0], atol=1e-5)
    assert model.metadata()["state_dim"] == 3


def test_proprio_token_is_a_dit_input_of_its_own_and_survives_a_checkpoint(tmp_path) -> None:
    with pytest.raises(InstantiationException, match=r"proprio_input must be 'add' or 'token', got 'concat'"):
        instantiate(_model_cfg(proprio_dim=3, proprio_input="concat").model)
    torch.manual_seed(0)
    cfg = _model_cfg(proprio_dim=3, proprio_input="token")
    model = instantiate(cfg.model)
    stats = _stats()
    stats["toy"]["proprio"] = summarize(np.random.default_rng(1).uniform(-5, 5, size=(200, 3)))
    model.set_statistics(stats)
    net = model.action_model.net
    assert model.proprio_projector is None and net.state_embedder is not None
    assert net.positional_embedding.shape[0] == model.action_horizon + 2  # condition, state, then the actions
    batch = _batch(model)
    with pytest.raises(ValueError, match=r"proprio state of 3 values"):
        model.compute_loss(batch)
    with pytest.raises(ValueError, match=r"expects \[batch, 3\]"):
        model.compute_loss({**batch, "state": torch.zeros(2, 4)})

    with torch.no_grad():  # the DiT's output layer starts at zero, which blocks every gradient below it
        net.final_layer.linear.weight.normal_(std=0.02)
    states = torch.tensor([[0.5, -0.5, 1.0], [-1.0, 0.0, 0.25]])
    loss, _ = model.compute_loss({**batch, "state": states})
    loss.backward()
    assert net.state_embedder[0].weight.grad.abs().sum() > 0
    model.eval()
    predict = lambda states: model.predict_normalized(  # noqa: E731
        batch["image"], batch["prompt"], states, generator=torch.Generator().manual_seed(0)
    )
    assert not torch.allclose(predict(states), predict(-states))  # with cfg_scale > 1 both passes read the state
    assert model.cfg_scale > 1

    cfg = OmegaConf.create({"model": OmegaConf.to_container(cfg.model, resolve=True), "unnorm_key": "toy"})
    ckpt = save_checkpoint(tmp_path / "ckpt", model, cfg, stats, step=1)
    loaded = load_policy(ckpt)
    assert loaded.state_token and loaded.action_model.net.state_embedder is not None
    observation = Observation(image=batch["image"][0].numpy(), prompt=batch["prompt"][0], state=np.ones(3, np.float32))
    torch.manual_seed(0)
    expected = model.predict_action(observation)
    torch.manual_seed(0)
    np.testing.assert_allclose(loaded.predict_action(observation), expected, atol=1e-6)


def test_aux_head_learns_the_target_from_the_cognition_feature_and_needs_no_aux_input_to_act(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = _model_cfg(aux_dim=6, aux_loss_weight=0.5)
    model = instantiate(cfg.model)
    model.set_statistics(_stats())
    batch = _batch(model)
    with pytest.raises(ValueError, match=r"model.aux_dim=6 needs an auxiliary target.*aux_key"):
        model.compute_loss(batch)
    with pytest.raises(ValueError, match=r"aux targets are \[2, 3\], the model expects \[batch, 6\]"):
        model.compute_loss({**batch, "aux": torch.zeros(2, 3)})

    batch["aux"] = torch.rand(2, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.manual_seed(0)
    loss, parts = model.compute_loss(batch)
    torch.testing.assert_close(loss.detach(), parts["loss"] + 0.5 * parts["aux_loss"])
    loss.backward()
    assert model.aux_head[0].weight.grad.abs().sum() > 0
    # The aux loss trains the VLM itself: its gradient reaches the vision backbone.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision_backbone.parameters())

    aux_losses = [float(parts["aux_loss"]) for _, parts in _overfit(model, batch, 30)]
    assert np.mean(aux_losses[-5:]) < 0.2 * np.mean(aux_losses[:3])

    # Served checkpoints keep the head (strict load) and act without any aux input.
    train_cfg = OmegaConf.create({"model": OmegaConf.to_container(cfg.model, resolve=True), "unnorm_key": "toy"})
    loaded = load_policy(save_checkpoint(tmp_path / "ckpt", model, train_cfg, _stats(), step=30))
    torch.testing.assert_close(loaded.aux_head[2].weight, model.aux_head[2].weight)
    chunk = loaded.predict_action(Observation(image=batch["image"][0].numpy(), prompt=batch["prompt"][0]))
    assert chunk.shape == (model.action_horizon, 7)


def test_aux_condition_feeds_the_detached_object_estimate_to_the_action_head(tmp_path) -> None:
    with pytest.raises(InstantiationException, match=r"model.aux_condition .* needs model.aux_dim"):
        instantiate(_model_cfg(aux_condition=True).model)
    torch.manual_seed(0)
    cfg = _model_cfg(aux_dim=6, aux_condition=True)
    model = instantiate(cfg.model)
    model.set_statistics(_stats())
    batch = _batch(model)
    batch["aux"] = torch.rand(2, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1

    # Zero-initialised: a fresh model conditions exactly as one without the projector.
    model.eval()
    cognition = model.cognition_features(batch["image"], batch["prompt"])
    torch.testing.assert_close(model.condition(batch["image"], batch["prompt"], None), cognition)

    # The action loss trains the projector but not the estimate: the aux head learns from the aux loss alone.
    with torch.no_grad():  # as after some training: the DiT's zero-initialised output layer passes no gradient
        model.aux_projector.weight.normal_()
        for parameter in model.action_model.parameters():
            if not parameter.any():
                parameter.normal_(std=0.02)
    model.aux_loss_weight = 0.0
    model.train()
    loss, _ = model.compute_loss(batch)
    loss.backward()
    assert model.aux_projector.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and not p.grad.any() for p in model.aux_head.parameters())

    # Once trained, the condition is the cognition feature plus the projected estimate, at inference too.
    model.eval()
    estimate = model.aux_head(cognition[:, 0])
    expected = cognition + model.aux_projector(estimate).unsqueeze(1)
    torch.testing.assert_close(model.condition(batch["image"], batch["prompt"], None), expected)
    with torch.no_grad():
        model.aux_head[2].bias.add_(1.0)  # another estimate, another condition
    assert not torch.allclose(model.condition(batch["image"], batch["prompt"], None), expected)

    # The checkpoint keeps the projector and acts from the image and prompt alone.
    train_cfg = OmegaConf.create({"model": OmegaConf.to_container(cfg.model, resolve=True), "unnorm_key": "toy"})
    loaded = load_policy(save_checkpoint(tmp_path / "ckpt", model, train_cfg, _stats(), step=1))
    torch.testing.assert_close(loaded.aux_projector.weight, model.aux_projector.weight)
    observation = Observation(image=batch["image"][0].numpy(), prompt=batch["prompt"][0])
    torch.manual_seed(3)
    expected_chunk = model.predict_action(observation)
    torch.manual_seed(3)
    np.testing.assert_allclose(loaded.predict_action(observation), expected_chunk, atol=1e-5)


def test_with_a_state_token_the_object_estimate_joins_the_token_input() -> None:
    torch.manual_seed(0)
    cfg = _model_cfg(proprio_dim=3, proprio_input="token", aux_dim=6, aux_condition=True)
    model = instantiate(cfg.model)
    model.set_statistics(_stats())
    assert model.aux_projector is None and model.action_model.net.state_embedder[0].in_features == 3 + 6
    batch = _batch(model)
    batch["aux"] = torch.rand(2, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch["state"] = torch.tensor([[0.5, -0.5, 1.0], [-1.0, 0.0, 0.25]])

    cognition = model.cognition_features(batch["image"], batch["prompt"])
    condition, token, predicted = model.head_inputs(cognition, batch["state"])
    torch.testing.assert_close(condition, cognition)  # nothing is added to the condition token
    torch.testing.assert_close(token, torch.cat([batch["state"], predicted], dim=-1))

    # The action loss reaches the token's embedder but not the estimate (the aux loss alone trains the aux head).
    with torch.no_grad():
        model.action_model.net.final_layer.linear.weight.normal_(std=0.02)
    model.aux_loss_weight = 0.0
    loss, _ = model.compute_loss(batch)
    loss.backward()
    assert model.action_model.net.state_embedder[0].weight.grad[:, 3:].abs().sum() > 0
    assert all(p.grad is not None and not p.grad.any() for p in model.aux_head.parameters())

    model.eval()
    predict = lambda: model.predict_normalized(  # noqa: E731
        batch["image"], batch["prompt"], batch["state"], generator=torch.Generator().manual_seed(0)
    )
    before = predict()
    with torch.no_grad():
        model.aux_head[2].bias.add_(1.0)  # another estimate, other actions
    assert not torch.allclose(predict(), before)


def test_prompt_ends_as_cogacts_and_openvlas_with_a_llama_style_tokenizer(tmp_path) -> None:
    """CogACT and OpenVLA tokenize Prismatic's prompt with its trailing space stripped ("...\\nOut:") and append the
    empty token (Llama-2: 29871) and, for CogACT, EOS. Llama-2's tokenizer writes a trailing space as that same empty
    token, so a prompt that kept it would carry two. Here a tokenizer with Llama-2's normalizer (prepend and replace
    spaces by "▁"), built locally, stands in for it: the ids after the colon must be the cognition ids, once."""
    from tokenizers import Tokenizer, normalizers
    from tokenizers import models as token_models
    from transformers import PreTrainedTokenizerFast

    from models.cogact.llm import PROMPT, LlamaBackbone

    text = "▁" + PROMPT.format("pick up the apple").replace(" ", "▁")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for char in sorted(set(text)):
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(token_models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    assert fast("Out: ", add_special_tokens=False).input_ids[-1] == vocab["▁"]  # as Llama-2's: "Out: " ends in 29871
    fast.save_pretrained(tmp_path / "tokenizer")
    empty, colon = vocab["▁"], vocab[":"]
    llm = LlamaBackbone(
        str(tmp_path / "tokenizer"), 32, 1, 2, 64, vocab_size=len(vocab), cognition_token_ids=[empty, 2]
    )
    assert llm.causal_lm.config.rms_norm_eps == 1e-5  # Llama-2-7b-hf's config, which CogACT and OpenVLA build
    ids, mask = llm.tokenize(["Pick up the apple", "push"], torch.device("cpu"))
    first = ids[0].tolist()
    assert first[0] == 1 and first[-3:] == [colon, empty, 2] and mask[0].all()
    assert first[1:-2] == fast(PROMPT.format("pick up the apple").rstrip(), add_special_tokens=False).input_ids
    assert ids[1, mask[1].sum() - 3 : mask[1].sum()].tolist() == [colon, empty, 2]


def test_a_model_reading_the_wrist_camera_takes_it_everywhere(tmp_path) -> None:
    """model.wrist_image: the wrist camera's patches follow the external camera's through the same ViTs and
    projector; training, inference, checkpoints and the server all want it, and say so when it is missing."""
    from models.policy import Observation
    from serving import PolicyServer

    torch.manual_seed(0)
    cfg = _model_cfg(wrist_image=True)
    model = instantiate(cfg.model).eval()
    batch = _batch(model)
    batch["wrist_image"] = torch.randint(0, 256, batch["image"].shape, dtype=torch.uint8)
    external = model.projector(model.vision_backbone(batch["image"]))
    patches = model.image_patches(batch["image"], batch["wrist_image"])
    assert patches.shape[1] == 2 * external.shape[1]
    torch.testing.assert_close(patches[:, : external.shape[1]], external)
    with pytest.raises(ValueError, match=r"reads the wrist camera too .* got none wrist images for 2 images"):
        model.compute_loss({k: v for k, v in batch.items() if k != "wrist_image"})
    assert torch.isfinite(model.compute_loss(batch)[0])
    moved = model.cognition_features(batch["image"], batch["prompt"], batch["wrist_image"].flip(1))
    assert not torch.allclose(moved, model.cognition_features(batch["image"], batch["prompt"], batch["wrist_image"]))

    train_cfg = OmegaConf.create({"model": OmegaConf.to_container(cfg.model, resolve=True), "unnorm_key": "toy"})
    loaded = load_policy(save_checkpoint(tmp_path / "ckpt", model, train_cfg, _stats(), step=1))
    assert loaded.reads_wrist_image and loaded.metadata()["wrist_image"] is True
    image = np.zeros((model.image_size, model.image_size, 3), np.uint8)
    with pytest.raises(ValueError, match="every observation needs its wrist_image"):
        loaded.predict_action(Observation(image=image, prompt="push"))
    assert loaded.predict_action(Observation(image=image, prompt="push", wrist_image=image)).shape == (16, 7)
    keys = {"image": "image", "wrist_image": None, "state": None, "prompt": "prompt"}
    with pytest.raises(ValueError, match=r"robot\.observation_keys\.wrist_image is null"):
        PolicyServer(loaded, keys)
    server = PolicyServer(loaded, {**keys, "wrist_image": "observation/wrist_image"})
    assert server.metadata["required_observation_keys"] == ["image", "prompt", "observation/wrist_image"]
