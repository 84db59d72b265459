"""Policies: the contract (`models.policy`), model families (one folder each) and checkpoint I/O.

Checkpoint I/O is imported lazily: the server and the evaluator import `models.policy` without pulling in peft,
transformers or hydra until a checkpoint is actually loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.policy import Observation, Policy

if TYPE_CHECKING:
    from models.checkpoint import load_config, load_policy, save_checkpoint

__all__ = ["Observation", "Policy", "load_config", "load_policy", "save_checkpoint"]


def __getattr__(name: str):
    if name in ("load_config", "load_policy", "save_checkpoint"):
        from models import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
