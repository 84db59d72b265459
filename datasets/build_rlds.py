"""Turn your own episodes into an RLDS dataset (TFDS layout, LIBERO-like schema).

    # a folder of per-episode .npz or .h5 files: image [T,H,W,3] uint8, state [T,S], action [T,A],
    # language_instruction (str), optional wrist_image [T,H,W,3], optional object_pos [T,K] (an auxiliary target)
    python -m datasets.build_rlds episodes --source my_episodes/ --out data/rlds --name my_dataset

    # ManiSkill3 trajectories (.h5 + .json beside it) replayed with `-o rgb -c pd_ee_delta_pose`; several --source
    # files make one dataset, each episode with its task's instruction (sim.maniskill.TASK_PROMPTS or --instruction)
    python -m datasets.build_rlds maniskill --source demos/PickCube-v1/PickCube-v1.rgb.pd_ee_delta_pose.physx_cpu.h5 \
        --out data/rlds --name maniskill_pickcube
    # ... with the wrist camera as observation/wrist_image: demos replayed on the panda_wristcam robot (set
    # env_kwargs.robot_uids in the recording's .json before replay_trajectory, as maniskill_e2e.py --wrist-camera does)
    python -m datasets.build_rlds maniskill --source demos/PickCube-v1/PickCube-v1.rgb.pd_ee_delta_pose.physx_cpu.h5 \
        --out data/rlds --name maniskill_pickcube_wrist --wrist-camera hand_camera

    # a LeRobot dataset (v2.0, v2.1 or v3.0 layout): a local dir or a Hub dataset id (HF_TOKEN for gated ones)
    # (openpi's LIBERO conversion here: its actions keep LIBERO's gripper, so train with libero_gripper)
    python -m datasets.build_rlds lerobot --source physical-intelligence/libero --out data/rlds --name libero_lerobot \
        --image-key image --wrist-image-key wrist_image --state-key state --action-key actions

ManiSkill actions are written as recorded (gripper -1 close / +1 open): train on them with
`action_transform: gripper_signed_to_unit`. States are sim.maniskill.panda_state (tcp xyz, tcp rotation from the
rest pose as euler xyz, finger qpos x2, goal xyz, goal - tcp xyz: 14 dims); observation/object_pos holds the task
objects' positions from the recorded env states (sim.maniskill.object_positions), a target for the model's auxiliary
loss (RLDSSource.aux_key).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from datasets.builder import SPLIT_FIRST_TEMPLATE, EpisodeSchema, check_frames, write_rlds
from datasets.crop import resize_square

EPISODE_KEYS = ("image", "state", "action", "language_instruction")
OPTIONAL_KEYS = ("wrist_image", "object_pos", "reward", "terminal")
DEFAULT_IMAGE_SIZE = 256  # px: the largest side frames are stored at unless --image-size says otherwise (LIBERO's)
DEFAULT_SHARDS = 4  # tfrecord files a dataset is written in (fewer for fewer episodes)


def _resize(images: np.ndarray, size: int, key: str = "image", source: str = "an episode") -> np.ndarray:
    check_frames(images, key, source)
    if images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images)
    return np.stack([resize_square(im, size) for im in images])


def _text(value: object) -> str:
    value = np.asarray(value).reshape(-1)[0] if not isinstance(value, str | bytes) else value
    return value.decode() if isinstance(value, bytes) else str(value)


def read_episode_file(path: Path) -> dict:
    """One .npz or .h5 episode file -> episode dict (see module docstring)."""
    wanted = (*EPISODE_KEYS, *OPTIONAL_KEYS)  # anything else in the file (other arrays, h5 groups) is left unread
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files if k in wanted}
    else:
        with h5py.File(path, "r") as f:
            data = {}
            for k in wanted:
                if k in f and not isinstance(f[k], h5py.Dataset):
                    raise ValueError(f"{path}: {k} is an h5 {type(f[k]).__name__}, expected a dataset (an array)")
                if k in f:
                    data[k] = f[k][()]
    missing = [k for k in EPISODE_KEYS if k not in data]
    if missing:
        raise KeyError(
            f"{path}: missing {missing}; an episode file needs {list(EPISODE_KEYS)} (+ optional {list(OPTIONAL_KEYS)})"
        )
    data["language_instruction"] = _text(data["language_instruction"])
    data["file_path"] = str(path)
    return data


def episode_files(source: Path) -> list[Path]:
    if source.is_file():
        raise NotADirectoryError(f"{source} is a file; --source takes the folder of episode files ({source.parent})")
    if not source.is_dir():
        raise FileNotFoundError(f"episode folder {source} does not exist")
    files = sorted(p for p in source.iterdir() if p.suffix in (".npz", ".h5", ".hdf5"))
    if not files:
        raise FileNotFoundError(f"{source} holds no .npz or .h5 episode files")
    return files


def camera_frames(group: h5py.Group, camera: str, source: str) -> np.ndarray:
    """One recorded episode's rgb frames of `camera`, or a clear error naming the cameras it has."""
    sensors = group.get("obs/sensor_data")
    if sensors is None or camera not in sensors:
        available = list(sensors.keys()) if sensors is not None else []
        hint = (
            "; the wrist camera exists on the panda_wristcam robot: replay with env_kwargs.robot_uids "
            "'panda_wristcam' in the trajectory's .json (benchmarks/maniskill_e2e.py --wrist-camera does)"
            if camera == "hand_camera"
            else ""
        )
        raise KeyError(
            f"{source}: {group.name.lstrip('/')} has no rgb images of camera {camera!r} (cameras: {available}); "
            f"replay with `-o rgb`{hint}"
        )
    return sensors[camera]["rgb"][()]


def maniskill_episodes(
    traj_path: Path, camera: str, instruction: str | None, wrist_camera: str | None = None
) -> Iterator[dict]:
    """Episodes of a ManiSkill3 trajectory file (its .json metadata beside it), successful or not; `wrist_camera`'s
    frames become observation/wrist_image."""
    meta_path = traj_path.with_suffix(".json")
    if not traj_path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"need {traj_path} and {meta_path} (ManiSkill3 trajectory + metadata)")
    meta = json.loads(meta_path.read_text())
    env_info = meta.get("env_info", {})
    control_mode = env_info.get("env_kwargs", {}).get("control_mode")
    if control_mode not in (None, "pd_ee_delta_pose"):
        raise ValueError(
            f"{traj_path} was recorded in {control_mode}; replay it first with "
            "`python -m mani_skill.trajectory.replay_trajectory -o rgb -c pd_ee_delta_pose --save-traj`"
        )
    from sim.maniskill import default_prompt, object_positions, panda_state

    if instruction is None:
        instruction = default_prompt(env_info.get("env_id", ""))
    skip_objects = False
    with h5py.File(traj_path, "r") as f:
        for episode in meta["episodes"]:
            group = f[f"traj_{episode['episode_id']}"]
            image = camera_frames(group, camera, str(traj_path))
            wrist = camera_frames(group, wrist_camera, str(traj_path)) if wrist_camera else None
            actions = group["actions"][()].astype(np.float32)
            steps = len(actions)
            goal = group["obs/extra/goal_pos"][()][:steps] if "obs/extra/goal_pos" in group else None
            state = panda_state(group["obs/extra/tcp_pose"][()][:steps], group["obs/agent/qpos"][()][:steps], goal)
            actors = group.get("env_states/actors")
            objects = None
            if actors is not None and not skip_objects:
                try:
                    objects = object_positions({name: actors[name][()][:steps] for name in actors})
                except ValueError as e:  # optional: a task with other object counts still builds, without it
                    print(f"{traj_path.name}: no observation/object_pos written: {e}", flush=True)
                    skip_objects = True
            yield {
                "image": image[:steps],
                "wrist_image": wrist[:steps] if wrist is not None else None,
                "state": state,
                "object_pos": objects,
                "action": actions,
                "reward": group["rewards"][()].astype(np.float32) if "rewards" in group else None,
                "language_instruction": instruction,
                "file_path": f"{traj_path.name}/traj_{episode['episode_id']}",
                "terminal": bool(episode.get("success", False)),
            }


def stored_size(images: np.ndarray) -> int:
    """The side of the square frames a camera is stored at by default: its own resolution (the longer side), so
    that frames are not resampled twice (an evaluation rendering at the checkpoint's camera_size then sees what
    training saw), but at most DEFAULT_IMAGE_SIZE px (a 640 x 480 camera would only cost disk and decoding)."""
    return min(int(max(np.shape(images)[1:3])), DEFAULT_IMAGE_SIZE)


def build(episodes: Iterator[dict], total: int | None, args: argparse.Namespace) -> Path:
    shards = args.shards or (min(DEFAULT_SHARDS, total) if total else DEFAULT_SHARDS)
    if total is not None and shards > total:  # refused now, not after every episode was converted
        raise ValueError(
            f"--shards {shards} for {total} episode(s): each shard holds at least one; pass --shards {total}"
        )
    episodes = iter(episodes)
    first = next(episodes, None)
    if first is None:
        raise ValueError("no episodes to write")
    has_wrist = "wrist_image" in first and first["wrist_image"] is not None
    image_size = args.image_size or stored_size(first["image"])
    wrist = (args.wrist_image_size or stored_size(first["wrist_image"])) if has_wrist else 0
    objects = first.get("object_pos")

    def width(key: str, values: object) -> int:
        if np.ndim(values) != 2:
            where = first.get("file_path", "the first episode")
            raise ValueError(f"{where}: {key} has shape {list(np.shape(values))}, expected [T, N] (one row per step)")
        return np.shape(values)[1]

    schema = EpisodeSchema(
        image_size=image_size,
        wrist_image_size=wrist,
        state_dim=width("state", first["state"]),
        action_dim=width("action", first["action"]),
        object_dim=width("object_pos", objects) if objects is not None else 0,
    )

    def prepared() -> Iterator[dict]:
        for episode in tqdm(_chain(first, episodes), total=total, desc="episodes"):
            episode = {k: v for k, v in episode.items() if v is not None}
            source = episode.get("file_path", "an episode")
            episode["image"] = _resize(np.asarray(episode["image"]), schema.image_size, "image", source)
            if wrist:
                episode["wrist_image"] = _resize(np.asarray(episode["wrist_image"]), wrist, "wrist_image", source)
            else:
                episode.pop("wrist_image", None)
            yield episode

    template = SPLIT_FIRST_TEMPLATE if args.split_first_names else None
    return write_rlds(prepared(), args.out, args.name, schema, shards, args.version, file_template=template)


def _chain(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=["episodes", "maniskill", "lerobot"])
    parser.add_argument(
        "--source",
        type=Path,
        action="append",
        required=True,
        help="episode folder; a ManiSkill .h5 trajectory (repeat --source to merge several tasks into one dataset); "
        "or a LeRobot dataset dir or Hub dataset id",
    )
    parser.add_argument("--out", type=Path, required=True, help="root dir; the dataset goes to <out>/<name>/<version>")
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument(
        "--shards",
        type=int,
        default=None,
        help=f"tfrecord files (default: {DEFAULT_SHARDS}, or one per episode if fewer)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"side of the stored square frames (default: the camera's own, at most {DEFAULT_IMAGE_SIZE})",
    )
    parser.add_argument("--wrist-image-size", type=int, default=None, help="the same for the wrist camera")
    parser.add_argument("--camera", default="base_camera", help="ManiSkill camera written as observation/image")
    parser.add_argument(
        "--wrist-camera",
        default=None,
        help="ManiSkill camera written as observation/wrist_image (hand_camera: demos replayed on panda_wristcam)",
    )
    parser.add_argument(
        "--instruction", default=None, help="ManiSkill, LeRobot: language instruction (default: the episode's task)"
    )
    parser.add_argument("--image-key", default=None, help="LeRobot: camera feature (default: the first camera)")
    parser.add_argument("--wrist-image-key", default=None, help="LeRobot: wrist camera feature (default: none)")
    parser.add_argument("--state-key", default="observation.state", help="LeRobot: state feature")
    parser.add_argument("--action-key", default="action", help="LeRobot: action feature")
    parser.add_argument("--split-first-names", action="store_true", help="name shards train-00000-of-0000N.tfrecord")
    args = parser.parse_args(argv)
    if args.format == "episodes":
        if len(args.source) != 1:
            parser.error("episodes: give exactly one --source folder")
        files = episode_files(args.source[0])
        path = build((read_episode_file(f) for f in files), len(files), args)
    elif args.format == "lerobot":
        if len(args.source) != 1:
            parser.error("lerobot: give exactly one --source dataset")
        from datasets.hub import local_or_hub
        from datasets.lerobot import LeRobotDataset, LeRobotKeys

        source = str(args.source[0])
        root = local_or_hub(source, repo_type="dataset", what="LeRobot dataset")
        dataset = LeRobotDataset(root, name=Path(source).name)
        keys = LeRobotKeys(args.image_key, args.wrist_image_key, args.state_key, args.action_key)
        path = build(dataset.episode_iter(keys, args.instruction), len(dataset.episodes), args)
    else:
        episodes = (
            e
            for source in args.source
            for e in maniskill_episodes(source, args.camera, args.instruction, args.wrist_camera)
        )
        metadata = [source.with_suffix(".json") for source in args.source]  # each lists its episodes
        known = all(meta.is_file() for meta in metadata)
        total = sum(len(json.loads(meta.read_text()).get("episodes", [])) for meta in metadata) if known else None
        path = build(episodes, total, args)
    print(f"dataset: {path}")
    return path


if __name__ == "__main__":
    main()
