"""An OpenVLA-style policy: the VLM itself predicts the actions, as tokens of its vocabulary.

The same Prismatic VLM as CogACT (DINOv2 + SigLIP -> projector -> Llama-2, OpenVLA's architecture) with no action
head: each normalized action value is one of 256 bins, written as one of the vocabulary's last 256 token ids, and
the LLM learns them, and the EOS after them, by next-token cross-entropy after the prompt (OpenVLA's labels);
inference decodes them greedily. Like models/flow.py, it plugs in with this module and one YAML
(conf/model/token_vla_tiny.yaml). The discretization and the token ids are OpenVLA's, and `pretrained` loads
OpenVLA's released weights (conf/model/openvla.yaml).

OpenVLA's HF checkpoint (openvla/openvla-7b): config.json (with norm_stats) and model*.safetensors (one file or
shards) holding `vision_backbone.{featurizer,fused_featurizer}.*` (timm keys, LayerScale `gamma` renamed
`scale_factor`), `projector.fc{1,2,3}.*` and `language_model.{model.*,lm_head.weight}` (a LlamaForCausalLM).
"""

from __future__ import annotations

import json
import re

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import DynamicCache

from datasets.hub import local_or_hub
from models.cogact.vlm import PrismaticPolicy

# OpenVLA's key -> ours: (pattern, replacement), applied in order.
OPENVLA_KEYS = (
    (r"^language_model\.", "llm_backbone.llm."),
    (r"^projector\.fc1\.", "projector.projector.0."),
    (r"^projector\.fc2\.", "projector.projector.2."),
    (r"^projector\.fc3\.", "projector.projector.4."),
    (r"\.scale_factor$", ".gamma"),
)


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
    greedily with a key-value cache. bins: action bins (OpenVLA: 256). pretrained: OpenVLA's weights, a Hub id (e.g.
    openvla/openvla-7b) or a local dir of its files; null = random init."""

    def __init__(
        self,
        vision_backbone: dict,
        llm_backbone: dict,
        image_size: int = 224,
        action_dim: int = 7,
        future_action_window_size: int = 0,
        bins: int = 256,
        gradient_checkpointing: bool = False,
        pretrained: str | None = None,
        wrist_image: bool = False,
    ) -> None:
        super().__init__(
            vision_backbone,
            llm_backbone,
            image_size,
            action_dim,
            future_action_window_size,
            gradient_checkpointing,
            wrist_image,
        )
        self.action_tokenizer = ActionTokenizer(self.llm_backbone.tokenizer.vocab_size, bins)
        if pretrained:
            load_openvla_weights(self, pretrained)

    def released_statistics(self, pretrained: str) -> dict:
        """OpenVLA's norm_stats, from its config.json (openvla-7b: one entry per Open X-Embodiment dataset)."""
        config = local_or_hub(pretrained, repo_type="model", what="OpenVLA checkpoint dir") / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{config} is missing (OpenVLA's HF layout)")
        statistics = json.loads(config.read_text()).get("norm_stats")
        if not statistics:
            raise KeyError(f"{config} has no norm_stats")
        return statistics

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        actions = batch["action"].to(self.device)
        self.check_actions(actions)
        action_ids = self.action_tokenizer.encode(actions.flatten(1))  # [B, n]
        eos = torch.full_like(action_ids[:, :1], self.llm_backbone.tokenizer.eos_token_id)
        targets = torch.cat([action_ids, eos], dim=1)  # OpenVLA's labels: the action tokens, then EOS
        patches = self.image_patches(batch["image"], batch.get("wrist_image"))
        hidden, last = self.hidden_states(patches, batch["prompt"], targets.tolist())
        n = targets.shape[1]
        # Target k of a row sits at last - n + 1 + k and is predicted from the position before it.
        index = (last - n)[:, None] + torch.arange(n, device=hidden.device)
        predicting = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = self.llm_backbone.logits(predicting).float()  # [B, n, V]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        accuracy = (logits[:, :-1].argmax(-1) == action_ids).float().mean()  # the action tokens'
        return loss, {"loss": loss.detach(), "token_accuracy": accuracy.detach()}

    @torch.no_grad()
    def predict_normalized(
        self,
        images: torch.Tensor,
        prompts: list[str],
        states: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        wrist_images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy decoding of the chunk's action tokens (decode_tokens); deterministic."""
        ids, _ = self.decode_tokens(images, prompts, wrist_images)
        return self.action_tokenizer.decode(ids).reshape(len(prompts), self.action_horizon, self.action_dim)

    @torch.no_grad()
    def decode_tokens(
        self, images: torch.Tensor, prompts: list[str], wrist_images: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's action token ids [B, n], each the argmax of its logits over the action ids [B, n, bins]. One
        LLM pass over image and prompt, then one single-token pass per further token on the cached keys and values:
        each row's new token goes at its own next position (rows are right-padded to the longest prompt, the padding
        masked)."""
        if self.training:  # gradient checkpointing would drop the cache, and dropout make the logits random
            raise RuntimeError("decode_tokens needs eval mode: call .eval() first")
        llm = self.llm_backbone
        patches = self.image_patches(images, wrist_images)
        embeds, mask = llm.with_image(patches, *llm.tokenize(prompts, patches.device))
        lengths = mask.sum(dim=1)  # each row's tokens; its next token goes at this position
        cache = DynamicCache()
        hidden = llm(embeds, mask, cache)[torch.arange(len(prompts), device=patches.device), lengths - 1]
        first, count = self.action_tokenizer.first_id, self.action_horizon * self.action_dim
        ids, logits = [], []
        for k in range(count):
            logits.append(llm.logits(hidden)[:, first : self.action_tokenizer.vocab_size].float())
            ids.append(logits[-1].argmax(dim=-1) + first)
            if k + 1 < count:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                step = llm.embed(ids[-1][:, None])  # in the dtype of the prompt's embeddings (with_image)
                hidden = llm(step, mask, cache, position_ids=(lengths + k)[:, None])[:, 0]
        return torch.stack(ids, dim=1), torch.stack(logits, dim=1)

    def metadata(self) -> dict:
        return {**super().metadata(), "action_bins": self.action_tokenizer.bins}


def load_openvla_weights(model: TokenVLA, pretrained: str) -> None:
    """Load OpenVLA's HF checkpoint (Hub id or local dir) into the model, every weight; a key either side lacks, or a
    shape that differs, is refused with the lists of them."""
    root = local_or_hub(pretrained, repo_type="model", what="OpenVLA checkpoint dir")
    files = sorted(root.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{root} holds no model*.safetensors (OpenVLA's HF layout)")
    # The vocabulary and bins first (config.json), before reading the shards (15 GB for openvla-7b).
    config_file = root / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    text_vocab, padding = (config.get("text_config") or {}).get("vocab_size"), config.get("pad_to_multiple_of") or 0
    tokenizer = model.action_tokenizer
    if text_vocab is not None and text_vocab - padding != tokenizer.vocab_size:
        raise ValueError(
            f"{config_file}: actions are ids below {text_vocab} - {padding} there, below {tokenizer.vocab_size} (the "
            "tokenizer's vocabulary) here: every action id would be shifted; is llm_backbone.tokenizer OpenVLA's?"
        )
    if config.get("n_action_bins", tokenizer.bins) != tokenizer.bins:
        raise ValueError(f"{config_file}: n_action_bins {config['n_action_bins']}, the model has bins={tokenizer.bins}")
    state = {}
    for file in files:
        for key, tensor in load_file(str(file)).items():
            for pattern, replacement in OPENVLA_KEYS:
                key = re.sub(pattern, replacement, key)
            state[key] = tensor
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise KeyError(
            f"{root} does not match the model: missing {missing[:20]}, unexpected {unexpected[:20]}, "
            f"shapes (file vs model) {shapes[:20]}"
        )
    model.load_state_dict(state)
