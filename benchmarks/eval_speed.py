"""Evaluation speed on this machine: ManiSkill3 env steps/s on the CPU backends (state-only, and RGB at 128 and 224 px
after the first render), and end-to-end policy Hz of the evaluator's own loop (sim.evaluate: openpi client over
loopback to the policy server, the policy queried at every env step) with a no-op policy and with cogact_tiny, for
workers=1 (one env in this process) and workers=2 (two env processes).

    .venv/bin/python -m benchmarks.eval_speed            # full run, about 5 minutes on 2 cores
    .venv/bin/python -m benchmarks.eval_speed --quick    # about 2 minutes
Prints a table and writes benchmarks/results/eval_speed.json (eval_speed_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported: no progress bars between the rows

import numpy as np
import torch
from omegaconf import OmegaConf

from models.policy import Observation, Policy
from serving import PolicyServer, ServerThread
from sim import EvalSettings, PolicyClient, default_prompt, evaluate, make_env, make_vector_env

REPO = Path(__file__).resolve().parent.parent
ENV_ID = "PushCube-v1"
ROBOT = OmegaConf.load(REPO / "conf/robot/maniskill_panda.yaml")


class NoOpPolicy(Policy):
    """Zero actions at once: what is left is the sim, the wire and the evaluator's own loop."""

    def __init__(self, image_size: int = 224, horizon: int = 16) -> None:
        super().__init__()
        self.action_dim, self.action_horizon, self.image_size = 7, horizon, image_size

    def predict_action_batch(self, observations: list[Observation]) -> np.ndarray:
        return np.zeros((len(observations), self.action_horizon, self.action_dim), np.float32)


def cogact_tiny() -> Policy:
    """cogact_tiny (random weights) from conf/train.yaml, with statistics in the dataset_statistics.json format."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model=cogact_tiny"])
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    bounds = {"mean": [0.0] * 7, "std": [1.0] * 7, "max": [1.0] * 7, "min": [-1.0] * 7}
    action = {**bounds, "q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}
    proprio = {key: [0.0 if key in ("mean", "min", "q01") else 1.0] * 8 for key in (*bounds, "q01", "q99")}
    model.set_statistics({"bench": {"action": action, "proprio": proprio, "num_transitions": 1, "num_trajectories": 1}})
    return model


def env_steps_per_s(obs_mode: str, image_size: int, steps: int) -> dict:
    """Random actions in one env; building it, the first reset and 5 steps (the first render) are timed apart."""
    start = time.perf_counter()
    env = make_env(ENV_ID, "pd_ee_delta_pose", image_size, obs_mode=obs_mode)
    build_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    env.reset(seed=0)
    for _ in range(5):
        env.step(rng.uniform(-1, 1, 7).astype(np.float32))
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        *_, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 7).astype(np.float32))
        if terminated.item() or truncated.item():
            env.reset()
    elapsed = time.perf_counter() - start
    env.close()
    name = "state" if obs_mode == "state" else f"rgb {image_size} px"
    return {"obs": name, "steps": steps, "steps_per_s": steps / elapsed, "build_s": build_s, "warmup_s": warmup_s}


def end_to_end(policy_name: str, policy: Policy, workers: int, episodes: int, max_steps: int) -> dict:
    """sim.evaluate through a real server; env construction and each env's first render are not timed."""
    with ServerThread(PolicyServer(policy, ROBOT.observation_keys)) as server:
        envs = make_vector_env(ENV_ID, ROBOT.control_mode, policy.image_size, ROBOT.camera, max_steps, workers)
        clients = [PolicyClient(server.host, server.port) for _ in range(workers)]
        try:
            start = time.perf_counter()
            envs.reset(seed=list(range(workers)))
            envs.step(np.zeros((workers, 7), np.float32))
            setup_s = time.perf_counter() - start
            settings = EvalSettings(episodes, max_steps=max_steps, execute_steps=1, prompt=default_prompt(ENV_ID))
            with tempfile.TemporaryDirectory() as out_dir:
                start = time.perf_counter()
                results = evaluate(envs, clients, ROBOT, settings, Path(out_dir), {})
                elapsed = time.perf_counter() - start
        finally:
            for client in clients:
                client.close()
            envs.close()
    episodes_run = results["episodes"]
    if any(e["error"] for e in episodes_run):
        raise RuntimeError(f"an episode failed: {[e['error'] for e in episodes_run if e['error']]}")
    steps = sum(e["steps"] for e in episodes_run)
    calls = sum(e["policy_calls"] for e in episodes_run)
    return {
        "policy": policy_name,
        "image_size": policy.image_size,
        "workers": workers,
        "episodes": episodes,
        "env_steps": steps,
        "policy_hz": calls / elapsed,
        "env_steps_per_s": steps / elapsed,
        "round_trip_ms_mean": results["policy_latency_ms_mean"],
        "first_reset_s": setup_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (fewer steps and episodes)")
    args = parser.parse_args()
    env_steps = (60, 30) if args.quick else (600, 200)  # state-only, rgb
    episodes, max_steps = (2, 10) if args.quick else (4, 40)
    started = time.perf_counter()
    load = os.getloadavg()

    env_rows = [env_steps_per_s("state", 128, env_steps[0])]
    env_rows += [env_steps_per_s("rgb", size, env_steps[1]) for size in (128, 224)]
    policies = {"no-op": NoOpPolicy(), "cogact_tiny": cogact_tiny()}
    e2e_rows = [end_to_end(name, p, workers, episodes, max_steps) for name, p in policies.items() for workers in (1, 2)]

    print(f"ManiSkill3 {ENV_ID} on CPU, {os.cpu_count()} cores, load average {load[0]:.1f} at start")
    print(f"{'observation':<14}{'steps/s':>9}{'build s':>9}{'reset + 5 steps s':>19}")
    for row in env_rows:
        print(f"{row['obs']:<14}{row['steps_per_s']:>9.1f}{row['build_s']:>9.1f}{row['warmup_s']:>19.1f}")
    print("\nend to end through the policy server (queried every step)")
    print(f"{'policy':<13}{'px':>5}{'workers':>9}{'policy Hz':>11}{'round trip ms':>15}{'steps':>7}")
    for row in e2e_rows:
        print(
            f"{row['policy']:<13}{row['image_size']:>5}{row['workers']:>9}{row['policy_hz']:>11.1f}"
            f"{row['round_trip_ms_mean']:>15.1f}{row['env_steps']:>7}"
        )
    from models.checkpoint import git_revision

    meta = {
        "date": datetime.now(UTC).isoformat(),
        "git_revision": git_revision(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "env_id": ENV_ID,
        "total_s": time.perf_counter() - started,
    }
    out = REPO / "benchmarks" / "results" / ("eval_speed_quick.json" if args.quick else "eval_speed.json")
    out.write_text(json.dumps({**meta, "env_steps": env_rows, "end_to_end": e2e_rows}, indent=2))
    print(f"took {meta['total_s']:.0f} s\nresults: {out}")


if __name__ == "__main__":
    main()
