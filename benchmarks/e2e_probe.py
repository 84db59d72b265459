"""Where an end-to-end checkpoint's errors come from: how far its object-position head is off on held-out frames, and
where its gripper is relative to the cube when it first closes in PickCube-v1 episodes.

    .venv/bin/python -m benchmarks.e2e_probe <run>/checkpoints/step_003500 \
        --rlds data/maniskill_e2e/data/rlds --seeds 100000 100001 100002

Prints per seed the tcp-minus-cube offset (cm) at the first close and whether the cube was ever grasped, then the
head's mean and median absolute error per target dim (cm) over held-out frames (the run's own split and central crop).
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


def first_close(policy, robot: dict, seed: int, execute_steps: int, max_steps: int) -> tuple[np.ndarray | None, bool]:
    """One PickCube-v1 episode: the tcp-minus-cube offset (m) when the gripper first closes, and whether the cube
    was grasped at any step."""
    from serving.observation import adapt_observation
    from sim.actions import to_env_action
    from sim.maniskill import default_prompt, make_eval_env

    camera_size = robot.get("camera_size") or 128  # as trained (checkpoints record it), else ManiSkill's default
    env = make_eval_env(PROMPT_TASK, robot["control_mode"], camera_size, robot["camera"], max_steps)
    task = env.unwrapped
    keys = {"image": "image", "wrist_image": None, "state": "state", "prompt": "prompt"}
    offset, grasped = None, False
    try:
        obs, _ = env.reset(seed=seed)
        chunk = []
        for step in range(max_steps):
            if not chunk:
                message = {**obs, "prompt": default_prompt(PROMPT_TASK)}
                observation = adapt_observation(
                    message, keys, policy.image_size, crop=policy.center_crop, roi=policy.image_roi
                )
                torch.manual_seed(step)
                chunk = list(policy.predict_action(observation)[:execute_steps])
            action, _ = to_env_action(chunk.pop(0), robot, env.action_space.low, env.action_space.high)
            if action[6] < 0 and offset is None:
                offset = (task.agent.tcp.pose.p[0] - task.cube.pose.p[0]).numpy()
            obs, _, terminated, truncated, info = env.step(action)
            grasped = grasped or bool(task.agent.is_grasping(task.cube)[0])
            if info["success"] or terminated or truncated:
                break
    finally:
        env.close()
    return offset, grasped


def grasp_offsets(ckpt: Path, seeds: list[int], execute_steps: int, max_steps: int) -> list:
    """first_close for each seed, in this process (the spawned child of main)."""
    from models.checkpoint import load_policy

    torch.set_num_threads(1)
    policy = load_policy(ckpt).eval()
    robot = OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml").robot, resolve=True)
    return [first_close(policy, robot, seed, execute_steps, max_steps) for seed in seeds]


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
        episodes = pool.apply(grasp_offsets, (args.ckpt, args.seeds, args.execute_steps, args.max_steps))
    for seed, (offset, grasped) in zip(args.seeds, episodes, strict=True):
        where = "never closed" if offset is None else f"tcp - cube at first close (cm) {_cm(offset)}"
        print(f"{PROMPT_TASK} seed {seed}: {where}; grasped: {grasped}", flush=True)
    errors = aux_errors(policy, args.ckpt, args.rlds, args.val_batches)
    print(f"object-position head on {len(errors)} held-out frames, |error| per dim (cm):")
    print(f"  mean   {_cm(errors.mean(0), sign='')}")
    print(f"  median {_cm(np.median(errors, 0), sign='')}")


def _cm(metres: np.ndarray, sign: str = "+") -> str:
    return "[" + ", ".join(f"{100 * v:{sign}.1f}" for v in metres) + "]"


if __name__ == "__main__":
    main()
