"""End to end on CPU: ManiSkill3 demonstrations -> RLDS -> finetune -> serve -> evaluate, with success rates.

    .venv/bin/python -m benchmarks.maniskill_e2e                        # the full recipe (see --help for sizes)
    .venv/bin/python -m benchmarks.maniskill_e2e --mini                 # a miniature of every stage (the slow test)
    .venv/bin/python -m benchmarks.maniskill_e2e --tasks PickCube-v1 --ckpt <run>/checkpoints/step_003400 \
        --eval-override sampling.cfg_scale=1.0                          # evaluate a checkpoint again, otherwise

Stages: motion-planning demos (pd_joint_pos) per task -> replay to pd_ee_delta_pose with RGB -> one RLDS dataset per
task, with its instruction -> statistics pooled under one unnorm_key -> train.py experiment=maniskill_e2e (the tasks
sampled with equal weights) -> eval_maniskill.py per task on held-out seeds (the server started in-process from the
checkpoint). Writes benchmarks/results/maniskill_e2e_<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sim.maniskill import CAMERA_ROBOTS

REPO = Path(__file__).resolve().parent.parent
TASKS = ("PushCube-v1", "PickCube-v1", "StackCube-v1")
EVAL_SEED_OFFSET = 100_000  # demonstrations use seeds from 0; evaluation seeds never overlap them
DEFAULT_CAMERA_SIZE = 128  # ManiSkill's default camera resolution
WRIST_CAMERA = "hand_camera"  # robot=maniskill_panda's wrist_camera
# What train.py and the evaluation need for a policy that reads the wrist camera too: the model's second image, the
# key clients send it under (robot=maniskill_panda names none by default), the RLDS key it is stored under.
WRIST_TRAIN_OVERRIDES = ("model.wrist_image=true", "robot.observation_keys.wrist_image=wrist_image")
WRIST_IMAGE_KEY = "observation/wrist_image"


def run(cmd: list[str], log: Path, env: dict | None = None) -> str:
    """Run a stage's command, its output kept in log; returns stdout. Fails loudly with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        result = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=out, text=True, env=env)
    log.with_suffix(".stdout").write_text(result.stdout)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:4])} ... failed ({result.returncode}); see {log}:\n{log.read_text()[-2000:]}"
        )
    return result.stdout


def last_line_value(stdout: str, prefix: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith(prefix)]
    if not lines:
        raise RuntimeError(f"no '{prefix}' line in the output")
    return lines[-1].removeprefix(prefix).strip()


@dataclass(frozen=True)
class Cameras:
    """How the demonstrations are rendered on replay: the cameras' px, and whether the wrist camera (hand_camera)
    is recorded beside base_camera, on the panda_wristcam robot (the Panda with a camera mount)."""

    size: int = DEFAULT_CAMERA_SIZE
    wrist: bool = False

    @property
    def suffix(self) -> str:
        return ("_wrist" if self.wrist else "") + ("" if self.size == DEFAULT_CAMERA_SIZE else f"_{self.size}px")

    def dir(self, work: Path, name: str) -> Path:
        """work/<name> for ManiSkill's default rendering, work/<name>_wrist, work/<name>_<N>px, ... otherwise."""
        return work / f"{name}{self.suffix}"

    def recording(self, source: Path) -> Path:
        """The recorded trajectory to replay: `source` itself for the default rendering, else a copy of its .json
        (the .h5 linked beside it) whose env kwargs render these cameras; replay_trajectory makes its env from them.
        The motion-planning joint targets replay on panda_wristcam as on the Panda."""
        if not self.suffix:
            return source
        variant = source.with_name(f"{source.stem}{self.suffix}.h5")
        info = json.loads(source.with_suffix(".json").read_text())
        kwargs = info["env_info"]["env_kwargs"]
        kwargs["sensor_configs"] = {**(kwargs.get("sensor_configs") or {}), "width": self.size, "height": self.size}
        if self.wrist:
            kwargs["robot_uids"] = CAMERA_ROBOTS[WRIST_CAMERA]
        variant.with_suffix(".json").write_text(json.dumps(info))
        if not variant.exists():
            variant.symlink_to(source.name)
        return variant


def replayed_file(task: str, work: Path, cameras: Cameras) -> Path | None:
    """The task's replayed pd_ee_delta_pose RGB demonstrations (.h5) on disk, or None."""
    return next((cameras.dir(work, "demos") / task).glob(f"{task}.rgb.pd_ee_delta_pose.*.h5"), None)


def recorded(trajectory: Path) -> int:
    """Demos a trajectory holds by its .json; 0 when that is missing or cut short (an interrupted stage)."""
    try:
        return demo_counts(trajectory)["episodes"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def discard(trajectory: Path, count: int) -> None:
    """Delete a trajectory (.h5 and .json) that does not hold `count` demos, so that its stage runs again."""
    print(f"{trajectory}: {recorded(trajectory)} demos, not {count}; made again", flush=True)
    trajectory.with_suffix(".json").unlink(missing_ok=True)
    trajectory.unlink()


def record_demos(task: str, count: int, work: Path, logs: Path, envs: int = 1, cameras: Cameras = Cameras()) -> Path:
    """`count` motion-planning demos (pd_joint_pos), replayed into pd_ee_delta_pose with RGB observations of
    `cameras` by `envs` processes; returns the replayed .h5 path. Stages whose output holds `count` demos are
    skipped: a replay of another count is redone, a recording of fewer demos is recorded anew."""
    out = cameras.dir(work, "demos") / task
    source = work / "demos" / task / "motionplanning" / f"{task}.h5"
    replayed = replayed_file(task, work, cameras)
    if replayed is not None and recorded(replayed) != count:
        discard(replayed, count)
    if source.is_file() and recorded(source) < count:
        discard(source, count)
    if replayed_file(task, work, cameras) is None:
        if not source.is_file():
            run(
                [
                    sys.executable,
                    "-m",
                    "mani_skill.examples.motionplanning.panda.run",
                    "-e",
                    task,
                    "-n",
                    str(count),
                    "--only-count-success",
                    "-b",
                    "cpu",
                    "--record-dir",
                    str(work / "demos"),
                    "--traj-name",
                    task,
                ],
                logs / f"record_{task}.log",
            )
        recording = cameras.recording(source)
        run(
            [
                sys.executable,
                "-m",
                "mani_skill.trajectory.replay_trajectory",
                "--traj-path",
                str(recording),
                "-o",
                "rgb",
                "-c",
                "pd_ee_delta_pose",
                "-b",
                "physx_cpu",
                "--save-traj",
                "--count",
                str(count),
                "-n",
                str(envs),
            ],
            logs / f"replay_{task}.log",
        )
        for path in source.parent.glob(f"{recording.stem}.rgb.pd_ee_delta_pose.*"):  # named after the recording
            out.mkdir(parents=True, exist_ok=True)
            path.rename(out / path.name.replace(recording.stem, task, 1))
    (replayed,) = out.glob(f"{task}.rgb.pd_ee_delta_pose.*.h5")  # exactly one
    return replayed


def replayed_demos(task: str, work: Path, cameras: Cameras = Cameras()) -> Path:
    """The task's replayed demonstrations already on disk (--ckpt sizes its episode budget by them), or a clear
    error."""
    found = replayed_file(task, work, cameras)
    if found is None or not recorded(found):
        raise SystemExit(
            f"--ckpt: no replayed {task} demonstrations under {cameras.dir(work, 'demos') / task} (their "
            "lengths set the episode budget): run the recipe once without --ckpt"
        )
    return found


def demo_counts(trajectory: Path) -> dict:
    episodes = json.loads(trajectory.with_suffix(".json").read_text())["episodes"]
    return {"episodes": len(episodes), "steps": sum(e["elapsed_steps"] for e in episodes)}


def episode_budget(trajectory: Path) -> int:
    """Evaluation steps per episode: 1.5x the 95th-percentile length of the task's demonstrations (motion planning
    is slower than the envs' own 50-step limit allows)."""
    lengths = [e["elapsed_steps"] for e in json.loads(trajectory.with_suffix(".json").read_text())["episodes"]]
    return int(1.5 * sorted(lengths)[int(0.95 * (len(lengths) - 1))])


def dataset_name(task: str) -> str:
    """The RLDS dataset of one task's demonstrations: PickCube-v1 -> maniskill_e2e_pickcube."""
    return f"maniskill_e2e_{task.split('-')[0].lower()}"


def hydra_value(value) -> str:
    """value in Hydra's override grammar (keys bare, strings quoted so that '/' and interpolations pass through)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def sources_override(tasks: list[str], weights: dict[str, float] | None = None, wrist: bool = False) -> str:
    """The train.py override that keeps the experiment config's dataset sources of these tasks, in their order, with
    the mixture weights given (a task not named keeps its config's weight), reading the wrist camera if `wrist`."""
    from omegaconf import OmegaConf

    config = REPO / "conf" / "experiment" / "maniskill_e2e.yaml"
    sources = {entry["name"]: entry for entry in OmegaConf.to_container(OmegaConf.load(config).dataset.sources)}
    missing = [dataset_name(task) for task in tasks if dataset_name(task) not in sources]
    if missing:
        raise SystemExit(f"{config} has no dataset source {missing}: add one per task (its sources: {list(sources)})")
    weights = weights or {}
    chosen = [sources[dataset_name(task)] | ({"weight": weights[task]} if task in weights else {}) for task in tasks]
    if wrist:
        chosen = [source | {"wrist_image_key": WRIST_IMAGE_KEY} for source in chosen]
    return "dataset.sources=" + hydra_value(chosen)


def task_value(kind: type) -> Callable[[str], tuple[str, int | float]]:
    """argparse type for TASK=VALUE items (--task-demos, --task-weights): a (task, value) pair, or a clear error."""

    def parse(item: str) -> tuple[str, int | float]:
        task, _, value = item.partition("=")
        try:
            if not task:
                raise ValueError(item)
            return task, kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected TASK={kind.__name__.upper()}, got {item!r}") from None

    return parse


def train_stages(
    args: argparse.Namespace,
    counts: dict[str, int],
    weights: dict[str, float],
    work: Path,
    data: Path,
    logs: Path,
    stamp: str,
    env: dict[str, str],
    wall: dict[str, float],
) -> tuple[list[Path], str]:
    """Demonstrations (`counts` per task) -> one RLDS dataset per task under `data` -> train.py (its run dir
    work/runs/<stamp>, stage logs in `logs`); returns each task's replayed demos and the final checkpoint dir. Each
    stage's wall time goes into `wall`."""
    started = time.perf_counter()
    envs = 1 if args.mini else args.replay_envs
    cameras = Cameras(args.camera_size, args.wrist_camera)
    trajectories = [record_demos(task, counts[task], work, logs, envs, cameras) for task in args.tasks]
    wall["demonstrations_s"] = time.perf_counter() - started

    started = time.perf_counter()
    from datasets.build_rlds import main as build_rlds

    for task, trajectory in zip(args.tasks, trajectories, strict=True):
        build_rlds(
            [
                "maniskill",
                "--source",
                str(trajectory),
                "--out",
                str(data / "rlds"),
                "--name",
                dataset_name(task),
                "--image-size",
                str(args.camera_size),
                "--shards",
                "1" if args.mini else "2",
                *(["--wrist-camera", WRIST_CAMERA] if args.wrist_camera else []),
            ]
        )
    wall["rlds_s"] = time.perf_counter() - started

    started = time.perf_counter()
    train_dir = work / "runs" / stamp
    overrides = [f"hydra.run.dir={train_dir}", sources_override(args.tasks, weights, args.wrist_camera)]
    if args.wrist_camera:
        overrides += WRIST_TRAIN_OVERRIDES
    if args.train_steps is not None:
        overrides.append(f"max_steps={args.train_steps}")
    if args.mini:
        overrides += [
            "batch_size=4",
            "save_every=4",
            "val_every=4",
            "val_batches=1",
            "loader.frame_shuffle_buffer=64",
            "loader.val_fraction=0.5",
        ]
    stdout = run(
        [sys.executable, "train.py", "experiment=maniskill_e2e", *overrides, *args.train_override],
        logs / "train.log",
        env,
    )
    checkpoint = last_line_value(stdout, "checkpoint: ")
    wall["train_s"] = time.perf_counter() - started
    return trajectories, checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--demos", type=int, default=100, help="successful demonstrations per task")
    parser.add_argument(
        "--task-demos",
        nargs="*",
        default=[],
        type=task_value(int),
        metavar="TASK=N",
        help="per-task demonstration counts over --demos",
    )
    parser.add_argument(
        "--task-weights",
        nargs="*",
        default=[],
        type=task_value(float),
        metavar="TASK=W",
        help="mixture weights over the config's (1 each)",
    )
    parser.add_argument(
        "--camera-size", type=int, default=DEFAULT_CAMERA_SIZE, help="px of the demos' and evaluation's camera"
    )
    parser.add_argument(
        "--wrist-camera",
        action="store_true",
        help="demos replayed on panda_wristcam, the RLDS sets with its hand_camera as observation/wrist_image, a "
        "policy reading both cameras (model.wrist_image=true), evaluated with both; --ckpt: read from its config",
    )
    parser.add_argument("--replay-envs", type=int, default=os.cpu_count() or 1, help="processes replaying demos")
    parser.add_argument("--train-steps", type=int, default=None, help="default: the experiment config's max_steps")
    parser.add_argument("--workers", type=int, default=2, help="evaluation env processes")
    parser.add_argument(
        "--ensemble",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CogACT's adaptive ensemble: query every step, blend the last 7 chunks' actions for it "
        "(PickCube-v1: 30/50 against 24/50 at --execute-steps 2, run 20261201-194301)",
    )
    parser.add_argument(
        "--execute-steps",
        type=int,
        default=2,
        help="with --no-ensemble: actions executed from each chunk before the next query (PickCube-v1, run "
        "20261201-143758: 10/50 at 2, 5/50 at 4)",
    )
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument(
        "--eval-seed",
        type=int,
        default=EVAL_SEED_OFFSET,
        help="first evaluation seed (episode i resets with it + i); another range confirms a setting chosen on these",
    )
    parser.add_argument("--eval-tasks", nargs="+", default=None, help="tasks to evaluate (default: every trained task)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "data" / "maniskill_e2e")
    parser.add_argument("--mini", action="store_true", help="2 demos of one task, 4 steps, 1 short episode")
    parser.add_argument("--train-override", nargs="*", default=[], help="extra train.py overrides")
    parser.add_argument(
        "--ckpt", type=Path, default=None, help="evaluate this checkpoint: no demos recorded, no dataset, no training"
    )
    parser.add_argument(
        "--eval-override", nargs="*", default=[], help="extra eval_maniskill.py overrides (e.g. sampling.cfg_scale=1)"
    )
    args = parser.parse_args()
    if args.eval_seed < EVAL_SEED_OFFSET:
        parser.error(f"--eval-seed {args.eval_seed}: seeds below {EVAL_SEED_OFFSET} may be demonstrations' seeds")
    if args.ckpt is not None:
        if not (args.ckpt / "config.yaml").is_file():
            parser.error(f"--ckpt {args.ckpt} is not a checkpoint dir (it has no config.yaml)")
        from omegaconf import OmegaConf

        args.wrist_camera = bool(OmegaConf.load(args.ckpt / "config.yaml").model.get("wrist_image", False))
    if args.mini:
        args.tasks, args.demos, args.train_steps, args.eval_episodes = args.tasks[:1], 2, 4, 1
    weights, demos = dict(args.task_weights), dict(args.task_demos)
    for flag, named in (("--eval-tasks", args.eval_tasks or []), ("--task-weights", weights), ("--task-demos", demos)):
        unknown = sorted(set(named) - set(args.tasks))  # after --mini has cut the tasks to one
        if unknown:
            parser.error(f"{flag} {unknown} are not among the trained --tasks {args.tasks}")
    from models.checkpoint import git_revision

    revision = git_revision()  # the code the run starts from, whatever is committed while it runs
    work, stamp = args.work_dir, datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    logs = work / "logs" / stamp
    cameras = Cameras(args.camera_size, args.wrist_camera)
    data = cameras.dir(work, "data")
    env = {**os.environ, "VLA_DATA_DIR": str(data), "TF_CPP_MIN_LOG_LEVEL": "2"}
    wall: dict[str, float] = {}

    if args.ckpt is None:
        counts = {task: demos.get(task, args.demos) for task in args.tasks}
        trajectories, checkpoint = train_stages(args, counts, weights, work, data, logs, stamp, env, wall)
    else:
        trajectories, checkpoint = [replayed_demos(task, work, cameras) for task in args.tasks], str(args.ckpt)

    success: dict[str, dict] = {}
    for task, trajectory in zip(args.tasks, trajectories, strict=True):
        if args.eval_tasks is not None and task not in args.eval_tasks:
            continue
        started = time.perf_counter()
        budget = 10 if args.mini else episode_budget(trajectory)
        stdout = run(
            [
                sys.executable,
                "eval_maniskill.py",
                f"ckpt={checkpoint}",
                f"env_id={task}",
                f"num_episodes={args.eval_episodes}",
                f"seed={args.eval_seed}",
                f"max_steps={budget}",
                f"workers={1 if args.mini else args.workers}",
                f"execute_steps={args.execute_steps}",
                f"ensemble.enabled={str(args.ensemble).lower()}",
                f"hydra.run.dir={work / 'eval' / stamp / task}",
                *args.eval_override,
            ],
            logs / f"eval_{task}.log",
            env,
        )
        results = json.loads(Path(last_line_value(stdout, "results: ")).read_text())
        success[task] = {
            **{k: results.get(k) for k in ("success_rate", "num_episodes", "successes", "success_rate_ci95")},
            "max_steps": budget,
        }
        wall[f"eval_{task}_s"] = time.perf_counter() - started

    report = {
        "date": datetime.now(UTC).isoformat(),
        "git_revision": revision,
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "demonstrations": {task: demo_counts(t) for task, t in zip(args.tasks, trajectories, strict=True)},
        "checkpoint": checkpoint,
        "wall_time_s": wall,
        "success": success,
    }
    out = REPO / "benchmarks" / "results" / f"maniskill_e2e_{'mini_' if args.mini else ''}{stamp}.json"
    if not args.mini:
        out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["success"], indent=2))
    print(f"results: {out if not args.mini else logs}")


if __name__ == "__main__":
    main()
