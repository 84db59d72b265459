"""Training-step speed and peak memory: cogact_tiny on CPU; with a GPU, the full-size CogACT (random weights) under
LoRA and full finetuning, bf16.

    .venv/bin/python -m benchmarks.train_step                       # cogact_tiny on CPU
    .venv/bin/python -m benchmarks.train_step --full-size --finetune lora full --batch-size 8   # needs a CUDA GPU
    .venv/bin/python -m benchmarks.train_step --batch-size 32 --overrides experiment=maniskill_e2e   # the e2e model
    .venv/bin/python -m benchmarks.train_step --model flow_tiny      # another family (conf/model/*.yaml)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from models.checkpoint import git_revision
from models.finetune import apply_finetune

REPO = Path(__file__).resolve().parent.parent


def build(model_name: str, finetune: str, device: torch.device, overrides: list[str]) -> torch.nn.Module:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"model={model_name}", f"finetune={finetune}"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if "pretrained" in model_cfg:
        model_cfg["pretrained"] = None  # random weights: nothing is downloaded
    model_cfg["llm_backbone"]["tokenizer"] = "tiny"  # Llama-2's tokenizer is gated; the vocab size stays as configured
    with device:
        model = instantiate(model_cfg)
    apply_finetune(model, cfg.finetune)
    if device.type == "cuda":  # as train.py under mixed_precision=bf16 (cast_frozen): the frozen base in bf16
        model.cast_backbone(torch.bfloat16, frozen_only=True)
    return model


def measure(
    model_name: str, finetune: str, batch_size: int, steps: int, warmup: int, device: torch.device, overrides: list[str]
) -> dict:
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build(model_name, finetune, device, overrides).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    size = model.image_size
    batch = {
        "image": torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, device=device),
        "prompt": ["pick up the red cube and place it in the bowl"] * batch_size,
        "action": torch.rand(batch_size, model.action_horizon, model.action_dim, device=device) * 2 - 1,
    }
    for key, dim in (("state", getattr(model, "proprio_dim", None)), ("aux", getattr(model, "aux_dim", None))):
        if dim:  # a model configured with a proprio input or an auxiliary target gets one
            batch[key] = torch.rand(batch_size, dim, device=device) * 2 - 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    timings = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            timings.append(time.perf_counter() - start)
    step_s = sorted(timings)[len(timings) // 2]
    row = {
        "model": model_name,
        "finetune": finetune,
        "batch_size": batch_size,
        "median_step_s": step_s,
        "steps_per_s": 1 / step_s,
        "frames_per_s": batch_size / step_s,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen_in_bf16": sum(p.numel() for p in model.parameters() if p.dtype == torch.bfloat16),
        "peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }
    if device.type == "cuda":
        row["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del model, optimizer
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="the 7B CogACT (random weights); needs a GPU")
    parser.add_argument("--model", default=None, help="conf/model/<name>; default cogact_tiny (cogact: --full-size)")
    modes = ["full", "lora", "lora_openvla", "head_only", "frozen_vision"]
    parser.add_argument("--finetune", nargs="+", default=["full"], choices=modes, help="conf/finetune/<name>")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--overrides", nargs="*", default=[], help="train.py overrides first, e.g. experiment=...")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.full_size and device.type != "cuda":
        raise SystemExit("--full-size needs a CUDA GPU")
    model_name = args.model or ("cogact" if args.full_size else "cogact_tiny")
    rows = [
        measure(model_name, mode, args.batch_size, args.steps, args.warmup, device, args.overrides)
        for mode in args.finetune
    ]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'})"
    print(f"device: {device_name}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':<16}{'finetune':<15}{'batch':>6}{'step s':>9}{'steps/s':>9}{'frames/s':>10}{'peak GB':>9}")
    for row in rows:
        peak = row.get("peak_gpu_memory_gb", row["peak_host_rss_gb"])
        print(
            f"{row['model']:<16}{row['finetune']:<15}{row['batch_size']:>6}{row['median_step_s']:>9.3f}"
            f"{row['steps_per_s']:>9.2f}{row['frames_per_s']:>10.1f}{peak:>9.2f}"
        )
    variant = "".join(f"_{o.replace('=', '-').replace('/', '-')}" for o in args.overrides)
    out = REPO / "benchmarks" / "results" / f"train_step_{rows[0]['model']}_{device.type}{variant}.json"
    meta = {
        "device": device_name,
        "date": datetime.now(UTC).isoformat(),
        "git_revision": git_revision(),
        "overrides": args.overrides,
    }
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
