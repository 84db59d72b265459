"""ManiSkill3 evaluation: env factory (`sim.maniskill`), action mapping (`sim.actions`), episodes (`sim.episode`)."""

from sim.actions import to_env_action
from sim.episode import EpisodeResult, evaluate, run_episode
from sim.maniskill import TASK_PROMPTS, camera_image, default_prompt, make_env

__all__ = [
    "TASK_PROMPTS",
    "EpisodeResult",
    "camera_image",
    "default_prompt",
    "evaluate",
    "make_env",
    "run_episode",
    "to_env_action",
]
