"""Closed-loop evaluation episodes in which the policy is reached only through openpi's client, as a remote user's is.

Episodes run on a vector env of `workers` envs (sim.maniskill.make_vector_env), each env with its own client
connection. Episode i resets with seed + i whichever env runs it; ManiSkill gives identical states for the same seed
and the same actions, so with a deterministic policy the results do not depend on the number of workers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
from tqdm import tqdm

from datasets.atomic import write_json_atomic
from models.ensemble import AdaptiveEnsembler, robot_gripper
from sim.actions import ACTION_DIM, ChunkExecution, to_env_action
from sim.client import PolicyClient, PolicyConnectionError
from sim.video import EpisodeVideo

logger = logging.getLogger(__name__)


class PolicyReplyError(ValueError):
    """The server answered, but not with a usable action chunk."""


# What ends an episode as failed: the server reported an error (openpi's client raises RuntimeError on a text
# frame), the server is gone for good, or its reply is unusable. Never replaced by a substitute action.
POLICY_ERRORS = (RuntimeError, PolicyConnectionError, PolicyReplyError)


@dataclass(frozen=True)
class EvalSettings:
    num_episodes: int
    seed: int = 0  # episode i resets with seed + i
    max_steps: int = 50
    execute_steps: int = 4  # actions executed from each chunk before the next query
    prompt: str | None = None  # None: each episode's own instruction (the env's get_language_instruction())
    ensemble_horizon: int | None = None  # AdaptiveEnsembler over this many chunks, queried every step; None: off
    ensemble_alpha: float = 0.1
    save_images: bool = False  # first and last frame of each episode, images/*.png
    save_videos: bool = False  # every frame with the prompt written below, videos/*.mp4


@dataclass
class EpisodeResult:
    episode: int
    seed: int
    prompt: str
    worker: int = 0  # which env of the vector env ran it
    success: bool = False  # info["success"] at any step
    steps: int = 0
    episode_return: float = 0.0
    clipped_components: int = 0  # action components that clipping to the controller's bounds changed
    clipped_steps: int = 0  # steps with at least one clipped component
    policy_calls: int = 0
    latency_ms_mean: float | None = None  # client round trip per policy call
    latency_ms_max: float | None = None
    reconnects: int = 0  # reconnections to the policy server during the episode
    error: str | None = None  # why the episode stopped early; such an episode counts as failed
    images: list[str] = field(default_factory=list)
    video: str | None = None


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a success rate (95% with z = 1.96); (0, 1) without trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def action_chunk(reply: object, min_steps: int) -> np.ndarray:
    """The reply's actions float [T >= min_steps, 7], finite."""
    actions = reply.get("actions") if isinstance(reply, dict) else None
    if (
        not isinstance(actions, np.ndarray)
        or actions.ndim != 2
        or actions.shape[0] < min_steps
        or actions.shape[1] != ACTION_DIM
    ):
        shape = list(actions.shape) if isinstance(actions, np.ndarray) else type(actions).__name__
        raise PolicyReplyError(f'reply["actions"] must be float [T >= {min_steps}, {ACTION_DIM}], got {shape}')
    if not np.isfinite(actions).all():
        raise PolicyReplyError('reply["actions"] contains NaN or inf')
    return actions


class _RunningEpisode:
    """One episode in progress on one env of the vector env, with that env's client."""

    def __init__(
        self,
        result: EpisodeResult,
        observation: dict,
        client: PolicyClient,
        execution: ChunkExecution,
        robot: Mapping,
        out_dir: Path,
        settings: EvalSettings,
        fps: float,
    ) -> None:
        self.result, self.client, self.execution, self.robot = result, client, execution, robot
        self.observation = observation
        self.pending: deque[np.ndarray] = deque()
        self.latencies: list[float] = []
        self.reconnects_at_start = client.reconnects
        name = f"episode{result.episode:03d}_seed{result.seed}"
        self.image_prefix = out_dir / "images" / name if settings.save_images else None
        self.video = None
        if settings.save_videos:
            self.video = EpisodeVideo(out_dir / "videos" / f"{name}.mp4", result.prompt, fps)
        self._record_frame()
        execution.reset()

    def next_action(self, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        """The next env action, querying the policy when the current chunk is used up (may raise POLICY_ERRORS)."""
        if not self.pending:
            keys = self.robot["observation_keys"]
            start = time.perf_counter()
            message = {keys["image"]: self.observation["image"], keys["prompt"]: self.result.prompt}
            for name in ("state", "wrist_image"):  # sent when the robot names a key and the env renders it
                if keys.get(name) and name in self.observation:
                    message[keys[name]] = self.observation[name]
            reply = self.client.infer(message)
            self.latencies.append((time.perf_counter() - start) * 1000)
            self.pending.extend(self.execution(action_chunk(reply, self.execution.steps_per_chunk)))
        env_action, clipped = to_env_action(self.pending.popleft(), self.robot, low, high)
        self.result.clipped_components += clipped
        self.result.clipped_steps += clipped > 0
        return env_action

    def record_step(self, observation: dict, reward: float, done: bool, success: bool, max_steps: int) -> bool:
        """Account one env step; True when the episode is over (done, or max_steps reached)."""
        self.observation = observation
        self.result.steps += 1
        self.result.episode_return += float(reward)
        self.result.success |= bool(success)
        self._record_frame()
        return done or self.result.steps >= max_steps

    def finish(self, error: BaseException | None = None) -> EpisodeResult:
        result = self.result
        if error is not None:
            result.error = f"{type(error).__name__}: {error}"
            logger.warning("episode %d failed after %d steps: %s", result.episode, result.steps, result.error)
        result.policy_calls = len(self.latencies)
        if self.latencies:
            result.latency_ms_mean, result.latency_ms_max = float(np.mean(self.latencies)), max(self.latencies)
        result.reconnects = self.client.reconnects - self.reconnects_at_start
        if self.image_prefix is not None and result.steps > 0:
            result.images.append(self._save_image())
        self.close()
        return result

    def close(self) -> None:
        if self.video is not None:
            self.video.close()
            self.result.video = str(self.video.path)
            self.video = None

    def _record_frame(self) -> None:
        if self.video is not None:
            self.video.append(self.observation["image"])
        if self.image_prefix is not None and self.result.steps == 0:
            self.result.images.append(self._save_image())

    def _save_image(self) -> str:
        path = self.image_prefix.with_name(f"{self.image_prefix.name}_step{self.result.steps:03d}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(path, self.observation["image"])
        return str(path)


class ResultsLog:
    """<out_dir>/episodes.jsonl (one line per finished episode, in finishing order) and <out_dir>/results.json (the
    summary, rewritten after every episode so that an interrupted run keeps what it measured), and a progress bar."""

    def __init__(self, out_dir: Path, summary: dict, total: int) -> None:
        self.out_dir, self.config = out_dir, summary
        self.episodes: list[EpisodeResult] = []
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "episodes.jsonl").write_text("")
        self.progress = tqdm(total=total, desc="episodes", unit="episode", dynamic_ncols=True)

    def add(self, episode: EpisodeResult) -> None:
        self.episodes.append(episode)
        with open(self.out_dir / "episodes.jsonl", "a") as f:
            f.write(json.dumps(asdict(episode)) + "\n")
        summary = self.summary()
        write_json_atomic(self.out_dir / "results.json", summary)
        self.progress.update()
        self.progress.set_postfix(success=f"{summary['success_rate']:.2f}")
        logger.info(
            "episode %d seed %d: success=%s steps=%d return=%.3f%s",
            episode.episode,
            episode.seed,
            episode.success,
            episode.steps,
            episode.episode_return,
            f" error={episode.error}" if episode.error else "",
        )

    def summary(self) -> dict:
        """{"config", "num_episodes", "successes", "success_rate", "success_rate_ci95": [low, high] (Wilson),
        "episodes_with_errors", "mean_return", "mean_steps", "policy_latency_ms_mean", "episodes": [...]}."""
        episodes = sorted(self.episodes, key=lambda e: e.episode)
        n, successes = len(episodes), sum(e.success for e in episodes)
        latencies = [e.latency_ms_mean for e in episodes if e.latency_ms_mean is not None]
        return {
            "config": self.config,
            "num_episodes": n,
            "successes": successes,
            "success_rate": successes / n if n else 0.0,
            "success_rate_ci95": list(wilson_interval(successes, n)),
            "episodes_with_errors": sum(e.error is not None for e in episodes),
            "mean_return": float(np.mean([e.episode_return for e in episodes])) if n else None,
            "mean_steps": float(np.mean([e.steps for e in episodes])) if n else None,
            "policy_latency_ms_mean": float(np.mean(latencies)) if latencies else None,
            "episodes": [asdict(e) for e in episodes],
        }

    def close(self) -> None:
        self.progress.close()


def _unbatch(obs: dict, k: int) -> dict:
    """Env k's observation out of a vector env's batched {"image": [N, H, W, 3], "state": [N, S]}."""
    return {key: value[k] for key, value in obs.items()}


def evaluate(
    envs: gym.vector.VectorEnv,
    clients: Sequence[PolicyClient],
    robot: Mapping,
    settings: EvalSettings,
    out_dir: Path,
    summary: dict,
) -> dict:
    """Run settings.num_episodes episodes, env k of `envs` querying the policy through clients[k]. Each env takes
    the next seed as soon as its episode ends; envs with nothing left to run are stepped with zero actions, whose
    results are ignored, until the others finish. Returns the results.json summary (ResultsLog.summary)."""
    if settings.num_episodes < 1:
        raise ValueError(f"num_episodes must be at least 1, got {settings.num_episodes}")
    if len(clients) != envs.num_envs:
        raise ValueError(f"need one client per env: {len(clients)} clients for {envs.num_envs} envs")
    low, high = envs.single_action_space.low, envs.single_action_space.high
    fps = envs.metadata.get("render_fps", 20)
    queue = deque((index, settings.seed + index) for index in range(settings.num_episodes))
    running: list[_RunningEpisode | None] = [None] * envs.num_envs
    log = ResultsLog(out_dir, summary, settings.num_episodes)

    def execution() -> ChunkExecution:
        ensembler = None
        if settings.ensemble_horizon is not None:
            ensembler = AdaptiveEnsembler(settings.ensemble_horizon, settings.ensemble_alpha, robot_gripper(robot))
        return ChunkExecution(settings.execute_steps, ensembler)

    executions = [execution() for _ in clients]

    def finish(k: int, error: BaseException | None = None) -> None:
        log.add(running[k].finish(error))
        running[k] = None

    try:
        while True:
            starts = {k: queue.popleft() for k in range(envs.num_envs) if running[k] is None and queue}
            if starts:
                mask = np.array([k in starts for k in range(envs.num_envs)])
                seeds = [starts[k][1] if k in starts else None for k in range(envs.num_envs)]
                obs, info = envs.reset(seed=seeds, options={"reset_mask": mask})
                for k, (index, seed) in starts.items():
                    prompt = settings.prompt or str(info["prompt"][k])
                    if not prompt:
                        raise ValueError("the task has no instruction of its own: pass a prompt")
                    result = EpisodeResult(episode=index, seed=seed, prompt=prompt, worker=k)
                    running[k] = _RunningEpisode(
                        result, _unbatch(obs, k), clients[k], executions[k], robot, out_dir, settings, fps
                    )
                    try:
                        clients[k].reset()
                    except POLICY_ERRORS as error:
                        finish(k, error)
            if all(episode is None for episode in running):
                if queue:
                    continue
                break
            actions = np.zeros((envs.num_envs, *envs.single_action_space.shape), np.float32)
            for k, episode in enumerate(running):
                if episode is not None:
                    try:
                        actions[k] = episode.next_action(low, high)
                    except POLICY_ERRORS as error:
                        finish(k, error)
            if all(episode is None for episode in running):
                continue
            obs, reward, terminated, truncated, info = envs.step(actions)
            for k, episode in enumerate(running):
                done = bool(terminated[k] or truncated[k])
                if episode is not None and episode.record_step(
                    _unbatch(obs, k), reward[k], done, info["success"][k], settings.max_steps
                ):
                    finish(k)
    finally:
        for episode in running:
            if episode is not None:
                episode.close()
        log.close()
    return log.summary()
