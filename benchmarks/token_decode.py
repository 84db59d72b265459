"""Query time of the token policy's greedy decoding (models/token_vla.py): the key-value cache it uses (one LLM pass
over image and prompt, then one single-token pass per further token) against one full LLM pass per token over image,
prompt and the tokens so far. Random weights, one query of one step (7 tokens), CPU.

    .venv/bin/python -m benchmarks.token_decode                      # three LLM sizes at 224 px
Writes benchmarks/results/token_decode_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from models.checkpoint import git_revision
from models.token_vla import TokenVLA

REPO = Path(__file__).resolve().parent.parent
SIZES = ((64, 2), (512, 8), (1024, 8))  # (LLM width, layers); token_vla_tiny's vision backbone


@torch.no_grad()
def decode_by_full_passes(model: TokenVLA, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The reference: every token from a full pass over image, prompt and the tokens decoded so far."""
    patches = model.image_patches(images)
    first, vocab = model.action_tokenizer.first_id, model.action_tokenizer.vocab_size
    ids = torch.empty(len(prompts), 0, dtype=torch.long)
    for _ in range(model.action_horizon * model.action_dim):
        hidden, last = model.hidden_states(patches, prompts, ids.tolist())
        logits = model.llm_backbone.logits(hidden[torch.arange(len(prompts)), last])[:, first:vocab]
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True) + first], dim=1)
    return ids


def median_seconds(decode, model: TokenVLA, images: torch.Tensor, prompts: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decode(model, images, prompts)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for width, layers in SIZES:
        overrides = [
            "model=token_vla_tiny",
            f"model.image_size={args.image_size}",
            f"model.llm_backbone.hidden_size={width}",
            f"model.llm_backbone.num_layers={layers}",
            f"model.llm_backbone.intermediate_size={3 * width}",
        ]
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        torch.manual_seed(0)
        model = instantiate(cfg.model).eval()
        images = torch.randint(0, 256, (1, args.image_size, args.image_size, 3), dtype=torch.uint8)
        prompts = ["pick up the red cube and place it in the bowl"]
        cached_ids, _ = model.decode_tokens(images, prompts)
        if not torch.equal(cached_ids, decode_by_full_passes(model, images, prompts)):
            raise SystemExit(f"width {width}: the cached decoding differs from full passes")
        cached = median_seconds(TokenVLA.decode_tokens, model, images, prompts, args.repeats)
        full = median_seconds(decode_by_full_passes, model, images, prompts, args.repeats)
        row = {"llm_width": width, "llm_layers": layers, "cached_s": cached, "full_passes_s": full}
        rows.append(row)
        print(
            f"LLM {width} x {layers}, {args.image_size} px: cached {cached * 1000:.0f} ms, "
            f"full passes {full * 1000:.0f} ms ({full / cached:.1f}x)"
        )
    result = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "image_size": args.image_size,
        "tokens_per_query": 7,
        "rows": rows,
        "git_revision": git_revision(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out = REPO / "benchmarks" / "results" / "token_decode_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
