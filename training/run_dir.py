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


JOB_NAME_BYTES = 200


def job_dirname(overrides: str) -> str:
    """`${job_dirname:${hydra.job.override_dirname}}`: a multirun job's dir name from its overrides, one dir (a "/"
    in a value would nest dirs) whose name stays far from the file system's 255 bytes (a long sweep's overrides
    exceed it); .hydra/overrides.yaml in the dir holds them whole."""
    name = overrides.replace("/", "_")
    if len(name.encode()) <= JOB_NAME_BYTES:
        return name
    while len(name.encode()) > JOB_NAME_BYTES - 3:
        name = name[:-1]
    return name + "..."


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
    if not OmegaConf.has_resolver("job_dirname"):
        OmegaConf.register_new_resolver("job_dirname", job_dirname)
