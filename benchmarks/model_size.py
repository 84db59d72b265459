"""Parameter counts of the full-size CogACT per finetuning mode, built on the meta device (no weights, no download).

.venv/bin/python -m benchmarks.model_size [--action-head DiT-S|DiT-B|DiT-L]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from models.finetune import apply_finetune

REPO = Path(__file__).resolve().parent.parent


def build_meta_model(action_head: str, finetune: str) -> tuple[torch.nn.Module, DictConfig]:
    overrides = ["model=cogact", "model.pretrained=null", f"model.action_model.size={action_head}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"finetune={finetune}"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["llm_backbone"]["tokenizer"] = "tiny"  # Llama-2's is gated; the 32064-row embedding is kept as configured
    with torch.device("meta"):
        return instantiate(model_cfg), cfg.finetune


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--action-head", default="DiT-B")
    args = parser.parse_args()
    rows = {}
    for name in ("full", "frozen_vision", "lora", "lora_openvla", "head_only"):
        model, finetune = build_meta_model(args.action_head, name)
        counts = apply_finetune(model, finetune)
        per_module = {
            module: sum(p.numel() for p in getattr(model, module).parameters())
            for module in ("vision_backbone", "projector", "llm_backbone", "action_model")
        }
        rows[name] = {**counts, "per_module": per_module}
    print(f"CogACT ({args.action_head} head), parameters by finetune config (LoRA r 32, all linear):")
    print(f"{'mode':<14}{'total':>16}{'trainable':>16}{'trainable %':>13}")
    for mode, row in rows.items():
        share = 100 * row["trainable"] / row["total"]
        print(f"{mode:<14}{row['total']:>16,}{row['trainable']:>16,}{share:>12.2f}%")
    print("per module (full):", json.dumps(rows["full"]["per_module"]))
    out = REPO / "benchmarks" / "results" / f"model_size_{args.action_head}.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
