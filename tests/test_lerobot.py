"""LeRobot datasets (v2.1 and v3.0 layouts, AV1 and H.264 videos, PNG images in parquet) -> RLDS."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from datasets.build_rlds import main as build_rlds
from datasets.hub import local_or_hub
from datasets.lerobot import LeRobotDataset, LeRobotKeys, decode_video
from datasets.rlds import RLDSSource, compute_statistics

LENGTHS = (5, 7, 6)
TASKS = ("pick up the cube", "push the cube")
FPS = 10
SIZE = 64
FRONT, WRIST = "observation.images.front", "observation.images.wrist"


def _level(episode: int, frame: int) -> int:
    return 20 + 10 * frame + 60 * episode


def _frame(episode: int, frame: int, wrist: bool = False) -> np.ndarray:
    """A flat colour that says which episode and frame it is, and which camera (lossy codecs keep flat colours)."""
    level = _level(episode, frame)
    colour = (255 - level, level, 200) if wrist else (level, 255 - level, 40 * episode)
    return np.broadcast_to(np.array(colour, np.uint8), (SIZE, SIZE, 3)).copy()


def _vector(episode: int, frame: int, dim: int) -> list[float]:
    return [100.0 * episode + frame + k / 10 for k in range(dim)]


def _write_video(path: Path, frames: list[np.ndarray], codec: str, options: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS, options=options or {})
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def _png(image: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _frames_table(episodes: list[int], first_index: int) -> pa.Table:
    rows = [(e, f) for e in episodes for f in range(LENGTHS[e])]
    return pa.table(
        {
            "action": pa.array([_vector(e, f, 7) for e, f in rows], pa.list_(pa.float32())),
            "observation.state": pa.array([_vector(e, f, 8) for e, f in rows], pa.list_(pa.float32())),
            "observation.gripper": pa.array([_vector(e, f, 1)[0] for e, f in rows], pa.float32()),
            WRIST: [_png(_frame(e, f, wrist=True)) for e, f in rows],
            "timestamp": pa.array([f / FPS for _, f in rows], pa.float32()),
            "frame_index": [f for _, f in rows],
            "episode_index": [e for e, _ in rows],
            "index": list(range(first_index, first_index + len(rows))),
            "task_index": [e % 2 for e, _ in rows],
        }
    )


def _write_info(root: Path, version: str, data_path: str, video_path: str, codec: str) -> None:
    camera = {"shape": [SIZE, SIZE, 3], "names": ["height", "width", "channels"]}
    info = {
        "codebase_version": version,
        "robot_type": "panda",
        "fps": FPS,
        "chunks_size": 1000,
        "total_episodes": len(LENGTHS),
        "total_frames": sum(LENGTHS),
        "data_path": data_path,
        "video_path": video_path,
        "features": {
            FRONT: {"dtype": "video", **camera, "info": {"video.codec": codec, "video.fps": FPS}},
            WRIST: {"dtype": "image", **camera},
            "observation.state": {"dtype": "float32", "shape": [8]},
            "observation.gripper": {"dtype": "float32", "shape": [1]},  # a plain number column, as LeRobot writes [1]
            "action": {"dtype": "float32", "shape": [7]},
            "timestamp": {"dtype": "float32", "shape": [1]},
            "frame_index": {"dtype": "int64", "shape": [1]},
            "episode_index": {"dtype": "int64", "shape": [1]},
            "index": {"dtype": "int64", "shape": [1]},
            "task_index": {"dtype": "int64", "shape": [1]},
        },
    }
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta/info.json").write_text(json.dumps(info))


def write_lerobot_v21(root: Path) -> Path:
    """One parquet and one H.264 mp4 per episode, episodes.jsonl and tasks.jsonl."""
    _write_info(
        root,
        "v2.1",
        "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "h264",
    )
    first = 0
    for e, length in enumerate(LENGTHS):
        data = root / f"data/chunk-000/episode_{e:06d}.parquet"
        data.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_frames_table([e], first), data)
        first += length
        video = root / f"videos/chunk-000/{FRONT}/episode_{e:06d}.mp4"
        _write_video(video, [_frame(e, f) for f in range(length)], "h264")
    episodes = [{"episode_index": e, "tasks": [TASKS[e % 2]], "length": n} for e, n in enumerate(LENGTHS)]
    (root / "meta/episodes.jsonl").write_text("".join(json.dumps(row) + "\n" for row in episodes))
    tasks = [{"task_index": i, "task": task} for i, task in enumerate(TASKS)]
    (root / "meta/tasks.jsonl").write_text("".join(json.dumps(row) + "\n" for row in tasks))
    return root


def write_lerobot_v30(root: Path) -> Path:
    """Episodes 0-1 in one data file and one AV1 video file, episode 2 in the next of each (as LeRobot's size
    limits split them), episodes/ and tasks.parquet metadata."""
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    _write_info(
        root,
        "v3.0",
        "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "av1",
    )
    rows, first = [], 0
    for file_index, episodes in enumerate(([0, 1], [2])):
        data = root / f"data/chunk-000/file-{file_index:03d}.parquet"
        data.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_frames_table(episodes, first), data)
        video = root / f"videos/{FRONT}/chunk-000/file-{file_index:03d}.mp4"
        _write_video(video, [_frame(e, f) for e in episodes for f in range(LENGTHS[e])], "libsvtav1")
        start = 0
        for e in episodes:
            rows.append(
                {
                    "episode_index": e,
                    "tasks": [TASKS[e % 2]],
                    "length": LENGTHS[e],
                    "data/chunk_index": 0,
                    "data/file_index": file_index,
                    "dataset_from_index": first,
                    "dataset_to_index": first + LENGTHS[e],
                    f"videos/{FRONT}/chunk_index": 0,
                    f"videos/{FRONT}/file_index": file_index,
                    f"videos/{FRONT}/from_timestamp": start / FPS,
                    f"videos/{FRONT}/to_timestamp": (start + LENGTHS[e]) / FPS,
                }
            )
            start += LENGTHS[e]
            first += LENGTHS[e]
    pq.write_table(pa.Table.from_pylist(rows[::-1]), root / "meta/episodes/chunk-000/file-000.parquet")
    # pandas writes the task strings as its unnamed index
    pq.write_table(pa.table({"task_index": [0, 1], "__index_level_0__": list(TASKS)}), root / "meta/tasks.parquet")
    return root


WRITERS = {"v2.1": write_lerobot_v21, "v3.0": write_lerobot_v30}


def _build(source: Path, out: Path, *extra: str) -> Path:
    args = ["lerobot", "--source", str(source), "--out", str(out), "--name", "converted", "--shards", "1"]
    return build_rlds([*args, "--image-size", str(SIZE), "--wrist-image-size", str(SIZE), *extra])


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_lerobot_dataset_becomes_rlds_frame_for_frame(tmp_path, version: str) -> None:
    source = WRITERS[version](tmp_path / "lerobot")
    path = _build(source, tmp_path / "rlds", "--wrist-image-key", WRIST)
    written = tfds.builder_from_directory(str(path)).as_dataset(split="train")
    # TFDS shuffles the episodes it writes; each keeps its LeRobot episode index in file_path
    episodes = sorted(written, key=lambda e: e["episode_metadata"]["file_path"].numpy())
    assert [e["episode_metadata"]["file_path"].numpy().decode() for e in episodes] == [
        f"lerobot/episode_{e:06d}" for e in range(len(LENGTHS))
    ]
    assert [len(e["steps"]) for e in episodes] == list(LENGTHS)
    stats = compute_statistics(RLDSSource(name="converted", data_dir=str(tmp_path / "rlds")), 7)  # what train.py reads
    assert stats["num_trajectories"] == len(LENGTHS) and stats["num_transitions"] == sum(LENGTHS)
    for e, episode in enumerate(episodes):
        steps = list(episode["steps"].as_numpy_iterator())
        assert {s["language_instruction"].decode() for s in steps} == {TASKS[e % 2]}
        np.testing.assert_allclose([s["action"] for s in steps], [_vector(e, f, 7) for f in range(LENGTHS[e])])
        np.testing.assert_allclose(
            [s["observation"]["state"] for s in steps], [_vector(e, f, 8) for f in range(LENGTHS[e])]
        )
        for f, step in enumerate(steps):
            # each frame is its own (not a neighbour's: levels 10 apart) after the codec and the RLDS JPEG
            for key, wrist in (("image", False), ("wrist_image", True)):
                mean = step["observation"][key].reshape(-1, 3).mean(0)
                assert np.abs(mean - _frame(e, f, wrist)[0, 0]).max() < 4, (version, e, f, key, mean)


def test_instruction_override_and_default_camera(tmp_path) -> None:
    source = write_lerobot_v30(tmp_path / "lerobot")
    assert LeRobotDataset(source).check_keys(LeRobotKeys()).image == FRONT  # the first camera feature
    path = _build(source, tmp_path / "rlds", "--instruction", "stack the cubes")
    episode = next(iter(tfds.builder_from_directory(str(path)).as_dataset(split="train")))
    assert "wrist_image" not in episode["steps"].element_spec["observation"]
    assert {s["language_instruction"].decode() for s in episode["steps"].as_numpy_iterator()} == {"stack the cubes"}


def test_a_one_number_feature_stored_as_a_scalar_column_is_a_1d_vector(tmp_path) -> None:
    path = _build(write_lerobot_v30(tmp_path / "lerobot"), tmp_path / "rlds", "--state-key", "observation.gripper")
    states = [
        step["observation"]["state"]
        for episode in tfds.builder_from_directory(str(path)).as_dataset(split="train")
        for step in episode["steps"].as_numpy_iterator()
    ]
    expected = [_vector(e, f, 1) for e, n in enumerate(LENGTHS) for f in range(n)]
    assert np.shape(states) == (sum(LENGTHS), 1)
    np.testing.assert_allclose(np.sort(np.concatenate(states)), np.sort(np.concatenate(expected)))


@pytest.mark.parametrize(
    "kind", [pa.list_(pa.float32()), pa.large_list(pa.float32()), pa.list_(pa.float32(), 2), pa.float32()]
)
def test_vector_columns_of_every_arrow_list_type_become_a_matrix(kind) -> None:
    from datasets.lerobot import _matrix

    rows = [[1.0, 2.0], [3.0, 4.0]] if kind != pa.float32() else [1.0, 3.0]
    expected = np.reshape(rows, (2, -1))
    np.testing.assert_array_equal(_matrix(pa.chunked_array([pa.array(rows, kind)]), 2, "x"), expected)


def test_lerobot_errors_name_what_is_wrong(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"meta/info\.json does not exist"):
        LeRobotDataset(tmp_path)
    source = write_lerobot_v30(tmp_path / "lerobot")
    dataset = LeRobotDataset(source)
    with pytest.raises(KeyError, match=r"no state feature 'observation\.joints'.*--state-key"):
        dataset.check_keys(LeRobotKeys(state="observation.joints"))
    with pytest.raises(KeyError, match=r"wrist image feature 'action' is not a camera"):
        dataset.check_keys(LeRobotKeys(wrist_image="action"))
    (source / f"videos/{FRONT}/chunk-000/file-001.mp4").unlink()
    with pytest.raises(FileNotFoundError, match=r"file-001\.mp4 does not exist"):
        _build(source, tmp_path / "rlds")
    assert not (tmp_path / "rlds/converted").exists()  # nothing half-written
    info = json.loads((source / "meta/info.json").read_text())
    (source / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v1.6"}))
    with pytest.raises(ValueError, match=r"codebase_version 'v1.6'; readable versions are \['v2.0', 'v2.1', 'v3.0'\]"):
        LeRobotDataset(source)


def test_video_frames_are_picked_by_their_timestamps(tmp_path) -> None:
    """B-frames and a seek to the keyframe before the episode must not shift the frames; a frame the video lacks
    is named."""
    video = tmp_path / "b_frames.mp4"
    _write_video(video, [_frame(0, f) for f in range(24)], "mpeg4", {"bf": "2", "g": "6", "qmax": "2"})
    frames = decode_video(video, 1.3, 5, FPS)
    levels = frames.reshape(5, -1, 3).mean(1)[:, 1]  # green = 255 - level
    np.testing.assert_allclose(255 - levels, [_level(0, f) for f in range(13, 18)], atol=4)
    with pytest.raises(ValueError, match=r"no frame within half a frame of 2\.400 s \(frame 4 of 5"):
        decode_video(video, 2.0, 5, FPS)


def test_a_local_path_that_is_not_there_is_not_taken_for_a_hub_id(tmp_path, monkeypatch) -> None:
    for name in (str(tmp_path / "missing"), "./data/typo", "~/nowhere"):
        with pytest.raises(FileNotFoundError, match="no such local LeRobot dataset"):
            local_or_hub(name, repo_type="dataset", what="LeRobot dataset")
    # An owner/name-shaped typo is tried on the Hub; offline that fails with the local reading named too.
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(
        FileNotFoundError,
        match=r"lerobot_dss/v21: no such local LeRobot dataset \(from .*fetched: LocalEntryNotFoundError",
    ):
        local_or_hub("lerobot_dss/v21", repo_type="dataset", what="LeRobot dataset")
