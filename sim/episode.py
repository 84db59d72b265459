"""Closed-loop episodes in which the policy is reached only through the openpi client, as a remote user's would be."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed

from datasets.statistics import write_json_atomic
from sim.actions import to_env_action
from sim.maniskill import camera_image

logger = logging.getLogger(__name__)


class PolicyReplyError(ValueError):
    """The server answered, but not with a usable action chunk."""


@dataclass
class EpisodeResult:
    seed: int
    success: bool = False  # info["success"] at any step
    steps: int = 0
    episode_return: float = 0.0
    clipped_components: int = 0  # action components the env's bounds changed
    clipped_steps: int = 0  # steps with at least one clipped component
    policy_calls: int = 0
    latency_ms_mean: float | None = None  # client round trip per policy call
    latency_ms_max: float | None = None
    error: str | None = None  # why the episode stopped early; such an episode counts as failed
    images: list[str] = field(default_factory=list)


def _action_chunk(reply: object, execute_steps: int) -> np.ndarray:
    """The reply's actions float [T, 7] with T >= execute_steps, finite."""
    actions = reply.get("actions") if isinstance(reply, dict) else None
    if not isinstance(actions, np.ndarray) or actions.ndim != 2 or actions.shape[0] < execute_steps:
        shape = list(actions.shape) if isinstance(actions, np.ndarray) else type(actions).__name__
        raise PolicyReplyError(f'reply["actions"] must be float [T >= execute_steps={execute_steps}, 7], got {shape}')
    if not np.isfinite(actions).all():
        raise PolicyReplyError('reply["actions"] contains NaN or inf')
    return actions


def run_episode(
    env: gym.Env,
    client: WebsocketClientPolicy,
    robot: Mapping,
    *,
    prompt: str,
    seed: int,
    camera: str,
    max_steps: int,
    execute_steps: int,
    image_prefix: Path | None = None,
) -> EpisodeResult:
    """Reset with `seed`, then query the policy and execute the first `execute_steps` actions of each chunk until
    the task terminates or `max_steps` env steps. The client sends {image, prompt} under the keys named by
    robot.observation_keys. A failed policy call ends the episode as failed with the reason (never a substitute
    action). With image_prefix, the first and last camera frames are saved as <image_prefix>_step<NNN>.png."""
    result = EpisodeResult(seed=seed)
    image_key, prompt_key = robot["observation_keys"]["image"], robot["observation_keys"]["prompt"]
    low, high = env.action_space.low, env.action_space.high
    latencies: list[float] = []
    obs, _ = env.reset(seed=seed)
    image = camera_image(obs, camera)
    if image_prefix is not None:
        result.images.append(_save(image, image_prefix, 0))
    try:
        if client.get_server_metadata().get("accepts_reset"):
            client.infer({"reset": True})
        done = False
        while not done and result.steps < max_steps:
            start = time.perf_counter()
            reply = client.infer({image_key: image, prompt_key: prompt})
            latencies.append((time.perf_counter() - start) * 1000)
            for action in _action_chunk(reply, execute_steps)[:execute_steps]:
                env_action, clipped = to_env_action(action, robot, low, high)
                obs, reward, terminated, truncated, info = env.step(env_action)
                result.steps += 1
                result.episode_return += float(reward.item())
                result.success |= bool(info["success"].item())
                result.clipped_components += clipped
                result.clipped_steps += clipped > 0
                done = bool(terminated.item() or truncated.item()) or result.steps >= max_steps
                if done:
                    break
            image = camera_image(obs, camera)
    except (RuntimeError, ConnectionClosed, OSError, PolicyReplyError) as error:
        result.error = f"{type(error).__name__}: {error}"
        logger.warning("episode with seed %d failed after %d steps: %s", seed, result.steps, result.error)
    result.policy_calls = len(latencies)
    if latencies:
        result.latency_ms_mean, result.latency_ms_max = float(np.mean(latencies)), float(np.max(latencies))
    if image_prefix is not None and result.steps > 0:
        result.images.append(_save(image, image_prefix, result.steps))
    return result


def _save(image: np.ndarray, prefix: Path, step: int) -> str:
    path = prefix.with_name(f"{prefix.name}_step{step:03d}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, image)
    return str(path)


def evaluate(
    env: gym.Env,
    client: WebsocketClientPolicy,
    robot: Mapping,
    *,
    prompt: str,
    camera: str,
    max_steps: int,
    execute_steps: int,
    num_episodes: int,
    seed: int,
    out_dir: Path,
    save_images: bool,
    summary: dict,
) -> dict:
    """Episode i uses seed + i. Rewrites <out_dir>/results.json after every episode, so an interrupted run keeps
    what it measured: {"config": summary, "episodes": [...], "num_episodes", "successes", "success_rate",
    "episodes_with_errors"}."""
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be at least 1, got {num_episodes}")
    results: dict = {"config": summary, "episodes": []}
    for index in range(num_episodes):
        episode_seed = seed + index
        prefix = out_dir / "images" / f"episode{index:03d}_seed{episode_seed}" if save_images else None
        episode = run_episode(
            env,
            client,
            robot,
            prompt=prompt,
            seed=episode_seed,
            camera=camera,
            max_steps=max_steps,
            execute_steps=execute_steps,
            image_prefix=prefix,
        )
        results["episodes"].append(asdict(episode))
        successes = sum(e["success"] for e in results["episodes"])
        results.update(
            num_episodes=len(results["episodes"]),
            successes=successes,
            success_rate=successes / len(results["episodes"]),
            episodes_with_errors=sum(e["error"] is not None for e in results["episodes"]),
        )
        write_json_atomic(out_dir / "results.json", results)
        logger.info(
            "episode %d/%d seed %d: success=%s steps=%d return=%.3f",
            index + 1,
            num_episodes,
            episode_seed,
            episode.success,
            episode.steps,
            episode.episode_return,
        )
    return results
