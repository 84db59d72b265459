"""LeRobot datasets read as episodes, for `python -m datasets.build_rlds lerobot` (v2.0, v2.1 and v3.0 layouts).

    v2.x: meta/info.json, meta/episodes.jsonl, meta/tasks.jsonl,
          data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet (one episode per file),
          videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4
    v3.0: meta/info.json, meta/episodes/chunk-*/file-*.parquet, meta/tasks.parquet,
          data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet (many episodes per file),
          videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4 (episodes one after another;
          each episode's videos/{video_key}/from_timestamp says where it starts)

The path templates are read from info.json, so the layouts above are only the usual ones. A camera is a feature of
dtype "video" (decoded with PyAV: AV1, H.264, ...) or "image" (PNG/JPEG bytes in the data parquet). Each frame's
task_index names its instruction in the tasks table; an episode takes its first frame's. The LeRobot library
itself is not needed (it would pull in HF `datasets`, which this repo's `datasets/` package shadows).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

VERSIONS = ("v2.0", "v2.1", "v3.0")


@dataclass(frozen=True)
class LeRobotKeys:
    """Feature names of the LeRobot dataset written as the RLDS episode's image, wrist_image, state and action.
    image None: the first camera feature."""

    image: str | None = None
    wrist_image: str | None = None
    state: str = "observation.state"
    action: str = "action"


class LeRobotDataset:
    """One local LeRobot dataset: its metadata, and its episodes read one at a time."""

    def __init__(self, root: str | Path, name: str | None = None):
        """name: what episodes' file_path starts with (default: the dir's name)."""
        self.root = Path(root)
        self.name = name or self.root.name
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{info_path} does not exist: {self.root} is not a LeRobot dataset")
        self.info = json.loads(info_path.read_text())
        self.version = str(self.info.get("codebase_version", ""))
        if self.version not in VERSIONS:
            raise ValueError(
                f"{info_path}: codebase_version {self.version!r}; readable versions are {list(VERSIONS)} "
                "(convert older datasets with LeRobot's own conversion scripts first)"
            )
        self.features: dict = self.info["features"]
        self.fps = float(self.info["fps"])
        self.cameras = [k for k, f in self.features.items() if f.get("dtype") in ("video", "image")]
        self.episodes = self._read_episodes()
        self.tasks = self._read_tasks()

    def _read_episodes(self) -> list[dict]:
        if self.version == "v3.0":
            files = sorted((self.root / "meta" / "episodes").glob("chunk-*/*.parquet"))
            if not files:
                raise FileNotFoundError(f"{self.root}/meta/episodes/ holds no chunk-*/*.parquet (LeRobot v3.0)")
            rows = [row for f in files for row in pq.read_table(f).to_pylist()]
        else:
            path = self.root / "meta" / "episodes.jsonl"
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist (LeRobot {self.version})")
            rows = _jsonl(path)
        return sorted(rows, key=lambda row: int(row["episode_index"]))

    def _read_tasks(self) -> dict[int, str]:
        if self.version == "v3.0":
            table = pq.read_table(self.root / "meta" / "tasks.parquet")
            # The task string is the pandas index LeRobot writes: a column named "task", or unnamed.
            names = "task" if "task" in table.column_names else "__index_level_0__"
            if names not in table.column_names:
                raise KeyError(f"{self.root}/meta/tasks.parquet: no task column (columns: {table.column_names})")
            return dict(zip(table["task_index"].to_pylist(), table[names].to_pylist(), strict=True))
        path = self.root / "meta" / "tasks.jsonl"
        rows = _jsonl(path) if path.is_file() else []
        return {int(row["task_index"]): row["task"] for row in rows}

    def check_keys(self, keys: LeRobotKeys) -> LeRobotKeys:
        """keys with the image filled in; a clear error naming a feature that is missing or of the wrong kind."""
        image = keys.image or (self.cameras[0] if self.cameras else None)
        if image is None:
            raise KeyError(f"{self.root}: no camera feature (dtype video or image); features: {list(self.features)}")
        for role, name in (("image", image), ("wrist image", keys.wrist_image)):
            if name is not None and name not in self.cameras:
                raise KeyError(f"{self.root}: {role} feature {name!r} is not a camera; cameras: {self.cameras}")
        for role, name in (("state", keys.state), ("action", keys.action)):
            if name not in self.features:
                raise KeyError(
                    f"{self.root}: no {role} feature {name!r}; features: {list(self.features)} "
                    f"(pick one with --{role}-key)"
                )
        return LeRobotKeys(image=image, wrist_image=keys.wrist_image, state=keys.state, action=keys.action)

    def _path(self, template_key: str, episode: dict, video_key: str | None = None) -> Path:
        index = int(episode["episode_index"])
        if self.version == "v3.0":
            prefix = "data" if video_key is None else f"videos/{video_key}"
            fields = {"chunk_index": episode[f"{prefix}/chunk_index"], "file_index": episode[f"{prefix}/file_index"]}
        else:
            fields = {"episode_chunk": index // int(self.info.get("chunks_size", 1000)), "episode_index": index}
        return self.root / self.info[template_key].format(video_key=video_key, **fields)

    def episode_iter(self, keys: LeRobotKeys, instruction: str | None = None) -> Iterator[dict]:
        """Episodes in index order, as datasets.builder.write_rlds takes them."""
        keys = self.check_keys(keys)
        stored = [k for k in (keys.image, keys.wrist_image) if k and self.features[k]["dtype"] == "image"]
        columns = ["episode_index", "task_index", keys.state, keys.action, *stored]
        table, table_path = None, None
        for episode in self.episodes:
            path = self._path("data_path", episode)
            if path != table_path:  # v3.0 files hold many episodes, read in order: one file in memory at a time
                table, table_path = _read_parquet(path, columns), path
            rows = table.filter(pc.equal(table["episode_index"], int(episode["episode_index"])))
            steps = rows.num_rows
            if steps == 0:
                raise ValueError(f"{path}: no frames of episode {episode['episode_index']}")
            images = {key: self._camera(rows, episode, key, steps) for key in (keys.image, keys.wrist_image) if key}
            task = int(rows["task_index"][0].as_py())
            if instruction is None and task not in self.tasks:
                raise KeyError(f"{self.root}: episode {episode['episode_index']}'s task_index {task} has no task")
            yield {
                "image": images[keys.image],
                "wrist_image": images.get(keys.wrist_image),
                "state": _matrix(rows[keys.state], steps, f"{path}: {keys.state}"),
                "action": _matrix(rows[keys.action], steps, f"{path}: {keys.action}"),
                "language_instruction": instruction if instruction is not None else self.tasks[task],
                "file_path": f"{self.name}/episode_{int(episode['episode_index']):06d}",
            }

    def _camera(self, rows, episode: dict, key: str, steps: int) -> np.ndarray:
        if self.features[key]["dtype"] == "image":
            return np.stack(
                [np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB")) for cell in rows[key].to_pylist()]
            )
        start = float(episode.get(f"videos/{key}/from_timestamp", 0.0))
        return decode_video(self._path("video_path", episode, key), start, steps, self.fps)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_parquet(path: Path, columns: list[str]):
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (named by the dataset's meta/)")
    missing = [c for c in columns if c not in pq.read_schema(path).names]
    if missing:
        raise KeyError(f"{path}: no column {missing}; LeRobot data files hold one per feature")
    return pq.read_table(path, columns=columns)


def _matrix(column, steps: int, what: str) -> np.ndarray:
    """A list<float> column (one vector per frame), or a plain number column (a feature of shape [1], which LeRobot
    stores as a scalar per frame) -> float32 [T, D]."""
    column = column.combine_chunks()
    kind = column.type
    nested = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    values = np.asarray(column.flatten() if nested else column, dtype=np.float32)
    if values.size % steps:
        raise ValueError(f"{what}: {values.size} values over {steps} frames are not one vector per frame")
    return values.reshape(steps, -1)


def decode_video(path: Path, start_s: float, count: int, fps: float) -> np.ndarray:
    """`count` RGB frames uint8 [count, H, W, 3] at start_s + i / fps seconds of an mp4 (PyAV; AV1 through dav1d),
    each the decoded frame whose timestamp is nearest, within half a frame; a frame the video lacks is an error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (named by the dataset's meta/)")
    frames = _frames_at(path, start_s, count, fps, seek=start_s > 0)
    if len(frames) < count and start_s > 0:  # a seek can land past the episode's start: decode from the beginning
        frames = _frames_at(path, start_s, count, fps, seek=False)
    missing = [i for i in range(count) if i not in frames]
    if missing:
        raise ValueError(
            f"{path}: no frame within half a frame of {start_s + missing[0] / fps:.3f} s (frame {missing[0]} of "
            f"{count} from {start_s:.3f} s at {fps:g} fps); {len(missing)} frames missing"
        )
    return np.stack([frames[i] for i in range(count)])


def _frames_at(path: Path, start_s: float, count: int, fps: float, seek: bool) -> dict[int, np.ndarray]:
    frames: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if seek:
            container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
        for frame in container.decode(stream):
            position = (frame.time - start_s) * fps  # in frames from the episode's first
            if position > count - 0.5:
                break
            index = round(position)
            if index >= 0 and index not in frames:
                frames[index] = frame.to_ndarray(format="rgb24")
    return frames
