"""The pi0-style flow-matching policy (models/flow.py + conf/model/flow_tiny.yaml): another policy on the contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from models import Observation, load_policy, save_checkpoint
from models.flow import FlowVLA
from tests.test_cogact import CONF, _batch, _overfit, _stats


def _flow_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=["model=flow_tiny", *overrides])


@pytest.fixture(scope="module")
def flow() -> FlowVLA:
    torch.manual_seed(0)
    model = instantiate(_flow_cfg().model)
    with torch.no_grad():
        for p in model.action_model.net.final_layer.parameters():  # zero-initialised: a head that moves the sample
            p.normal_(0, 0.5)
    model.set_statistics(_stats())
    return model


def test_flow_loss_falls_when_overfitting_one_batch() -> None:
    torch.manual_seed(0)
    model = instantiate(_flow_cfg().model)
    assert isinstance(model, FlowVLA) and model.action_model.diffusion is None
    losses = [loss for loss, _ in _overfit(model, _batch(model), 60)]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])


def test_euler_sampler_follows_the_velocity_from_noise_to_the_actions(flow, monkeypatch) -> None:
    """With the exact velocity of the straight path to a fixed chunk a, v(x_t, t) = (x_t - a) / t, the sampler must
    land on a for any step count: it integrates from t = 1 down to t = 0 with the head's time scale."""
    head = flow.action_model
    target = torch.linspace(-1, 1, head.horizon * head.action_dim).reshape(1, head.horizon, head.action_dim)
    times = []

    def exact_velocity(condition, cfg_scale, state=None):
        def velocity(x, t):
            times.append(t[0].item() / head.time_scale)
            return (x - target) / (t / head.time_scale)[:, None, None]

        return velocity

    monkeypatch.setattr(head, "guided", exact_velocity)
    for steps in (1, 3, 10):
        times.clear()
        out = head.sample(torch.zeros(2, 1, 64), cfg_scale=1.0, steps=steps)
        torch.testing.assert_close(out, target.expand(2, -1, -1))
        assert times == pytest.approx([1 - i / steps for i in range(steps)])


def test_flow_checkpoint_round_trip_and_its_sampling_settings(flow, tmp_path) -> None:
    cfg = OmegaConf.create({"model": OmegaConf.to_container(_flow_cfg().model, resolve=True), "unnorm_key": "toy"})
    ckpt = save_checkpoint(tmp_path / "ckpt", flow, cfg, _stats(), step=3)
    loaded = load_policy(ckpt)
    metadata = loaded.metadata()
    assert type(loaded) is FlowVLA and metadata["model"] == "FlowVLA"
    assert metadata["flow_steps"] == 10 and "ddim_steps" not in metadata
    flow.eval()
    batch = _batch(flow)
    sample = lambda model: model.predict_normalized(  # noqa: E731
        batch["image"], batch["prompt"], generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(sample(flow), sample(loaded))
    fewer = load_policy(ckpt, sampling={"flow_steps": 2})
    assert fewer.metadata()["flow_steps"] == 2 and not torch.allclose(sample(fewer), sample(loaded))
    with pytest.raises(ValueError, match=r"ckpt: ddim_steps=5: a flow-matching policy samples with flow_steps Euler"):
        load_policy(ckpt, sampling={"ddim_steps": 5})  # the model's refusal as is (serve.py prints it), not Hydra's
    image = np.zeros((loaded.image_size, loaded.image_size, 3), np.uint8)
    actions = loaded.predict_action(Observation(image=image, prompt="pick up the apple"))
    assert actions.shape == (loaded.action_horizon, loaded.action_dim) and np.isfinite(actions).all()
