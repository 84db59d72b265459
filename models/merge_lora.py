"""Fold a LoRA checkpoint's adapters into its base and write a standalone (full-weight) checkpoint.

python -m models.merge_lora --ckpt outputs/train/<run>/checkpoints/step_001000 --out merged/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from datasets.statistics import load_statistics
from models.checkpoint import load_config, load_policy, save_checkpoint
from models.finetune import merge_lora_adapters


def merge_checkpoint(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    ckpt_dir = Path(ckpt_dir)
    cfg = load_config(ckpt_dir)
    if (cfg.get("finetune") or {}).get("mode") != "lora":
        raise ValueError(f"{ckpt_dir} is not a LoRA checkpoint (finetune.mode={cfg.get('finetune', {}).get('mode')})")
    statistics = load_statistics(ckpt_dir)
    # The weights do not depend on which statistics are selected; the merged config keeps the checkpoint's choice
    # (none, for a mixture that named none: serving the merged one asks for unnorm_key= as the LoRA one does).
    any_key = cfg.get("unnorm_key") or next(iter(statistics))
    policy = merge_lora_adapters(load_policy(ckpt_dir, unnorm_key=any_key))
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    merged_cfg = OmegaConf.merge(cfg, {"finetune": {"mode": "full", "merged_from": str(ckpt_dir)}})
    merged_cfg.finetune.pop("lora", None)
    return save_checkpoint(out_dir, policy, merged_cfg, statistics, meta["step"], meta.get("metrics"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a LoRA checkpoint dir written by train.py")
    parser.add_argument("--out", required=True, help="where the merged checkpoint dir goes")
    args = parser.parse_args(argv)
    print(f"checkpoint: {merge_checkpoint(args.ckpt, args.out)}")


if __name__ == "__main__":
    main()
