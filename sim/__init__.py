"""ManiSkill3 evaluation: envs and tasks (`sim.maniskill`, `sim.pick_object`), action mapping (`sim.actions`), the
reconnecting policy client (`sim.client`), episodes and results (`sim.episode`), episode videos (`sim.video`)."""

from sim.actions import ChunkExecution, to_env_action
from sim.client import PolicyClient, PolicyConnectionError
from sim.episode import EpisodeResult, EvalSettings, evaluate, wilson_interval
from sim.maniskill import (
    EPISODE_PROMPT_TASKS,
    STATE_DIM,
    TASK_PROMPTS,
    CameraEnv,
    camera_image,
    check_task,
    default_prompt,
    make_env,
    make_eval_env,
    make_vector_env,
    resolve_prompt,
    task_kwargs,
)
from sim.video import EpisodeVideo

__all__ = [
    "EPISODE_PROMPT_TASKS",
    "STATE_DIM",
    "TASK_PROMPTS",
    "CameraEnv",
    "ChunkExecution",
    "EpisodeResult",
    "EpisodeVideo",
    "EvalSettings",
    "PolicyClient",
    "PolicyConnectionError",
    "camera_image",
    "check_task",
    "default_prompt",
    "evaluate",
    "make_env",
    "make_eval_env",
    "make_vector_env",
    "resolve_prompt",
    "task_kwargs",
    "to_env_action",
    "wilson_interval",
]
