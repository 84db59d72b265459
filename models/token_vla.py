"""An OpenVLA-style policy: the VLM itself predicts the actions, as tokens of its vocabulary.

The same Prismatic VLM as CogACT (DINOv2 + SigLIP -> projector -> Llama-2, OpenVLA's architecture) with no action
head: each normalized action value is one of 256 bins, written as one of the vocabulary's last 256 token ids, and
the LLM learns them by next-token cross-entropy after the prompt; inference decodes them greedily. Like
models/flow.py, it plugs in with this module and one YAML (conf/model/token_vla_tiny.yaml). It does not load
OpenVLA's released weights (their HF layout differs); the discretization and the token ids are OpenVLA's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.cogact.vlm import PrismaticPolicy


class ActionTokenizer:
    """OpenVLA's discretization: a value clipped to [-1, 1] falls in bin b (1..bins) of np.digitize over
    linspace(-1, 1, bins) and is written as token id vocab_size - b; a token decodes to its bin's centre (the 255
    centres between the edges, the top bin folded into the last)."""

    def __init__(self, vocab_size: int, bins: int = 256) -> None:
        if vocab_size <= bins:
            raise ValueError(f"the tokenizer's vocabulary ({vocab_size}) must be larger than the {bins} action bins")
        self.vocab_size, self.bins = vocab_size, bins
        self.edges = torch.linspace(-1, 1, bins)
        self.centers = (self.edges[:-1] + self.edges[1:]) / 2

    @property
    def first_id(self) -> int:
        """The lowest action token id; the action ids are first_id .. vocab_size - 1."""
        return self.vocab_size - self.bins

    def encode(self, actions: torch.Tensor) -> torch.Tensor:
        """Normalized actions (any shape) -> token ids (long, same shape)."""
        bins = torch.bucketize(actions.float().clamp(-1, 1), self.edges.to(actions.device), right=True)
        return self.vocab_size - bins

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> normalized actions (float32, same shape)."""
        index = (self.vocab_size - ids - 1).clamp(0, len(self.centers) - 1)
        return self.centers.to(ids.device)[index]


class TokenVLA(PrismaticPolicy):
    """vision_backbone / llm_backbone: the keyword arguments of DinoSigLIPBackbone and LlamaBackbone (as CogACT's).
    The chunk is future_action_window_size + 1 steps of action_dim tokens each (OpenVLA: one step, 7 tokens), decoded
    one token per LLM pass. bins: action bins (OpenVLA: 256)."""

    def __init__(
        self,
        vision_backbone: dict,
        llm_backbone: dict,
        image_size: int = 224,
        action_dim: int = 7,
        future_action_window_size: int = 0,
        bins: int = 256,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            vision_backbone, llm_backbone, image_size, action_dim, future_action_window_size, gradient_checkpointing
        )
        self.action_tokenizer = ActionTokenizer(self.llm_backbone.tokenizer.vocab_size, bins)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        actions = batch["action"].to(self.device)
        self.check_actions(actions)
        targets = self.action_tokenizer.encode(actions.flatten(1))  # [B, n]
        hidden, last = self.hidden_states(self.image_patches(batch["image"]), batch["prompt"], targets.tolist())
        n = targets.shape[1]
        # Action token k of a row sits at last - n + 1 + k and is predicted from the position before it.
        index = (last - n)[:, None] + torch.arange(n, device=hidden.device)
        predicting = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = self.llm_backbone.logits(predicting).float()  # [B, n, V]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        accuracy = (logits.argmax(-1) == targets).float().mean()
        return loss, {"loss": loss.detach(), "token_accuracy": accuracy.detach()}

    @torch.no_grad()
    def predict_normalized(
        self,
        images: torch.Tensor,
        prompts: list[str],
        states: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Greedy decoding of the chunk's action tokens, restricted to the action ids; deterministic."""
        patches = self.image_patches(images)
        first = self.action_tokenizer.first_id
        decoded: list[list[int]] = [[] for _ in prompts]
        for _ in range(self.action_horizon * self.action_dim):
            hidden, last = self.hidden_states(patches, prompts, decoded)
            logits = self.llm_backbone.logits(hidden[torch.arange(len(prompts), device=hidden.device), last])
            chosen = logits[:, first : self.action_tokenizer.vocab_size].argmax(dim=-1) + first
            for row, token in zip(decoded, chosen.tolist(), strict=True):
                row.append(token)
        ids = torch.tensor(decoded, device=patches.device)
        return self.action_tokenizer.decode(ids).reshape(len(prompts), self.action_horizon, self.action_dim)

    def metadata(self) -> dict:
        return {**super().metadata(), "action_bins": self.action_tokenizer.bins}
