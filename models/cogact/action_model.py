"""CogACT's action head: a DiT over [condition token, T noisy action tokens] trained as an epsilon-predicting DDPM.

Module and parameter names follow the official checkpoint (`action_model.net.*`) so its weights load strictly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from timm.models.vision_transformer import Attention, Mlp
from torch import nn

from models.cogact.diffusion import GaussianDiffusion

DIT_SIZES = {"DiT-S": (6, 384, 4), "DiT-B": (12, 768, 12), "DiT-L": (24, 1024, 16)}  # depth, width, heads


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the diffusion step (256 frequencies) -> MLP. t: [B] -> [B, D]."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class ConditionEmbedder(nn.Module):
    """Projects the cognition feature [B, 1, C] -> [B, 1, D]; during training a fraction `dropout_prob` of samples get
    the learned `uncondition` token instead, which is what classifier-free guidance samples against."""

    def __init__(self, in_size: int, hidden_size: int, dropout_prob: float = 0.1) -> None:
        super().__init__()
        self.linear = nn.Linear(in_size, hidden_size)
        self.dropout_prob = dropout_prob
        self.uncondition = nn.Parameter(torch.empty(1, in_size))

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(condition.shape[0], 1, 1, device=condition.device) < self.dropout_prob
            condition = torch.where(drop, self.uncondition.to(condition.dtype), condition)
        return self.linear(condition)


class Linear(nn.Module):
    """A named linear layer (the official checkpoint nests these as `<name>.linear`)."""

    def __init__(self, in_size: int, out_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_size, out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class DiTBlock(nn.Module):
    """Pre-norm transformer block; conditioning enters as a token, not through adaLN."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_size: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))


class DiT(nn.Module):
    """eps_theta(x_t [B, T, A], t [B], z [B, 1, C][, state [B, S]]) -> [B, T, A].

    With state_dim set, the normalized proprio state enters as a token of its own (`state_embedder`, an MLP) between
    the condition token and the action tokens; classifier-free guidance's unconditioned pass keeps it."""

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        condition_size: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        condition_dropout: float = 0.1,
        state_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.history_embedder = Linear(action_dim, hidden_size)  # in the official layout; history is unused there too
        self.x_embedder = Linear(action_dim, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.z_embedder = ConditionEmbedder(condition_size, hidden_size, condition_dropout)
        self.state_embedder = None
        if state_dim:
            self.state_embedder = nn.Sequential(
                nn.Linear(state_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
            )
        self.prefix_tokens = 2 if state_dim else 1
        self.positional_embedding = nn.Parameter(
            hidden_size**-0.5 * torch.randn(horizon + self.prefix_tokens, hidden_size)
        )
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, action_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for linear in (self.x_embedder.linear, self.history_embedder.linear, self.z_embedder.linear):
            nn.init.normal_(linear.weight, std=0.02)
        nn.init.normal_(self.z_embedder.uncondition, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)  # the head starts by predicting zero noise
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, state: torch.Tensor | None = None
    ) -> torch.Tensor:
        prefix = [self.t_embedder(t).unsqueeze(1) + self.z_embedder(z)]  # [B, 1, D]
        if self.state_embedder is not None:
            if state is None:
                raise ValueError("this action head reads a proprio state token (state_dim is set) and got no state")
            prefix.append(self.state_embedder(state.to(x.dtype)).unsqueeze(1))
        tokens = torch.cat([*prefix, self.x_embedder(x)], dim=1) + self.positional_embedding
        for block in self.blocks:
            tokens = block(tokens)
        return self.final_layer(tokens)[:, self.prefix_tokens :]


class ActionModel(nn.Module):
    """DiT head + its diffusion schedule. Sizes: `size` in DIT_SIZES, or explicit hidden_size/depth/num_heads."""

    def __init__(
        self,
        condition_size: int,
        action_dim: int = 7,
        future_action_window_size: int = 15,
        size: str | None = "DiT-B",
        hidden_size: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        diffusion_steps: int = 100,
        condition_dropout: float = 0.1,
        state_dim: int | None = None,
    ) -> None:
        super().__init__()
        if size is not None:
            if size not in DIT_SIZES:
                raise ValueError(f"action head size {size!r} unknown; expected one of {sorted(DIT_SIZES)} or null")
            depth, hidden_size, num_heads = DIT_SIZES[size]
        if None in (hidden_size, depth, num_heads):
            raise ValueError("action head: set `size` or all of hidden_size, depth, num_heads")
        self.action_dim = action_dim
        self.horizon = future_action_window_size + 1
        self.net = DiT(
            action_dim, self.horizon, condition_size, hidden_size, depth, num_heads, condition_dropout, state_dim
        )
        self.diffusion = GaussianDiffusion(diffusion_steps)

    def loss(self, actions: torch.Tensor, condition: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """MSE between true and predicted noise. actions [B, T, A] normalized; condition [B, 1, C]; state [B, S]
        normalized, for a head with a state token."""
        noise = torch.randn_like(actions)
        t = torch.randint(0, self.diffusion.num_steps, (actions.shape[0],), device=actions.device)
        predicted = self.net(self.diffusion.q_sample(actions, t, noise), t, condition, state)
        return ((predicted.float() - noise.float()) ** 2).mean()

    def initial_noise(self, condition: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal [B, T, A] on the condition's device, in the head's dtype: where sampling starts. The noise
        is drawn where the generator lives (validation seeds a CPU one for a model on any device), then moved."""
        shape = (condition.shape[0], self.horizon, self.action_dim)
        noise = torch.randn(*shape, generator=generator, device=generator.device if generator else condition.device)
        return noise.to(condition.device, self.net.x_embedder.linear.weight.dtype)

    def guided(
        self, condition: torch.Tensor, cfg_scale: float, state: torch.Tensor | None = None
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The head as a function of (x, t); with cfg_scale > 1, classifier-free guidance u + s (c - u) against the
        learned `uncondition` token."""
        dtype = self.net.x_embedder.linear.weight.dtype
        condition = condition.to(dtype)
        if cfg_scale <= 1.0:
            return lambda x, t: self.net(x, t, condition, state)
        uncondition = self.net.z_embedder.uncondition.expand(condition.shape[0], 1, -1).to(dtype)
        z = torch.cat([condition, uncondition])
        states = None if state is None else torch.cat([state, state])

        def guided_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            conditioned, unconditioned = self.net(torch.cat([x, x]), torch.cat([t, t]), z, states).chunk(2)
            return unconditioned + cfg_scale * (conditioned - unconditioned)

        return guided_model

    @torch.no_grad()
    def sample(
        self,
        condition: torch.Tensor,
        cfg_scale: float,
        steps: int,
        generator: torch.Generator | None = None,
        state: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalized action chunks [B, T, A] by DDIM in `steps` steps, the noise predictions guided (see guided)."""
        noise = self.initial_noise(condition, generator)
        return self.diffusion.ddim_sample(self.guided(condition, cfg_scale, state), noise, steps)
