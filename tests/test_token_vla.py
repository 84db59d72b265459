"""The OpenVLA-style token policy (models/token_vla.py + conf/model/token_vla_tiny.yaml)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from models import Observation, load_policy, save_checkpoint
from models.token_vla import ActionTokenizer, TokenVLA
from tests.test_cogact import CONF, _batch, _overfit, _stats


def _token_cfg():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=["model=token_vla_tiny"])


def test_action_tokens_are_openvlas() -> None:
    """OpenVLA: ids vocab_size - np.digitize(clip(x, -1, 1), linspace(-1, 1, 256)); decoded to the bin centres."""
    tokenizer = ActionTokenizer(vocab_size=32000)
    values = np.concatenate([np.random.default_rng(0).uniform(-1.2, 1.2, 1000), [-1.0, 1.0, 0.0, -0.99999]])
    bins = np.linspace(-1, 1, 256)
    expected = 32000 - np.digitize(np.clip(values, -1, 1), bins)
    ids = tokenizer.encode(torch.tensor(values))
    np.testing.assert_array_equal(ids.numpy(), expected)
    assert ids.min() >= tokenizer.first_id == 32000 - 256 and ids.max() <= 31999
    centres = (bins[:-1] + bins[1:]) / 2
    np.testing.assert_allclose(
        tokenizer.decode(ids).numpy(), centres[np.clip(32000 - expected - 1, 0, 254)], rtol=0, atol=1e-6
    )
    inside = np.abs(values) < 1 - 2 / 255
    assert np.abs(tokenizer.decode(ids).numpy() - values)[inside].max() <= 1 / 255 + 1e-6  # within half a bin
    with pytest.raises(ValueError, match="larger than the 256 action bins"):
        ActionTokenizer(vocab_size=200)


def test_overfit_tokens_decode_back_to_the_actions(tmp_path) -> None:
    """Teacher forcing and greedy decoding must read the same positions: a model that learned one batch decodes
    exactly its tokens, and a checkpoint of it decodes the same."""
    torch.manual_seed(0)
    model = instantiate(_token_cfg().model)
    assert isinstance(model, TokenVLA) and model.action_horizon == 1
    batch = _batch(model)
    history = _overfit(model, batch, 150)
    assert history[-1][0] < 0.1 * history[0][0] and history[-1][1]["token_accuracy"] == 1.0
    model.eval()
    decoded = model.predict_normalized(batch["image"], batch["prompt"])
    tokenizer = model.action_tokenizer
    np.testing.assert_array_equal(tokenizer.encode(decoded).numpy(), tokenizer.encode(batch["action"]).numpy())
    assert (decoded - batch["action"]).abs().max() <= 1 / 255 + 1e-6
    with torch.no_grad():  # after the action tokens comes EOS, as OpenVLA's labels teach (HF generate stops there)
        ids = tokenizer.encode(batch["action"]).flatten(1).tolist()
        hidden, last = model.hidden_states(model.image_patches(batch["image"]), batch["prompt"], ids)
        after = model.llm_backbone.logits(hidden[torch.arange(2), last]).argmax(dim=-1)
    assert after.tolist() == [model.llm_backbone.tokenizer.eos_token_id] * 2

    cfg = OmegaConf.create({"model": OmegaConf.to_container(_token_cfg().model, resolve=True), "unnorm_key": "toy"})
    model.set_statistics(_stats())
    loaded = load_policy(save_checkpoint(tmp_path / "ckpt", model, cfg, _stats(), step=150))
    assert type(loaded) is TokenVLA and loaded.metadata()["model"] == "TokenVLA"
    assert loaded.metadata()["action_bins"] == 256
    torch.testing.assert_close(loaded.predict_normalized(batch["image"], batch["prompt"]), decoded)
    observation = Observation(image=batch["image"][0].numpy(), prompt=batch["prompt"][0])
    assert loaded.predict_action(observation).shape == (1, 7)


def test_cached_decoding_equals_full_passes() -> None:
    """The key-value cache's logits for each token equal those of a full LLM pass over image, prompt and the tokens
    before it, for prompts of different lengths in one batch (the shorter rows padded) and a chunk of 3 steps (21
    tokens); each token is their argmax. The model learns a few steps of one batch first, so the rows differ."""
    torch.manual_seed(0)
    cfg = _token_cfg().model
    cfg.future_action_window_size = 2
    model = instantiate(cfg)
    prompts = ["push", "pick up the red cube and put it down on the green goal", "open the top drawer"]
    batch = {
        "image": torch.randint(0, 256, (3, 112, 112, 3), dtype=torch.uint8),
        "prompt": prompts,
        "action": torch.rand(3, 3, 7) * 2 - 1,
    }
    _overfit(model, batch, 15)
    model.eval()
    ids, logits = model.decode_tokens(batch["image"], prompts)
    assert ids.shape == (3, 21) and logits.shape == (3, 21, 256) and len({tuple(r) for r in ids.tolist()}) == 3
    first, vocab = model.action_tokenizer.first_id, model.action_tokenizer.vocab_size
    torch.testing.assert_close(ids, logits.argmax(dim=-1) + first, rtol=0, atol=0)
    with torch.no_grad():
        patches = model.image_patches(batch["image"])
        for k in range(21):
            hidden, last = model.hidden_states(patches, prompts, ids[:, :k].tolist())
            full = model.llm_backbone.logits(hidden[torch.arange(3), last])[:, first:vocab]
            torch.testing.assert_close(logits[:, k], full, rtol=0, atol=1e-4)


def test_wrong_action_window_is_refused() -> None:
    model = instantiate(_token_cfg().model)
    batch = {**_batch(model), "action": torch.zeros(2, 4, 7)}
    with pytest.raises(ValueError, match=r"batch actions are \(4, 7\), the model expects \[1, 7\]"):
        model.compute_loss(batch)


def test_a_finetune_mode_that_leaves_nothing_to_train_is_refused() -> None:
    from models.finetune import apply_finetune_mode

    model = instantiate(_token_cfg().model)  # no action head: head_only would freeze everything
    with pytest.raises(ValueError, match=r"finetune.mode='head_only' freezes every module of TokenVLA .*nothing"):
        apply_finetune_mode(model, "head_only")
    assert apply_finetune_mode(model, "frozen_vision")["trainable"] > 0


def _openvla_layout(model: TokenVLA) -> dict[str, torch.Tensor]:
    """The model's weights under OpenVLA's HF key names (modeling_prismatic.py): the LLM is `language_model`, the
    projector's linears fc1..fc3, timm's LayerScale `gamma` is `scale_factor`."""
    names = {"projector.projector.0.": "projector.fc1.", "projector.projector.2.": "projector.fc2."}
    names |= {"projector.projector.4.": "projector.fc3.", "llm_backbone.llm.": "language_model."}
    state = {}
    for key, tensor in model.state_dict().items():
        for ours, theirs in names.items():
            key = theirs + key.removeprefix(ours) if key.startswith(ours) else key
        state[key.removesuffix(".gamma") + ".scale_factor" if key.endswith(".gamma") else key] = tensor.clone()
    return state


def _token_vla(cfg, pretrained: str) -> TokenVLA:
    """The model of cfg (a model config) with its weights from pretrained, built directly so the loader's own
    exception comes out (instantiate wraps it)."""
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    return TokenVLA(**{k: v for k, v in kwargs.items() if not k.startswith("_")}, pretrained=pretrained)


def _write_openvla_dir(model: TokenVLA, root) -> dict[str, torch.Tensor]:
    """The model saved as OpenVLA's HF checkpoint is: bf16 safetensors shards with an index, and config.json with
    norm_stats (two datasets). Returns the weights under OpenVLA's names."""
    from safetensors.torch import save_file

    state = _openvla_layout(model)
    assert {"language_model.lm_head.weight", "projector.fc3.bias"} <= set(state)
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in state
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, part in shards.items():
        save_file({k: state[k].to(torch.bfloat16).contiguous() for k in part}, str(root / name))
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    stats = {"toy": _stats()["toy"], "other": {**_stats()["toy"], "num_trajectories": 9}}
    vocab = {"text_config": {"vocab_size": model.action_tokenizer.vocab_size + 64}, "pad_to_multiple_of": 64}
    (root / "config.json").write_text(json.dumps({"norm_stats": stats, "n_action_bins": 256, **vocab}))
    return state


def test_openvla_weights_load_from_their_hf_layout(tmp_path) -> None:
    """A checkpoint in OpenVLA's layout (bf16 shards, an index, config.json with norm_stats) loads every weight; the
    loaded model decodes as the original in bf16 precision would. Missing shards, no weights and a model of another
    size are refused by name."""
    torch.manual_seed(0)
    source = instantiate(_token_cfg().model).eval()
    state = _write_openvla_dir(source, tmp_path)

    loaded = instantiate(_token_cfg().model, pretrained=str(tmp_path)).eval()
    for key, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, source.state_dict()[key].to(torch.bfloat16).float(), rtol=0, atol=0)
    images = torch.randint(0, 256, (2, 112, 112, 3), dtype=torch.uint8)
    source.load_state_dict(loaded.state_dict())
    torch.testing.assert_close(
        loaded.decode_tokens(images, ["push", "pick up the cube"]),
        source.decode_tokens(images, ["push", "pick up the cube"]),
    )

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "pad_to_multiple_of": 63}))
    with pytest.raises(ValueError, match=r"below \d+ - 63 there, below \d+ \(the tokenizer's vocabulary\) here"):
        _token_vla(_token_cfg().model, str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_action_bins": 128}))
    with pytest.raises(ValueError, match=r"n_action_bins 128, the model has bins=256"):
        _token_vla(_token_cfg().model, str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(KeyError, match=r"does not match the model: missing \['(projector|vision_backbone)\."):
        _token_vla(_token_cfg().model, str(tmp_path))
    (tmp_path / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no model\*\.safetensors \(OpenVLA's HF layout\)"):
        _token_vla(_token_cfg().model, str(tmp_path))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    wider = _token_cfg().model
    wider.llm_backbone.hidden_size = 96
    with pytest.raises(
        KeyError,
        match=r"shapes \(file vs model\) \['llm_backbone\.llm\.model\.embed_tokens\.weight: \(512, 64\) vs \(512, 96\)",
    ):
        _token_vla(wider, str(tmp_path))


def test_released_weights_export_to_a_checkpoint_that_serves_them(tmp_path) -> None:
    """models.export_pretrained: a checkpoint of OpenVLA's released weights and statistics (the chosen unnorm_key)
    that holds no weights of its own; load_policy rebuilds the released model and un-normalizes with that entry."""
    from models.export_pretrained import export_pretrained, main

    assert _token_cfg().loader.augment  # the training default: a checkpoint of it would be served center-cropped
    torch.manual_seed(0)
    source = instantiate(_token_cfg().model).eval()
    (tmp_path / "openvla").mkdir()
    _write_openvla_dir(source, tmp_path / "openvla")
    overrides = ["model=token_vla_tiny", f"+model.pretrained={tmp_path / 'openvla'}"]
    with pytest.raises(ValueError, match=r"several datasets \['other', 'toy'\]: pass unnorm_key"):
        export_pretrained(tmp_path / "ckpt", overrides)
    with pytest.raises(
        KeyError, match=r"unnorm_key 'bridge_orig' not in the statistics; available: \['other', 'toy'\]"
    ):
        export_pretrained(tmp_path / "ckpt", [*overrides, "unnorm_key=bridge_orig"])
    with pytest.raises(ValueError, match=r"model.pretrained is not set for models.token_vla.TokenVLA"):
        export_pretrained(tmp_path / "ckpt", ["model=token_vla_tiny"])
    assert not (tmp_path / "ckpt").exists()

    main([f"out={tmp_path / 'ckpt'}", *overrides, "unnorm_key=toy"])
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    assert meta["weights"] == "trainable_only" and meta["base"] == str(tmp_path / "openvla")
    assert meta["unnorm_key"] == "toy" and (tmp_path / "ckpt" / "model.safetensors").stat().st_size < 1024
    with pytest.raises(FileExistsError, match=r"ckpt exists: choose another out="):
        export_pretrained(tmp_path / "ckpt", [*overrides, "unnorm_key=other"])
    policy = load_policy(tmp_path / "ckpt")
    assert policy.unnorm_key == "toy" and sorted(policy.statistics) == ["other", "toy"]
    assert not policy.center_crop and policy.image_roi is None  # the release trained on whole images: no crop
    source.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in source.state_dict().items()})
    source.set_statistics(_stats(), "toy")
    observation = Observation(image=np.zeros((112, 112, 3), np.uint8), prompt="pick up the cube")
    np.testing.assert_array_equal(policy.predict_action(observation), source.predict_action(observation))
