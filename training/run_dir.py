"""`${run_stamp:}`: one run-dir timestamp that every rank of a multi-process launch agrees on.

`${now:}` is evaluated in each rank and can differ by a second; here ranks launched together (torchrun /
`accelerate launch` children of one launcher process) take the launcher's start time. VLA_RUN_STAMP overrides it
(multi-node jobs on a shared filesystem should set it, e.g. to the SLURM job id).
"""

from __future__ import annotations

import os
import time

import psutil
from omegaconf import OmegaConf


def run_stamp() -> str:
    if stamp := os.environ.get("VLA_RUN_STAMP"):
        return stamp
    started = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        started = psutil.Process(os.getppid()).create_time()
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
