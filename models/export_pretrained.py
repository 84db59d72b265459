"""A deployable checkpoint of released weights, as they are: serve or evaluate CogACT or OpenVLA zero-shot.

    python -m models.export_pretrained out=ckpts/openvla-bridge model=openvla unnorm_key=bridge_orig
    python -m models.export_pretrained out=ckpts/cogact-bridge model=cogact unnorm_key=bridge_orig
    python serve.py ckpt=ckpts/openvla-bridge

The remaining arguments are train.py's overrides (the model, robot and unnorm_key to use). The checkpoint holds the
resolved config, the statistics released with the weights, the tokenizer and no weights of its own
(meta.json: "weights": "trainable_only", "base": model.pretrained): loading it loads the released weights from
model.pretrained, a local dir or the Hub cache, as a LoRA checkpoint loads its base.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from datasets.statistics import select_statistics
from models.checkpoint import save_checkpoint

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def export_pretrained(out: str | Path, overrides: list[str]) -> Path:
    """Compose train.py's config with overrides and write the checkpoint dir of model.pretrained's released weights
    at out (atomically; an existing out is refused). The unnorm_key must name one of the released statistics (it may
    be omitted when they hold one dataset). The model is built on the meta device: nothing of the weights is read
    here, they load when the checkpoint does."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: choose another out= (nothing there is replaced)")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    pretrained = cfg.model.get("pretrained")
    if not pretrained:
        raise ValueError(f"model.pretrained is not set for {cfg.model._target_}: no released weights to export")
    with torch.device("meta"):
        model = instantiate(cfg.model, pretrained=None)
    statistics = model.released_statistics(pretrained)  # refuses a model the release does not wholly make
    unnorm_key, _ = select_statistics(statistics, cfg.get("unnorm_key"))
    model.set_statistics(statistics, unnorm_key)  # refuses statistics of another action size
    # What loading, serving and evaluation read (the dataset's paths name the run dir Hydra would have made). The
    # released models were trained without random crops: served uncropped, the whole image.
    kept = OmegaConf.create({key: cfg[key] for key in ("model", "robot", "loader", "finetune")})
    kept.loader.augment, kept.loader.image_roi, kept.unnorm_key = False, None, unnorm_key
    model.requires_grad_(False)  # nothing trained: the checkpoint references the released weights
    return save_checkpoint(out, model, kept, statistics, step=0, trainable_only=True, state_dict={})


def main(argv: list[str]) -> None:
    outs = [a for a in argv if a.startswith("out=")]
    if len(outs) != 1:
        raise SystemExit("usage: python -m models.export_pretrained out=<dir> model=<name> [unnorm_key=...] [...]")
    ckpt = export_pretrained(outs[0].removeprefix("out="), [a for a in argv if not a.startswith("out=")])
    print(f"checkpoint: {ckpt}")


if __name__ == "__main__":
    main(sys.argv[1:])
