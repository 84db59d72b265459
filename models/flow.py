"""A pi0-style flow-matching policy: CogACT's VLM and DiT, the DiT trained as a velocity field instead of a denoiser.

It shows how another policy plugs in: this module and `conf/model/flow_tiny.yaml` are all it takes. Everything
else (train.py, checkpoints, finetuning modes, serve.py, eval_maniskill.py) works on the `models.Policy` contract.

Flow matching as pi0 does it (openpi): time t ~ Beta(1.5, 1) * 0.999 + 0.001, x_t = t * noise + (1 - t) * actions,
the head predicts u = noise - actions (MSE); sampling integrates dx/dt = v from pure noise at t = 1 to t = 0 in
`flow_steps` Euler steps. Classifier-free guidance mixes the two velocities as CogACT mixes noise predictions.
"""

from __future__ import annotations

import torch

from models.cogact.action_model import ActionModel
from models.cogact.model import CogACT


class FlowMatchingHead(ActionModel):
    """The DiT of ActionModel (same sizes and state token) with a flow-matching loss and an Euler sampler."""

    def __init__(self, *args, time_beta: tuple[float, float] = (1.5, 1.0), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The DiT's timestep embedding (CogACT-Base's included) has seen diffusion steps 0 .. diffusion_steps - 1:
        # flow time in [0, 1] is scaled to that range.
        self.time_scale = float(self.diffusion.num_steps)
        self.diffusion = None  # no noise schedule: the flow's path is linear in t
        self.time_beta = tuple(time_beta)

    def loss(self, actions: torch.Tensor, condition: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """MSE between the predicted and the true velocity. actions [B, T, A] normalized; condition [B, 1, C]."""
        noise = torch.randn_like(actions)
        beta = torch.distributions.Beta(*(torch.tensor(float(c), device=actions.device) for c in self.time_beta))
        t = beta.sample((actions.shape[0],)) * 0.999 + 0.001
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
        predicted = self.net(x_t, t * self.time_scale, condition, state)
        return ((predicted.float() - (noise - actions).float()) ** 2).mean()

    @torch.no_grad()
    def sample(
        self,
        condition: torch.Tensor,
        cfg_scale: float,
        steps: int,
        generator: torch.Generator | None = None,
        state: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalized action chunks [B, T, A]: `steps` Euler steps from noise (t = 1) to actions (t = 0), the
        velocities guided as CogACT guides its noise predictions."""
        x = self.initial_noise(condition, generator)
        velocity = self.guided(condition, cfg_scale, state)
        for i in range(steps):
            t = torch.full((x.shape[0],), (1.0 - i / steps) * self.time_scale, device=x.device)
            x = x - velocity(x, t) / steps
        return x


class FlowVLA(CogACT):
    """CogACT's vision backbones, LLM and cognition feature (prompt format, state, aux head, LoRA, EMA, checkpoints
    all as CogACT's) with a FlowMatchingHead. flow_steps: Euler steps at inference (pi0: 10). `action_model` takes
    ActionModel's sizes plus time_beta; its diffusion_steps sets the range of the time embedding."""

    head_class = FlowMatchingHead

    def __init__(self, *args, flow_steps: int = 10, ddim_steps: int | None = None, **kwargs) -> None:
        if ddim_steps is not None:
            raise ValueError(f"ddim_steps={ddim_steps}: a flow-matching policy samples with flow_steps Euler steps")
        super().__init__(*args, **kwargs)
        self.flow_steps = flow_steps

    @property
    def sampling_steps(self) -> int:
        return self.flow_steps

    def released_statistics(self, pretrained: str) -> dict:
        raise NotImplementedError(
            "FlowVLA has no released weights: CogACT's official head is a noise predictor, not a velocity field "
            "(they initialize a flow policy for finetuning, they do not act as one)"
        )

    def metadata(self) -> dict:
        meta = {k: v for k, v in super().metadata().items() if k != "ddim_steps"}
        return {**meta, "flow_steps": self.flow_steps}
