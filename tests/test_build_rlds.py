from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets.build_rlds import main as build_rlds
from datasets.rlds import RLDSSource, compute_statistics, image_side, open_builder
from sim.maniskill import STATE_DIM


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
    # Fewer episodes than the default 4 shards: one shard each; more shards than episodes: refused before converting.
    few = ["episodes", "--source", str(tmp_path / "episodes"), "--out", str(tmp_path / "few"), "--name", "mine"]
    assert len(list(build_rlds(few).glob("*.tfrecord*"))) == 3
    with pytest.raises(
        ValueError, match=r"--shards 5 for 3 episode\(s\): each shard holds at least one; pass --shards 3"
    ):
        build_rlds([*few[:4], str(tmp_path / "none"), *few[5:], "--shards", "5"])
    assert not (tmp_path / "none").exists()


def test_float_images_are_refused_not_stored_black_and_other_h5_content_is_left_unread(tmp_path) -> None:
    import h5py

    folder = tmp_path / "episodes"
    _write_episodes(folder, 2, ".h5")
    with h5py.File(folder / "ep0.h5", "a") as f:
        f.create_group("extras")["depth"] = np.zeros((5, 40, 40))  # a group beside the episode's arrays
    args = ["episodes", "--source", str(folder), "--out", str(tmp_path / "rlds"), "--shards", "1", "--name", "mine"]
    assert build_rlds(args).is_dir()
    with h5py.File(folder / "ep1.h5", "a") as f:
        images = f["image"][()] / 255.0
        del f["image"]
        f["image"] = images
    with pytest.raises(ValueError, match=r"ep1\.h5: image is float64 in \[0, 1\], expected uint8 \[T, H, W, 3\]"):
        build_rlds([*args[:-1], "floats"])
    assert not (tmp_path / "rlds" / "floats").exists()


def test_episode_file_missing_a_key_is_named(tmp_path) -> None:
    (tmp_path / "episodes").mkdir()
    np.savez(tmp_path / "episodes" / "bad.npz", image=np.zeros((2, 8, 8, 3), np.uint8), action=np.zeros((2, 7)))
    with pytest.raises(KeyError, match=r"bad\.npz: missing \['state', 'language_instruction'\]"):
        build_rlds(["episodes", "--source", str(tmp_path / "episodes"), "--out", str(tmp_path), "--name", "x"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_rlds(["episodes", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--name", "x"])


def _write_maniskill_trajectory(
    path, lengths: list[int], objects: tuple = ("cube", "goal_site"), cameras: tuple = ("base_camera",)
) -> list[np.ndarray]:
    """A ManiSkill3 trajectory file (.h5 + .json) as replay_trajectory writes it for PickCube-v1; returns each
    episode's actor states of the cube."""
    import json

    import h5py

    rng = np.random.default_rng(0)
    cubes = []
    with h5py.File(path, "w") as f:
        for i, steps in enumerate(lengths):
            group = f.create_group(f"traj_{i}")
            group["actions"] = rng.uniform(-1, 1, (steps, 7)).astype(np.float32)
            quaternion = np.tile([1.0, 0, 0, 0], (steps + 1, 1))  # wxyz
            group["obs/extra/tcp_pose"] = np.concatenate([rng.normal(size=(steps + 1, 3)), quaternion], 1)
            group["obs/agent/qpos"] = rng.normal(size=(steps + 1, 9))
            group["obs/extra/goal_pos"] = rng.normal(size=(steps + 1, 3))
            for k, camera in enumerate(cameras):  # flat frames, a level per camera and step (JPEG keeps them)
                levels = 40 * k + 3 * np.arange(steps + 1, dtype=np.uint8)
                group[f"obs/sensor_data/{camera}/rgb"] = np.broadcast_to(
                    levels[:, None, None, None], (steps + 1, 16, 16, 3)
                )
            cubes.append(rng.normal(size=(steps + 1, 13)).astype(np.float32))
            for name in objects:
                group[f"env_states/actors/{name}"] = cubes[-1] if name == "cube" else rng.normal(size=(steps + 1, 13))
            group["env_states/actors/table-workspace"] = np.zeros((steps + 1, 13), np.float32)
    meta = {
        "env_info": {"env_id": "PickCube-v1", "env_kwargs": {"control_mode": "pd_ee_delta_pose"}},
        "episodes": [{"episode_id": i, "success": True} for i in range(len(lengths))],
    }
    path.with_suffix(".json").write_text(json.dumps(meta))
    return cubes


def test_maniskill_trajectories_carry_the_objects_positions_as_an_aux_target(tmp_path) -> None:
    import h5py

    from datasets.rlds import LoaderConfig, iterate_torch, make_frame_dataset
    from datasets.statistics import normalize

    trajectory = tmp_path / "PickCube-v1.rgb.pd_ee_delta_pose.physx_cpu.h5"
    cubes = _write_maniskill_trajectory(trajectory, [6, 7, 8, 9])
    build_rlds(["maniskill", "--source", str(trajectory), "--out", str(tmp_path / "rlds"), "--name", "pick"])

    source = RLDSSource(name="pick", data_dir=str(tmp_path / "rlds"), aux_key="observation/object_pos")
    # Stored at the camera's own 16 px (the checkpoint's camera_size, at which evaluation renders), not resampled.
    assert image_side(open_builder(source, 7), source.image_key) == 16
    stats = compute_statistics(source, 7)
    with h5py.File(trajectory) as f:  # sorted names: cube, goal_site (the table is static scenery)
        objects = [
            np.concatenate([f[f"traj_{i}/env_states/actors/{n}"][:-1, :3] for n in ("cube", "goal_site")], 1)
            for i in range(4)
        ]
    np.testing.assert_allclose(stats["aux"]["max"], np.concatenate(objects).max(0), rtol=1e-6)
    np.testing.assert_allclose(objects[0][:, :3], cubes[0][:-1, :3])
    assert len(stats["proprio"]["q01"]) == STATE_DIM

    cfg = LoaderConfig(image_size=16, window=4, batch_size=9, val_fraction=0.25, augment=False)
    (batch,) = list(iterate_torch(make_frame_dataset([source], {"pick": stats}, cfg, split="val")))
    np.testing.assert_allclose(batch["aux"].numpy(), normalize(objects[-1], stats["aux"]), atol=1e-5)

    without_aux = RLDSSource(name="pick", data_dir=str(tmp_path / "rlds"))
    with pytest.raises(ValueError, match=r"aux_key='observation/object_pos' is set but its statistics"):
        make_frame_dataset([source], {"pick": compute_statistics(without_aux, 7)}, cfg, split="val")
    wrong = RLDSSource(name="pick", data_dir=str(tmp_path / "rlds"), aux_key="observation/objects")
    with pytest.raises(KeyError, match=r"aux_key='observation/objects' is not a step feature"):
        compute_statistics(wrong, 7)

    # A task with more objects than OBJECT_SLOTS still builds, without the optional target.
    crowded = tmp_path / "crowded" / "PokeCube-v1.h5"
    crowded.parent.mkdir()
    _write_maniskill_trajectory(crowded, [5, 6, 7, 8], objects=("cube", "peg", "goal_region"))
    path = build_rlds(["maniskill", "--source", str(crowded), "--out", str(tmp_path / "rlds"), "--name", "poke"])
    assert "object_pos" not in (path / "features.json").read_text()
    assert compute_statistics(RLDSSource(name="poke", data_dir=str(tmp_path / "rlds")), 7)["num_trajectories"] == 4


def test_maniskill_wrist_camera_becomes_the_wrist_image(tmp_path) -> None:
    from datasets.rlds import LoaderConfig, iterate_torch, make_frame_dataset

    trajectory = tmp_path / "PickCube-v1.rgb.pd_ee_delta_pose.physx_cpu.h5"
    _write_maniskill_trajectory(trajectory, [6, 7], cameras=("base_camera", "hand_camera"))
    args = [
        "maniskill",
        "--source",
        str(trajectory),
        "--out",
        str(tmp_path / "rlds"),
        "--name",
        "pick",
    ]
    path = build_rlds([*args, "--wrist-camera", "hand_camera"])  # 2 episodes: 2 shards, not the default 4
    assert len(list(path.glob("*.tfrecord*"))) == 2
    source = RLDSSource(name="pick", data_dir=str(tmp_path / "rlds"), wrist_image_key="observation/wrist_image")
    stats = compute_statistics(source, 7)
    cfg = LoaderConfig(image_size=16, window=1, batch_size=7, val_fraction=0.5, augment=False, use_wrist_image=True)
    (batch,) = list(iterate_torch(make_frame_dataset([source], {"pick": stats}, cfg, split="val")))
    # Each camera's own frames, step by step: base 3t, hand 40 + 3t (one episode is held out).
    images, wrist = (batch[k].float().mean(dim=(1, 2, 3)) for k in ("image", "wrist_image"))
    np.testing.assert_allclose(wrist - images, 40, atol=1.5)
    np.testing.assert_allclose(torch.sort(images).values, 3 * np.arange(len(images)), atol=1.5)

    # A one-camera replay (the Panda has no hand_camera): the error names the cameras there and the robot to use.
    single = tmp_path / "single" / "PickCube-v1.h5"
    single.parent.mkdir()
    _write_maniskill_trajectory(single, [5])
    with pytest.raises(
        KeyError, match=r"no rgb images of camera 'hand_camera' \(cameras: \['base_camera'\]\).*panda_wristcam"
    ):
        build_rlds(
            [
                "maniskill",
                "--source",
                str(single),
                "--out",
                str(tmp_path / "rlds"),
                "--name",
                "x",
                "--wrist-camera",
                "hand_camera",
            ]
        )


def test_object_positions_leave_out_the_scene_and_refuse_too_many_objects() -> None:
    from sim.maniskill import OBJECT_SLOTS, object_positions

    actors = {"cubeB": np.full((2, 13), 2.0), "table-workspace": np.ones((2, 13)), "cubeA": np.full((2, 13), 1.0)}
    np.testing.assert_array_equal(object_positions(actors), [[1, 1, 1, 2, 2, 2]] * 2)
    single = object_positions({"cube": np.full((3, 13), 5.0), "ground": np.zeros((3, 13))})
    assert single.shape == (3, 3 * OBJECT_SLOTS) and (single[:, 3:] == 0).all()
    with pytest.raises(ValueError, match=r"more than OBJECT_SLOTS=2"):
        object_positions({name: np.zeros((2, 13)) for name in ("a", "b", "c")})


def test_misshapen_episodes_and_a_file_as_source_are_named(tmp_path) -> None:
    folder = tmp_path / "episodes"
    _write_episodes(folder, 2)
    out = ["--out", str(tmp_path / "rlds"), "--name", "mine", "--shards", "1"]
    with pytest.raises(NotADirectoryError, match=r"ep0\.npz is a file; --source takes the folder of episode files"):
        build_rlds(["episodes", "--source", str(folder / "ep0.npz"), *out])
    with np.load(folder / "ep0.npz") as f:
        episode = dict(f)
    np.savez(folder / "ep0.npz", **{**episode, "action": episode["action"][:, 0]})  # one value per step
    with pytest.raises(ValueError, match=r"ep0\.npz: action has shape \[5\], expected \[T, N\]"):
        build_rlds(["episodes", "--source", str(folder), *out])
    channels_first = np.moveaxis(episode["image"], -1, 1)  # [T, 3, H, W]
    np.savez(folder / "ep0.npz", **{**episode, "image": channels_first})
    with pytest.raises(ValueError, match=r"image has shape \[5, 3, 40, 40\], expected uint8 \[T, H, W, 3\]; channels"):
        build_rlds(["episodes", "--source", str(folder), *out, "--image-size", "32"])
