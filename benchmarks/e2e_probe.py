"""Where an end-to-end checkpoint's errors come from: how far its object-position head is off on held-out frames;
where its gripper is relative to the cube when it first closes in PickCube-v1 episodes, how close the grasped cube
gets to the goal, and whether the action head follows the goal in the state at all.

    .venv/bin/python -m benchmarks.e2e_probe <run>/checkpoints/step_003500 \
        --rlds data/maniskill_e2e/data/rlds --seeds 100000 100001 100002

Prints per seed the tcp-minus-cube offset (cm) at the first close, whether the cube was ever grasped, the cube-goal
distance while it was, and how the commanded xyz motion changes when the state's goal moves 5 cm along x, y or z
(a policy that carries the cube to the goal moves with it: positive diagonal); then the head's mean and median
absolute error per target dim (cm) over held-out frames (the run's own split and central crop).
Actions go straight from the policy to the env, as the evaluator maps them (sim.actions.to_env_action).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

PROMPT_TASK = "PickCube-v1"


def aux_errors(policy, ckpt: Path, rlds_root: Path, batches: int) -> np.ndarray:
    """|predicted - recorded| object positions in metres [frames, K] on the run's held-out episodes."""
    from datasets.rlds import LoaderConfig, RLDSSource, iterate_torch, make_frame_dataset
    from datasets.statistics import unnormalize

    cfg = OmegaConf.load(ckpt / "config.yaml")
    statistics = json.loads((ckpt / "dataset_statistics.json").read_text())
    sources = [RLDSSource(**{**dict(s), "data_dir": str(rlds_root)}) for s in cfg.dataset.sources]
    loader = LoaderConfig(
        image_size=policy.image_size,
        window=policy.action_horizon,
        action_dim=cfg.robot.action_dim,
        batch_size=32,
        **OmegaConf.to_container(cfg.loader),
    )
    predicted, recorded = [], []
    with torch.no_grad():
        for i, batch in enumerate(iterate_torch(make_frame_dataset(sources, statistics, loader, "val"))):
            if i >= batches:
                break
            cognition = policy.cognition_features(batch["image"], batch["prompt"])
            predicted.append(policy.aux_head(cognition[:, 0]).float().numpy())
            recorded.append(batch["aux"].numpy())
    if not predicted:
        raise SystemExit(f"{rlds_root}: the run's held-out split (loader.val_fraction) has no frames")
    stats = statistics[sources[0].key]["aux"]
    predicted, recorded = (unnormalize(np.concatenate(x), stats, binarize_gripper=False) for x in (predicted, recorded))
    return np.abs(predicted - recorded)


GOAL_SHIFT = 0.05  # metres the goal is moved along each axis to see whether the action head follows it


def probe_episode(policy, robot: dict, seed: int, execute_steps: int, max_steps: int) -> dict:
    """One PickCube-v1 episode. Returns the tcp-minus-cube offset (m) when the gripper first closes ("offset", None if
    it never closes); whether the cube was ever grasped; the cube-to-goal distance (m) at the first grasped step, the
    least while grasped and at the end ("carry", None without a grasp); and "goal_response": how the policy's mean
    xyz action over its first 4 steps changes when the state's goal moves GOAL_SHIFT along x, y and z ([3 shifts,
    3 action dims], in the policy's units, which robot=maniskill_panda maps 1:1 to the env's: 1 = 10 cm), taken at
    the first grasped step (else the last), "where"."""
    from serving.observation import policy_observation
    from sim.actions import to_env_action
    from sim.maniskill import default_prompt, make_eval_env

    camera_size = robot.get("camera_size") or 128  # as trained (checkpoints record it), else ManiSkill's default
    env = make_eval_env(PROMPT_TASK, robot["control_mode"], camera_size, robot["camera"], max_steps)
    task = env.unwrapped
    keys = {"image": "image", "wrist_image": None, "state": "state", "prompt": "prompt"}

    def adapt(obs: dict):
        message = {**obs, "prompt": default_prompt(PROMPT_TASK)}
        return policy_observation(message, keys, policy)

    def to_goal() -> float:
        return float(np.linalg.norm((task.goal_site.pose.p[0] - task.cube.pose.p[0]).numpy()))

    offset, distances, probed, where = None, [], None, "last step"
    try:
        obs, _ = env.reset(seed=seed)
        chunk = []
        for step in range(max_steps):
            if not chunk:
                torch.manual_seed(step)
                chunk = list(policy.predict_action(adapt(obs))[:execute_steps])
            action, _ = to_env_action(chunk.pop(0), robot, env.action_space.low, env.action_space.high)
            if action[6] < 0 and offset is None:
                offset = (task.agent.tcp.pose.p[0] - task.cube.pose.p[0]).numpy()
            obs, _, terminated, truncated, info = env.step(action)
            if bool(task.agent.is_grasping(task.cube)[0]):
                if not distances:
                    probed, where = dict(obs), f"first grasped step {step + 1}"
                distances.append(to_goal())
            if info["success"] or terminated or truncated:
                break
        final = to_goal()
    finally:
        env.close()
    response = goal_response(policy, adapt, probed if probed is not None else obs)
    carry = (distances[0], min(distances), final) if distances else None
    return {"offset": offset, "grasped": bool(distances), "carry": carry, "goal_response": response, "where": where}


def goal_response(policy, adapt, obs: dict) -> np.ndarray:
    """[3, 3]: row i is the change of the mean xyz action (first 4 steps, 4 noise seeds) when the goal in the state
    moves GOAL_SHIFT along axis i (its goal - tcp part with it)."""
    from sim.maniskill import STATE_GOAL, STATE_TO_GOAL

    def mean_xyz(state: np.ndarray) -> np.ndarray:
        observation = adapt({**obs, "state": state})
        draws = []
        for seed in range(4):
            torch.manual_seed(seed)
            draws.append(policy.predict_action(observation)[:4, :3].mean(0))
        return np.mean(draws, 0)

    base = mean_xyz(obs["state"])
    rows = []
    for axis in range(3):
        state = np.array(obs["state"], np.float32)
        state[STATE_GOAL][axis] += GOAL_SHIFT
        state[STATE_TO_GOAL][axis] += GOAL_SHIFT
        rows.append(mean_xyz(state) - base)
    return np.stack(rows)


def probe_episodes(ckpt: Path, seeds: list[int], execute_steps: int, max_steps: int) -> list[dict]:
    """probe_episode for each seed, in this process (the spawned child of main)."""
    from models.checkpoint import load_policy

    torch.set_num_threads(1)
    policy = load_policy(ckpt).eval()
    robot = OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml").robot, resolve=True)
    return [probe_episode(policy, robot, seed, execute_steps, max_steps) for seed in seeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--rlds", type=Path, required=True, help="root dir of the run's RLDS dataset")
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="*", default=[100_000, 100_001, 100_002])
    parser.add_argument("--execute-steps", type=int, default=4, help="as eval_maniskill.py's execute_steps")
    parser.add_argument("--max-steps", type=int, default=138)
    args = parser.parse_args()

    from models.checkpoint import load_policy

    torch.set_num_threads(1)
    policy = load_policy(args.ckpt).eval()
    if getattr(policy, "aux_head", None) is None:
        raise SystemExit(f"{args.ckpt}: the model has no aux_head (model.aux_dim is null)")
    # The simulator in a process of its own: SAPIEN's renderer and TensorFlow segfault when one process loads both
    # (in either order; scripts/test.sh runs the simulator tests apart for the same reason).
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        episodes = pool.apply(probe_episodes, (args.ckpt, args.seeds, args.execute_steps, args.max_steps))
    for seed, episode in zip(args.seeds, episodes, strict=True):
        offset = episode["offset"]
        where = "never closed" if offset is None else f"tcp - cube at first close (cm) {_cm(offset)}"
        print(f"{PROMPT_TASK} seed {seed}: {where}; grasped: {episode['grasped']}", flush=True)
        if episode["carry"] is not None:
            print(
                "  cube - goal distance (cm) at the grasp, least while grasped, at the end: "
                + _cm(episode["carry"], "")
            )
        response = "; ".join(
            f"goal +{axis}: {_cm(row / 10, sign='+')}"
            for axis, row in zip("xyz", episode["goal_response"], strict=True)
        )
        print(
            f"  xyz action change (cm per step) at the {episode['where']} for a {100 * GOAL_SHIFT:.0f} cm goal shift: "
            f"{response}",
            flush=True,
        )
    errors = aux_errors(policy, args.ckpt, args.rlds, args.val_batches)
    print(f"object-position head on {len(errors)} held-out frames, |error| per dim (cm):")
    print(f"  mean   {_cm(errors.mean(0), sign='')}")
    print(f"  median {_cm(np.median(errors, 0), sign='')}")


def _cm(metres: np.ndarray, sign: str = "+") -> str:
    return "[" + ", ".join(f"{100 * v:{sign}.1f}" for v in metres) + "]"


if __name__ == "__main__":
    main()
