"""Gaussian diffusion for action chunks: DDPM training targets and deterministic DDIM sampling (CogACT's settings:
100 steps, `squaredcos_cap_v2` betas, epsilon prediction, DDIM with eta = 0 and no clipping of x0)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """squaredcos_cap_v2: alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2, beta_i = 1 - ab(i+1) / ab(i)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


class GaussianDiffusion:
    """Holds the schedule; `q_sample` noises clean chunks, `ddim_sample` denoises with an eps-predicting model."""

    def __init__(self, num_steps: int = 100) -> None:
        self.num_steps = num_steps
        self.alphas_cumprod = torch.cumprod(1 - cosine_betas(num_steps), dim=0)  # float64 [num_steps]

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise. x0, noise: [B, T, A]; t: long [B]."""
        ab = self._at(self.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def ddim_timesteps(self, num_sampling_steps: int) -> list[int]:
        """Evenly strided original timesteps, newest first (ADM's "ddimN" respacing): [90, 80, ..., 0] for 10 of 100.
        The stride is the smallest that gives exactly N steps; an N no integer stride gives is refused (as ADM does).
        One step is CogACT's special case: the middle timestep (50 of 100), not the nearly noise-free 0."""
        if num_sampling_steps == 1:
            return [self.num_steps // 2]
        counts = {len(range(0, self.num_steps, stride)): stride for stride in range(self.num_steps, 0, -1)}
        if num_sampling_steps not in counts:
            raise ValueError(
                f"ddim_steps={num_sampling_steps}: no integer stride over {self.num_steps} diffusion steps gives "
                f"exactly that many; possible: {sorted(counts)}"
            )
        return list(range(0, self.num_steps, counts[num_sampling_steps]))[::-1]

    @torch.no_grad()
    def ddim_sample(
        self, eps_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, num_steps: int
    ) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from noise [B, T, A]; eps_model(x_t, t[B]) -> eps [B, T, A]."""
        x = noise
        timesteps = self.ddim_timesteps(num_steps)
        for i, t in enumerate(timesteps):
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            eps = eps_model(x, t_batch).to(x.dtype)
            ab = self._at(self.alphas_cumprod, t_batch, x)
            prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
            ab_prev = self._at(self.alphas_cumprod, torch.full_like(t_batch, prev), x) if prev is not None else 1.0
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            x = x0 * ab_prev**0.5 + eps * (1 - ab_prev) ** 0.5
        return x
