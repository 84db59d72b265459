"""The OpenVLA-style token policy (models/token_vla.py + conf/model/token_vla_tiny.yaml)."""

from __future__ import annotations

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

    cfg = OmegaConf.create({"model": OmegaConf.to_container(_token_cfg().model, resolve=True), "unnorm_key": "toy"})
    model.set_statistics(_stats())
    loaded = load_policy(save_checkpoint(tmp_path / "ckpt", model, cfg, _stats(), step=150))
    assert type(loaded) is TokenVLA and loaded.metadata()["model"] == "TokenVLA"
    assert loaded.metadata()["action_bins"] == 256
    torch.testing.assert_close(loaded.predict_normalized(batch["image"], batch["prompt"]), decoded)
    observation = Observation(image=batch["image"][0].numpy(), prompt=batch["prompt"][0])
    assert loaded.predict_action(observation).shape == (1, 7)


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
