from __future__ import annotations

import numpy as np
import pytest

from datasets.build_rlds import main as build_rlds
from datasets.rlds import RLDSSource, compute_statistics


def _write_episodes(folder, count: int, suffix: str = ".npz") -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    folder.mkdir()
    actions = []
    for i in range(count):
        steps = 5 + i
        episode = {
            "image": rng.integers(0, 256, (steps, 40, 40, 3), dtype=np.uint8),
            "state": rng.normal(size=(steps, 8)).astype(np.float32),
            "action": rng.normal(size=(steps, 7)).astype(np.float32),
            "language_instruction": np.array("pick up the apple"),
        }
        actions.append(episode["action"])
        if suffix == ".npz":
            np.savez(folder / f"ep{i}.npz", **episode)
        else:
            import h5py

            with h5py.File(folder / f"ep{i}.h5", "w") as f:
                for key, value in episode.items():
                    f[key] = value if key != "language_instruction" else str(value)
    return actions


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_episode_folder_becomes_rlds(tmp_path, suffix: str) -> None:
    actions = _write_episodes(tmp_path / "episodes", 3, suffix)
    path = build_rlds(
        [
            "episodes",
            "--source",
            str(tmp_path / "episodes"),
            "--out",
            str(tmp_path / "rlds"),
            "--name",
            "mine",
            "--shards",
            "2",
            "--image-size",
            "32",
            "--split-first-names",
        ]
    )
    assert sorted(p.name for p in path.glob("*.tfrecord")) == [
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
    ]
    stats = compute_statistics(RLDSSource(name="mine", data_dir=str(tmp_path / "rlds")), 7)
    assert stats["num_trajectories"] == 3 and stats["num_transitions"] == 5 + 6 + 7
    np.testing.assert_allclose(stats["action"]["max"], np.concatenate(actions).max(0), rtol=1e-6)


def test_episode_file_missing_a_key_is_named(tmp_path) -> None:
    (tmp_path / "episodes").mkdir()
    np.savez(tmp_path / "episodes" / "bad.npz", image=np.zeros((2, 8, 8, 3), np.uint8), action=np.zeros((2, 7)))
    with pytest.raises(KeyError, match=r"bad\.npz: missing \['state', 'language_instruction'\]"):
        build_rlds(["episodes", "--source", str(tmp_path / "episodes"), "--out", str(tmp_path), "--name", "x"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_rlds(["episodes", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--name", "x"])
