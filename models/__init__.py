"""Policies: the contract (`models.policy`), model families (one folder each) and checkpoint I/O."""

from models.checkpoint import load_config, load_policy, save_checkpoint
from models.policy import Observation, Policy

__all__ = ["Observation", "Policy", "load_config", "load_policy", "save_checkpoint"]
