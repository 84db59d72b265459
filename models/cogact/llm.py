"""Llama-2 language backbone with CogACT's prompt and cognition token.

Module names match the official checkpoint (`llm_backbone.llm.model.layers...`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoTokenizer, Cache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from models.tokenizer import build_tiny_tokenizer

PROMPT = "In: What action should the robot take to {}?\nOut: "


class LlamaBackbone(nn.Module):
    """`tokenizer`: a Hub id or local dir (Llama-2's needs HF_TOKEN), or "tiny" for the locally built one.
    `cognition_token_ids` are appended after the prompt; the hidden state at the last one is the cognition feature
    (Llama-2: the empty token 29871 then EOS 2, as CogACT does). null: just EOS. strip_prompt: tokenize the prompt
    without its trailing space, as Prismatic's prompt builder gives it to CogACT and OpenVLA (false: with it, as this
    repo's checkpoints saved before 2026-12-02 were trained; Llama-2 writes that space as a second 29871)."""

    def __init__(
        self,
        tokenizer: str = "meta-llama/Llama-2-7b-hf",
        hidden_size: int = 4096,
        num_layers: int = 32,
        num_heads: int = 32,
        intermediate_size: int = 11008,
        vocab_size: int = 32064,
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-5,
        cognition_token_ids: list[int] | None = (29871, 2),
        strip_prompt: bool = True,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(tokenizer)
        config = LlamaConfig(
            vocab_size=max(vocab_size, len(self.tokenizer)),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_position_embeddings,
            rms_norm_eps=rms_norm_eps,
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            attn_implementation=attn_implementation,
        )
        self.llm = LlamaForCausalLM(config)
        self.hidden_size = hidden_size
        ids = cognition_token_ids if cognition_token_ids is not None else [self.tokenizer.eos_token_id]
        self.cognition_token_ids = [int(i) for i in ids]
        self.strip_prompt = strip_prompt

    def prompt(self, instruction: str) -> str:
        """The prompt text for an instruction (before BOS and the cognition ids)."""
        text = PROMPT.format(instruction.lower())
        return text.rstrip() if self.strip_prompt else text

    def tokenize(
        self, instructions: list[str], device: torch.device, suffixes: list[list[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BOS + prompt + cognition tokens (+ each row's suffix ids), right-padded. Returns input_ids,
        attention_mask [B, L]."""
        suffixes = suffixes or [[] for _ in instructions]
        rows = [
            [
                self.tokenizer.bos_token_id,
                *self.tokenizer(self.prompt(text), add_special_tokens=False).input_ids,
                *self.cognition_token_ids,
                *suffix,
            ]
            for text, suffix in zip(instructions, suffixes, strict=True)
        ]
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], device=device)
        attention_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], device=device)
        return input_ids, attention_mask

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(input_ids)

    def with_image(
        self, patches: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prismatic's layout: BOS, the projected image patches [B, N, D], the rest of the text. Returns the input
        embeddings [B, N + L, D] and attention mask; text position i is at N + i from position 1 on."""
        text = self.embed(input_ids)
        embeds = torch.cat([text[:, :1], patches.to(text.dtype), text[:, 1:]], dim=1)
        patch_mask = torch.ones(patches.shape[:2], dtype=text_mask.dtype, device=text_mask.device)
        return embeds, torch.cat([text_mask[:, :1], patch_mask, text_mask[:, 1:]], dim=1)

    @property
    def causal_lm(self) -> LlamaForCausalLM:
        """The LlamaForCausalLM, whether or not peft wraps it (LoRA layers stay inside it)."""
        return self.llm.get_base_model() if isinstance(self.llm, PeftModel) else self.llm

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The causal LM's vocabulary logits [B, L, V] from last-layer hidden states [B, L, D]."""
        return self.causal_lm.lm_head(hidden)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Cache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden states (after the final norm, as hidden_states[-1] of the causal LM) [B, L, D].
        cache: keys and values of the positions before these, extended in place with these (incremental decoding);
        attention_mask then covers the cached positions too, and position_ids [B, L] place the new ones."""
        return self.causal_lm.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
        ).last_hidden_state


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name == "tiny":
        return build_tiny_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, token=os.environ.get("HF_TOKEN"), trust_remote_code=False)
    except OSError as e:
        hint = "" if Path(name).is_dir() else " (gated Hub repos need HF_TOKEN set and access granted)"
        raise OSError(f"could not load tokenizer {name!r}{hint}: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})  # Prismatic adds <PAD> to Llama-2 (id 32000)
    return tokenizer
