"""Finetune a policy: `python train.py model=cogact dataset=libero`, sweeps: `train.py -m optimizer.lr=1e-4,3e-4`"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from training.run_dir import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from training.loop import train

    result = train(cfg)
    if result["checkpoint"] is not None:  # the main process's; other ranks print nothing
        print(f"checkpoint: {result['checkpoint']}", flush=True)
    return result["metric"]


if __name__ == "__main__":
    main()
