"""Official CogACT layout round trip, LoRA finetuning with trainable-only checkpoints, and merging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from models import load_policy, save_checkpoint
from models.cogact.official import MODULE_KEYS, load_official_weights
from models.finetune import LEGACY_VISION_LORA_TARGETS, apply_finetune_mode
from models.merge_lora import merge_checkpoint
from tests.test_cogact import _batch, _stats

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=["model=cogact_tiny", *overrides])


def _write_official_run(model, run_dir: Path) -> Path:
    """A tiny model saved exactly as CogACT's training code saves: checkpoints/<name>.pt + config.json + stats, its
    modules under Prismatic's names (the ViTs are `dino_featurizer` and `siglip_featurizer` there)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    state = {key: getattr(model, key).state_dict() for key in MODULE_KEYS}
    prismatic = {"featurizer.": "dino_featurizer.", "fused_featurizer.": "siglip_featurizer."}
    state["vision_backbone"] = {
        next(new + name[len(old) :] for old, new in prismatic.items() if name.startswith(old)): value
        for name, value in state["vision_backbone"].items()
    }
    torch.save({"model": state}, run_dir / "checkpoints" / "step-010000-epoch-01-loss=0.1000.pt")
    (run_dir / "config.json").write_text(json.dumps({"vla": {"base_vlm": "tiny"}}))
    (run_dir / "dataset_statistics.json").write_text(json.dumps(_stats()))
    return run_dir


def _save_trained_lora(model, cfg, path: Path):
    """A LoRA checkpoint (trained weights only) of `model` after a stand-in for training: adapters that change the
    output. Returns it and the config it was saved with."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.set_statistics(_stats())
    saved_cfg = OmegaConf.create(
        {
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "finetune": OmegaConf.to_container(cfg.finetune),
            "unnorm_key": None,
        }
    )
    return save_checkpoint(path, model, saved_cfg, _stats(), step=1, trainable_only=True), saved_cfg


def _sample(model, batch) -> torch.Tensor:
    model.eval()
    return model.predict_normalized(batch["image"], batch["prompt"], generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def official_run(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(1)
    source = instantiate(_cfg().model)
    with torch.no_grad():
        source.action_model.net.final_layer.linear.weight.normal_(0, 0.1)
    return _write_official_run(source, tmp_path_factory.mktemp("official") / "run"), source


def test_official_layout_loads_with_identical_outputs(official_run) -> None:
    run_dir, source = official_run
    torch.manual_seed(2)  # a different random init, overwritten by the load
    loaded = instantiate(_cfg(f"model.pretrained={run_dir}").model)
    batch = _batch(loaded)
    torch.testing.assert_close(_sample(loaded, batch), _sample(source, batch))


def test_official_layout_mismatch_names_the_keys(official_run, tmp_path) -> None:
    run_dir, source = official_run
    state = torch.load(next((run_dir / "checkpoints").glob("*.pt")), weights_only=True)
    state["model"]["projector"]["projector.9.weight"] = torch.zeros(1)
    bad = tmp_path / "bad"
    (bad / "checkpoints").mkdir(parents=True)
    torch.save(state, bad / "checkpoints" / "x.pt")
    with pytest.raises(KeyError, match=r"projector: missing \[\], unexpected \['projector\.9\.weight'\]"):
        load_official_weights(instantiate(_cfg().model), str(bad))
    with pytest.raises(FileNotFoundError, match=r"no \*\.pt"):
        load_official_weights(source, str(tmp_path))


@pytest.mark.parametrize("module", ["vision_backbone", "projector", "llm_backbone", "action_model"])
def test_a_module_the_checkpoint_lacks_is_refused_not_left_random(official_run, tmp_path, module: str) -> None:
    run_dir, source = official_run
    state = torch.load(next((run_dir / "checkpoints").glob("*.pt")), weights_only=True)
    assert sorted(state["model"]["vision_backbone"])[0].startswith("dino_featurizer.")  # Prismatic's names
    del state["model"][module]
    partial = tmp_path / "partial"
    (partial / "checkpoints").mkdir(parents=True)
    torch.save(state, partial / "checkpoints" / "x.pt")
    model = instantiate(_cfg().model)
    with pytest.raises(KeyError, match=rf"holds no '{module}' weights .* would stay randomly initialised"):
        load_official_weights(model, str(partial))
    if module == "vision_backbone":  # CogACT's frozen-vision runs: timm's pretrained ViTs are kept
        model.vision_backbone.pretrained = True  # (as model.vision_backbone.pretrained=true builds them)
        before = {k: v.clone() for k, v in model.vision_backbone.state_dict().items()}
        report = load_official_weights(model, str(partial))
        assert report == {"loaded": ["projector", "llm_backbone", "action_model"], "kept": ["vision_backbone"]}
        assert all(torch.equal(v, before[k]) for k, v in model.vision_backbone.state_dict().items())
        torch.testing.assert_close(model.projector.state_dict(), source.projector.state_dict())


def test_lora_checkpoint_holds_only_trained_weights_and_merges(official_run, tmp_path) -> None:
    run_dir, _ = official_run
    cfg = _cfg("finetune=lora", f"model.pretrained={run_dir}", "finetune.lora.r=4")
    model = instantiate(cfg.model)
    counts = apply_finetune_mode(model, "lora", OmegaConf.to_container(cfg.finetune.lora))
    assert 0 < counts["trainable"] < counts["total"]
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"llm_backbone", "projector", "action_model"}
    ckpt, saved_cfg = _save_trained_lora(model, cfg, tmp_path / "lora")
    stored = load_file(str(ckpt / "model.safetensors"))
    assert not any(k.startswith("vision_backbone") for k in stored)
    assert any("lora_A" in k for k in stored) and not any("base_layer" in k for k in stored)
    assert sum(v.numel() for v in stored.values()) == counts["trainable"]

    batch = _batch(model)
    expected = _sample(model, batch)
    torch.testing.assert_close(_sample(load_policy(ckpt), batch), expected)
    merged_dir = merge_checkpoint(ckpt, tmp_path / "merged")
    merged = load_policy(merged_dir)
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(_sample(merged, batch), expected, atol=1e-4, rtol=1e-4)
    # A mixture's checkpoint that names no unnorm_key merges too, and still asks for one.
    mixture = save_checkpoint(
        tmp_path / "mixture", model, saved_cfg, {**_stats(), "other": _stats()["toy"]}, step=1, trainable_only=True
    )
    merged_mixture = merge_checkpoint(mixture, tmp_path / "merged_mixture")
    with pytest.raises(ValueError, match="pass unnorm_key="):
        load_policy(merged_mixture)
    torch.testing.assert_close(
        _sample(load_policy(merged_mixture, unnorm_key="toy"), batch), expected, atol=1e-4, rtol=1e-4
    )


def test_official_weights_load_into_a_head_with_a_state_token(official_run) -> None:
    run_dir, source = official_run
    torch.manual_seed(2)
    loaded = instantiate(_cfg(f"model.pretrained={run_dir}", "model.proprio_dim=3", "model.proprio_input=token").model)
    official, ours = source.action_model.net, loaded.action_model.net
    torch.testing.assert_close(ours.positional_embedding[0], official.positional_embedding[0])
    torch.testing.assert_close(ours.positional_embedding[2:], official.positional_embedding[1:])
    for name, weight in official.blocks.state_dict().items():
        torch.testing.assert_close(ours.blocks.state_dict()[name], weight)
    assert ours.state_embedder[0].weight.abs().sum() > 0  # its own fresh init: the official head has no state


def test_official_run_exports_to_a_checkpoint_that_serves_it(official_run, tmp_path) -> None:
    """models.export_pretrained on an official run dir: the checkpoint references the run (no weights of its own),
    carries its dataset_statistics.json, and load_policy samples as the official model does."""
    from models.export_pretrained import export_pretrained

    run_dir, source = official_run
    ckpt = export_pretrained(tmp_path / "ckpt", ["model=cogact_tiny", f"model.pretrained={run_dir}", "unnorm_key=toy"])
    assert load_file(str(ckpt / "model.safetensors")) == {}
    assert json.loads((ckpt / "dataset_statistics.json").read_text()) == _stats()
    policy = load_policy(ckpt)
    batch = _batch(policy)
    torch.testing.assert_close(_sample(policy, batch), _sample(source, batch))
    assert policy.unnorm_key == "toy"


def test_export_refuses_models_the_official_weights_do_not_wholly_make(official_run, tmp_path) -> None:
    from models.export_pretrained import export_pretrained

    run_dir, _ = official_run
    with pytest.raises(NotImplementedError, match=r"FlowVLA has no released weights"):
        export_pretrained(tmp_path / "a", ["model=flow_tiny", f"model.pretrained={run_dir}", "unnorm_key=toy"])
    with pytest.raises(ValueError, match=r"proprio_dim / aux_dim add modules the official CogACT weights lack"):
        export_pretrained(tmp_path / "b", ["model=cogact_tiny", f"model.pretrained={run_dir}", "model.proprio_dim=3"])
    assert not list(tmp_path.iterdir())


def test_openvlas_lora_recipe_adapts_vits_and_projector_from_a_gaussian_init(official_run, tmp_path) -> None:
    """finetune=lora_openvla: adapters on both ViTs, the projector and the LLM (OpenVLA's all-linear), Gaussian A;
    the checkpoint holds adapters and the head only, loads and merges to the same actions."""
    run_dir, _ = official_run
    cfg = _cfg("finetune=lora_openvla", "finetune.lora.r=8", f"model.pretrained={run_dir}")
    model = instantiate(cfg.model)
    apply_finetune_mode(model, "lora", OmegaConf.to_container(cfg.finetune.lora))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[0] for n in trained} == {"vision_backbone", "llm_backbone", "projector", "action_model"}
    assert all("lora_" in n for n in trained if not n.startswith("action_model"))
    adapters = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    for module in (".featurizer.", ".fused_featurizer.", "projector."):
        assert any(module in n for n in adapters), module
    assert sum(n.startswith("projector.") for n in adapters) == 3  # its three linear layers
    assert not any("patch_embed" in n or "attn_pool" in n for n in adapters)  # the blocks' linear layers only
    draws = torch.cat([p.detach().flatten() for p in adapters.values()])
    # peft's gaussian init draws N(0, 1/r); its default (Kaiming-uniform, fan-in 96-512 here) has std 0.03-0.06.
    assert abs(draws.std().item() - 1 / 8) < 0.01

    ckpt, _ = _save_trained_lora(model, cfg, tmp_path / "lora")
    stored = load_file(str(ckpt / "model.safetensors"))
    assert sorted(stored) == sorted(trained)
    batch = _batch(model)
    expected = _sample(model, batch)
    torch.testing.assert_close(_sample(load_policy(ckpt), batch), expected)
    merged = load_policy(merge_checkpoint(ckpt, tmp_path / "merged"))
    assert not any("lora" in k or "base_model" in k for k in merged.state_dict())
    torch.testing.assert_close(_sample(merged, batch), expected, atol=1e-4, rtol=1e-4)


def test_adapters_saved_on_the_patch_embedding_still_load(official_run, tmp_path) -> None:
    """Checkpoints saved before 2026-12-03 also adapted the ViTs' patch-embedding Conv2d: they load as trained."""
    run_dir, _ = official_run
    cfg = _cfg("finetune=lora_openvla", "finetune.lora.r=8", f"model.pretrained={run_dir}")
    model = instantiate(cfg.model)
    lora = {**OmegaConf.to_container(cfg.finetune.lora), "vision_targets": LEGACY_VISION_LORA_TARGETS}
    apply_finetune_mode(model, "lora", lora)
    assert any(".patch_embed.proj.lora_A" in n for n, _ in model.named_parameters())
    ckpt, _ = _save_trained_lora(model, cfg, tmp_path / "legacy")
    batch = _batch(model)
    torch.testing.assert_close(_sample(load_policy(ckpt), batch), _sample(model, batch))
