from __future__ import annotations

import itertools
import os
import shutil

import cv2
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from datasets.build_rlds import _resize
from datasets.builder import EpisodeSchema, write_rlds
from datasets.crop import check_roi, roi_box
from datasets.rlds import (
    LoaderConfig,
    RLDSSource,
    _decode,
    _roi_crop,
    balance_by_size,
    compute_all_statistics,
    compute_statistics,
    dataset_fingerprint,
    iterate_torch,
    make_frame_dataset,
    open_builder,
)
from datasets.statistics import normalize
from serving.observation import adapt_observation


def _raw_actions(root) -> list[np.ndarray]:
    builder = tfds.builder_from_directory(str(root / "sample" / "1.0.0"))
    episodes = builder.as_dataset(split="train", decoders={"steps": tfds.decode.SkipDecoding()})
    return [e["steps"]["action"] for e in episodes.as_numpy_iterator()]


def test_layout_is_tfds(sample_rlds) -> None:
    files = sorted(p.name for p in (sample_rlds / "sample" / "1.0.0").iterdir())
    assert "dataset_info.json" in files and "features.json" in files
    assert sum(".tfrecord-" in f for f in files) == 2
    assert not [p for p in sample_rlds.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_statistics_cover_every_episode_and_are_cached(sample_rlds, tmp_path) -> None:
    source = RLDSSource(name="sample", data_dir=str(sample_rlds))
    stats = compute_statistics(source, 7, tmp_path)
    actions = np.concatenate(_raw_actions(sample_rlds))
    assert stats["num_transitions"] == len(actions) == 120 and stats["num_trajectories"] == 10
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(actions, 0.99, axis=0), rtol=1e-5)
    assert stats["action"]["mask"] == [True] * 6 + [False]
    assert len(stats["proprio"]["mean"]) == 8
    cached = list(tmp_path.iterdir())
    assert len(cached) == 1
    assert compute_statistics(source, 7, tmp_path) == stats


def test_a_rebuilt_dataset_of_the_same_size_is_not_taken_for_the_cached_one(sample_rlds, tmp_path) -> None:
    root = tmp_path / "rlds"
    shutil.copytree(sample_rlds, root)
    source = RLDSSource(name="sample", data_dir=str(root))
    before = dataset_fingerprint(source)
    assert dataset_fingerprint(source) == before
    shard = next((root / "sample" / "1.0.0").glob("*.tfrecord-*"))
    content = shard.read_bytes()
    shard.write_bytes(content)  # rewritten: same name, same size
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1_000_000))
    assert dataset_fingerprint(source) != before


def test_libero_transform_inverts_gripper(sample_rlds, tmp_path) -> None:
    plain = compute_statistics(RLDSSource(name="sample", data_dir=str(sample_rlds)), 7, None)
    libero = compute_statistics(
        RLDSSource(name="sample", data_dir=str(sample_rlds), action_transform="libero_gripper"), 7, None
    )
    assert libero["action"]["mean"][-1] == pytest.approx(1 - plain["action"]["mean"][-1], abs=1e-6)


def test_frames_hold_normalized_chunks_with_padding(sample_rlds) -> None:
    source = RLDSSource(name="sample", data_dir=str(sample_rlds))
    stats = compute_statistics(source, 7, None)
    cfg = LoaderConfig(image_size=24, window=16, batch_size=12, val_fraction=0.1, augment=False)
    (batch,) = list(iterate_torch(make_frame_dataset([source], {"sample": stats}, cfg, split="val")))
    episode = _raw_actions(sample_rlds)[-1]  # val = the last 10% of episodes, in order
    assert batch["image"].shape == (12, 24, 24, 3) and str(batch["image"].dtype) == "torch.uint8"
    assert batch["action"].shape == (12, 16, 7)
    expected = normalize(episode, stats["action"])
    np.testing.assert_allclose(batch["action"][0, :12].numpy(), expected, atol=1e-5)
    pad = batch["action_pad_mask"][0].numpy()
    assert pad[:12].all() and not pad[12:].any()
    zero_motion = normalize(np.zeros((1, 7)), stats["action"])[0]
    np.testing.assert_allclose(batch["action"][0, 12:, :6].numpy(), np.tile(zero_motion[:6], (4, 1)), atol=1e-5)
    assert (batch["action"][0, 12:, 6] == float(episode[-1, 6])).all()
    assert batch["prompt"][0].startswith("reach the ")


def test_held_out_frames_of_an_augmented_model_see_the_central_crop() -> None:
    image = np.full((100, 100, 3), 220, np.uint8)
    image[:3], image[-3:], image[:, :3], image[:, -3:] = 0, 0, 0, 0  # a ring outside the central 0.9 of the area
    encoded = tf.io.encode_jpeg(image, quality=100)
    seed = tf.constant([1, 2], tf.int64)
    decode = {augment: _decode(LoaderConfig(image_size=100, augment=augment), train=False) for augment in (False, True)}
    plain = decode[False]({"image": encoded}, seed)["image"].numpy()
    cropped = decode[True]({"image": encoded}, seed)["image"].numpy()
    assert plain[0].max() < 60 and cropped.min() > 190


@pytest.mark.parametrize("size", [224, 112])
@pytest.mark.parametrize("augment", [False, True])
def test_served_frames_are_the_validation_frames(size: int, augment: bool) -> None:
    """A client sending frames at the dataset's resolution (256) gets the pixels the loader's held-out frames have:
    the central crop of a model trained on random crops cut before the one resampling, with the loader's kernel."""
    rng = np.random.default_rng(0)
    frame = cv2.resize(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), (256, 256), interpolation=cv2.INTER_LINEAR)
    encoded = tf.io.encode_jpeg(frame, quality=100)
    held_out = _decode(LoaderConfig(image_size=size, augment=augment), train=False)
    validation = held_out({"image": encoded}, tf.constant([1, 2], tf.int64))["image"].numpy().astype(np.int16)
    keys = {"image": "image", "prompt": "prompt"}
    message = {"image": tf.io.decode_jpeg(encoded).numpy(), "prompt": "p"}
    served = adapt_observation(message, keys, size, crop=augment, stored_size=256).image
    difference = np.abs(served.astype(np.int16) - validation)
    assert difference.mean() < 0.3 and difference.max() <= 2, (difference.mean(), difference.max())
    # A camera of twice the dataset's resolution: served as the frame the builder stored of it (before its JPEG).
    camera = cv2.resize(frame, (512, 512), interpolation=cv2.INTER_LINEAR)
    served = adapt_observation({**message, "image": camera}, keys, size, crop=augment, stored_size=256).image
    stored = {**message, "image": _resize(camera[None], 256)[0]}
    np.testing.assert_array_equal(served, adapt_observation(stored, keys, size, crop=augment, stored_size=256).image)


def test_region_of_interest_and_crop_are_alike_in_training_and_serving() -> None:
    # A 64 x 128 camera: the builder stores its frames squashed to 128 x 128, a client sends them as they are.
    camera = np.full((64, 128, 3), 100, np.uint8)
    camera[:10] = (255, 0, 0)  # outside the region of interest
    camera[32:39, 32:44] = (0, 255, 0)  # inside it
    roi = [0.33, 0.19, 0.62, 0.62]
    encoded = tf.io.encode_jpeg(_resize(camera[None], 128)[0], quality=100)
    frame = {"image": encoded, "wrist_image": encoded}
    trained = _decode(LoaderConfig(image_size=112, image_roi=roi), train=False)(frame, tf.constant([1, 2], tf.int64))
    keys = {"image": "image", "wrist_image": "wrist_image", "prompt": "prompt"}
    message = {"image": camera, "wrist_image": camera, "prompt": "p"}
    served = adapt_observation(message, keys, 112, crop=True, roi=roi)
    whole = adapt_observation(message, keys, 112, crop=True)

    def green_centre(image: np.ndarray) -> np.ndarray:
        rows, cols = np.nonzero((image[..., 1] > 200) & (image[..., 0] < 60))
        return np.array([rows.mean(), cols.mean()])

    # In fractions of the camera: the square's centre (35.5 / 64, 38 / 128), the ROI from (0.33, 0.19), 0.62 wide,
    # then the central 0.949 of it; both sides squashed to 112. Boxes are whole pixels of frames of different sizes
    # (128 stored, 64 x 128 sent), so the two may differ by about 2% of the image.
    inner = 0.62 * 0.9**0.5
    centre = np.array([35.5 / 64, 38 / 128]) - np.array([0.33, 0.19]) - (0.62 - inner) / 2
    expected = 112 * centre / inner - 0.5  # as a pixel index
    for image in (trained["image"].numpy(), served.image):
        assert image.shape == (112, 112, 3) and not ((image[..., 0] > 200) & (image[..., 1] < 60)).any()
        np.testing.assert_allclose(green_centre(image), expected, atol=2.5)
    assert np.abs(green_centre(whole.image) - expected).max() > 10  # without the ROI the square sits elsewhere
    # The wrist camera is never cropped to the ROI: its red band stays in view.
    for wrist in (trained["wrist_image"].numpy(), served.wrist_image, whole.wrist_image):
        assert ((wrist[..., 0] > 200) & (wrist[..., 1] < 60)).any()
    np.testing.assert_array_equal(served.wrist_image, whole.wrist_image)


def test_region_of_interest_rounds_alike_in_numpy_and_tensorflow() -> None:
    pixels = tf.reshape(tf.range(100 * 60), [100, 60, 1])  # each pixel holds its own index
    for roi in ([0.125, 0.25, 0.5, 0.35], [0.135, 0.025, 0.865, 0.975], [0.999, 0.999, 0.001, 0.001]):
        top, left, height, width = roi_box(100, 60, roi)
        assert height >= 1 and width >= 1 and top + height <= 100 and left + width <= 60
        expected = pixels.numpy()[top : top + height, left : left + width]
        np.testing.assert_array_equal(_roi_crop(pixels, roi).numpy(), expected)
    assert roi_box(100, 60, [0.125, 0.25, 0.5, 0.35]) == (12, 15, 50, 21)  # 12.5 rounds half to even
    for bad in ([0.5, 0.5, 0.6, 0.2], [0.1, 0.1, 0.5], "workspace", [0.1, -0.1, 0.5, 0.5]):
        with pytest.raises(ValueError, match=r"loader\.image_roi=.*\[top, left, height, width\]"):
            check_roi(bad)
    with pytest.raises(ValueError, match=r"loader\.image_roi"):
        LoaderConfig(image_roi=[0.5, 0.5, 0.6, 0.6])  # checked when the config is made, before any data is read


def test_train_split_is_shuffled_augmented_and_endless(sample_rlds) -> None:
    source = RLDSSource(name="sample", data_dir=str(sample_rlds))
    stats = compute_statistics(source, 7, None)
    cfg = LoaderConfig(image_size=24, window=4, batch_size=16, frame_shuffle_buffer=64, interleave_episodes=4)
    batches = iterate_torch(make_frame_dataset([source], {"sample": stats}, cfg))
    seen = [next(batches) for _ in range(12)]  # 192 frames > the 108 training frames: it repeats
    assert all(b["action"].shape == (16, 4, 7) for b in seen)
    assert len({p for b in seen for p in b["prompt"]}) > 1


def test_mixture_samples_every_source_by_weight(sample_rlds) -> None:
    a = RLDSSource(name="sample", data_dir=str(sample_rlds), weight=1.0)
    b = RLDSSource(name="sample", data_dir=str(sample_rlds), weight=3.0, unnorm_key="sample_b")
    stats = compute_statistics(a, 7, None)
    cfg = LoaderConfig(image_size=16, window=2, batch_size=64, frame_shuffle_buffer=32, interleave_episodes=2)
    batches = iterate_torch(make_frame_dataset([a, b], {"sample": stats, "sample_b": stats}, cfg))
    index = np.concatenate([next(batches)["dataset_index"].numpy() for _ in range(8)])
    assert 0.6 < (index == 1).mean() < 0.9
    with_aux = RLDSSource(name="sample", data_dir=str(sample_rlds), aux_key="observation/object_pos")
    mixed = {"sample": compute_statistics(with_aux, 7, None), "sample_b": stats}
    with pytest.raises(ValueError, match=r"sample: state\[8\], aux\[2\]; sample_b: state\[8\]\); expected the same"):
        make_frame_dataset([with_aux, b], mixed, cfg)


def test_balanced_weights_scale_with_each_sources_transitions(tmp_path) -> None:
    from datasets.sample import build_sample_dataset

    build_sample_dataset(tmp_path, "small", num_episodes=2, steps=3, image_size=8, num_shards=1)
    build_sample_dataset(tmp_path, "large", num_episodes=4, steps=5, image_size=8, num_shards=1)
    sources = [
        RLDSSource(name="small", data_dir=str(tmp_path), weight=2.0),
        RLDSSource(name="large", data_dir=str(tmp_path)),
    ]
    balanced = balance_by_size(sources, 7, tmp_path / "cache")
    assert [s.weight for s in balanced] == [2.0 * 6, 1.0 * 20] and [s.weight for s in sources] == [2.0, 1.0]


def test_validation_alternates_the_sources_episodes(sample_rlds) -> None:
    a = RLDSSource(name="sample", data_dir=str(sample_rlds))
    b = RLDSSource(name="sample", data_dir=str(sample_rlds), unnorm_key="sample_b")
    stats = compute_statistics(a, 7, None)
    cfg = LoaderConfig(image_size=16, window=2, batch_size=8, val_fraction=0.2, augment=False)
    batches = list(iterate_torch(make_frame_dataset([a, b], {"sample": stats, "sample_b": stats}, cfg, split="val")))
    index = np.concatenate([x["dataset_index"].numpy() for x in batches])
    frame = np.concatenate([x["frame_index"].numpy() for x in batches])
    starts = np.flatnonzero(frame == 0)  # 2 held-out episodes of 12 frames per source, each whole and in order
    assert len(index) == 48 and starts.tolist() == [0, 12, 24, 36]
    assert index[starts].tolist() == [0, 1, 0, 1] and all((index[s : s + 12] == index[s]).all() for s in starts)


def test_sources_sharing_an_unnorm_key_pool_their_statistics(sample_rlds, tmp_path) -> None:
    plain = RLDSSource(name="sample", data_dir=str(sample_rlds))
    gripper_flipped = RLDSSource(name="sample", data_dir=str(sample_rlds), action_transform="libero_gripper")
    one = compute_all_statistics([plain, gripper_flipped], 7, tmp_path)
    assert list(one) == ["sample"]  # one entry, not the last source's statistics under the shared key
    actions = np.concatenate(_raw_actions(sample_rlds))
    pooled = np.concatenate([actions, np.concatenate([actions[:, :6], 1 - actions[:, 6:]], 1)])
    assert one["sample"]["num_transitions"] == len(pooled) == 240 and one["sample"]["num_trajectories"] == 20
    np.testing.assert_allclose(one["sample"]["action"]["mean"], pooled.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one["sample"]["action"]["q01"], np.quantile(pooled, 0.01, axis=0), rtol=1e-5)
    assert compute_all_statistics([plain, gripper_flipped], 7, tmp_path) == one  # the pooled entry is cached
    assert len(list(tmp_path.glob("sample-pooled-*.json"))) == 1
    with_aux = RLDSSource(name="sample", data_dir=str(sample_rlds), aux_key="observation/object_pos")
    with pytest.raises(ValueError, match=r"share the statistics key 'sample' but differ in aux_key set"):
        compute_all_statistics([plain, with_aux], 7, None)
    for name, state_dim in (("arm_a", 2), ("arm_b", 3)):
        episode = {
            "image": np.zeros((3, 8, 8, 3), np.uint8),
            "state": np.zeros((3, state_dim), np.float32),
            "action": np.zeros((3, 7), np.float32),
            "language_instruction": "do it",
            "file_path": "ep0.npz",
        }
        write_rlds([episode], tmp_path / "rlds", name, EpisodeSchema(image_size=8, state_dim=state_dim, action_dim=7))
    arms = [RLDSSource(name=n, data_dir=str(tmp_path / "rlds"), unnorm_key="arm") for n in ("arm_a", "arm_b")]
    with pytest.raises(ValueError, match=r"'arm_a' and 'arm_b' share the statistics key 'arm' but their state has 2"):
        compute_all_statistics(arms, 7, None)


def test_bad_inputs_name_what_is_wrong(sample_rlds, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _ = RLDSSource(name="nope", data_dir=str(tmp_path)).path
    (tmp_path / "empty" / "1.0.0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"dataset_info\.json"):
        _ = RLDSSource(name="empty", data_dir=str(tmp_path)).path
    with pytest.raises(KeyError, match="observation/image"):
        open_builder(RLDSSource(name="sample", data_dir=str(sample_rlds), image_key="observation/rgb"))
    with pytest.raises(ValueError, match=r"state_key='observation/image' is a image feature.*expected vector"):
        open_builder(RLDSSource(name="sample", data_dir=str(sample_rlds), state_key="observation/image"))
    with pytest.raises(ValueError, match=r"image_key='observation/state' is a vector feature.*'observation/image'"):
        open_builder(RLDSSource(name="sample", data_dir=str(sample_rlds), image_key="observation/state"))


def test_feature_kinds_accept_encoded_frames_in_a_string_tensor() -> None:
    from datasets.rlds import KEY_KINDS, _feature_kind

    encoded = _feature_kind(tfds.features.Tensor(shape=(), dtype=np.object_))
    assert encoded in KEY_KINDS["image_key"] and encoded in KEY_KINDS["language_key"]
    assert _feature_kind(tfds.features.Text()) not in KEY_KINDS["image_key"]
    assert _feature_kind(tfds.features.Tensor(shape=(7,), dtype=np.float32)) == "vector"


def test_builder_refuses_nan_and_wrong_shapes(tmp_path) -> None:
    schema = EpisodeSchema(image_size=8, state_dim=2, action_dim=7)
    good = {
        "image": np.zeros((3, 8, 8, 3), np.uint8),
        "state": np.zeros((3, 2), np.float32),
        "action": np.zeros((3, 7), np.float32),
        "language_instruction": "do it",
        "file_path": "ep0.npz",
    }
    bad = {**good, "action": np.full((3, 7), np.nan, np.float32)}
    with pytest.raises(ValueError, match=r"ep0\.npz: action holds NaN"):
        write_rlds([good, bad], tmp_path, "broken", schema)
    assert not (tmp_path / "broken").exists()
    with pytest.raises(ValueError, match=r"expected \[T, 7\]"):
        write_rlds([{**good, "action": np.zeros((3, 6))}], tmp_path, "broken", schema)
    # One NaN state would make that dimension's statistics, so every frame's normalized state, NaN.
    state = good["state"].copy()
    state[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"ep0\.npz: state holds NaN or inf at steps \[1\]"):
        write_rlds([{**good, "state": state}], tmp_path, "broken", schema)
    with pytest.raises(ValueError, match=r"ep0\.npz: image is float32 in \[0, 0\.5\], expected uint8"):
        write_rlds(
            [{**good, "image": np.linspace(0, 0.5, 576, dtype=np.float32).reshape(3, 8, 8, 3)}],
            tmp_path,
            "broken",
            schema,
        )
    assert not (tmp_path / "broken").exists()


def test_a_killed_builds_leftovers_are_removed_by_the_next_build_and_a_running_ones_kept(tmp_path) -> None:
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    killed = tmp_path / f".sample.building-{host}-{dead.stdout.strip()}-x1"
    running = tmp_path / f".sample.building-{host}-{os.getppid()}-x2"  # pytest's parent: alive
    # On a shared disk: host "<host>-31337"'s build (pid 4242 there), not a dead pid 31337 of this host.
    other_host = tmp_path / f".sample.building-{host}-31337-4242-x3"
    for left in (killed, running, other_host):
        (left / "sample" / "1.0.0").mkdir(parents=True)
    from datasets.sample import build_sample_dataset

    build_sample_dataset(tmp_path, num_episodes=2, steps=3, image_size=8, num_shards=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, other_host.name, "sample"])


def test_action_size_mismatch_and_truncated_shards_are_named(tmp_path) -> None:
    from datasets.sample import build_sample_dataset

    path = build_sample_dataset(tmp_path, num_episodes=6, steps=5, image_size=16, num_shards=2)
    source = RLDSSource(name="sample", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"action has shape \(7,\).*action_dim=6"):
        compute_statistics(source, 6)
    shard = sorted(path.glob("*.tfrecord-*"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(OSError, match=shard.name):
        compute_statistics(source, 7)


def test_each_rank_reads_its_own_episodes(sample_rlds) -> None:
    source = RLDSSource(name="sample", data_dir=str(sample_rlds))
    stats = {"sample": compute_statistics(source, 7, None)}
    cfg = LoaderConfig(image_size=16, window=2, batch_size=4, val_fraction=0.0, augment=False)

    def episodes_of(rank: int) -> set[int]:
        """The episodes rank `rank` of two sees in its first 60 frames (each rank holds 5 episodes of 12 steps)."""
        frames = make_frame_dataset([source], stats, cfg, "train", rank=rank, world_size=2)
        batches = [batch for _, batch in zip(range(15), iterate_torch(frames), strict=False)]
        assert batches[0]["action"].shape == (4, 2, 7)
        return {int(i) for batch in batches for i in batch["episode_index"]}

    first, second = episodes_of(0), episodes_of(1)
    assert first | second == set(range(10)) and not first & second


def test_each_episode_read_yields_a_random_share_of_its_frames_with_their_own_chunks(sample_rlds) -> None:
    source = RLDSSource(name="sample", data_dir=str(sample_rlds))
    stats = {"sample": compute_statistics(source, 7, None)}

    def frames(episode_reads: int, count: int, **buffers) -> list[tuple[int, int, np.ndarray]]:
        cfg = LoaderConfig(
            image_size=16, window=4, batch_size=10, val_fraction=0.0, augment=False, episode_reads=episode_reads
        )
        cfg.__dict__.update(buffers)
        batches = iterate_torch(make_frame_dataset([source], stats, cfg))
        out = []
        for _ in range(count // cfg.batch_size):
            batch = next(batches)
            for e, f, a in zip(batch["episode_index"], batch["frame_index"], batch["action"], strict=True):
                out.append((int(e), int(f), a.numpy()))
        return out

    # Reads in order (no shuffling): each read of a 12-step episode yields ceil(12 / 4) = 3 distinct frames in time
    # order; over many reads every frame of every episode is drawn.
    in_order = frames(4, 1200, episode_shuffle_buffer=1, interleave_episodes=1, frame_shuffle_buffer=1)
    reads = [in_order[i : i + 3] for i in range(0, len(in_order), 3)]
    assert all(len({e for e, _, _ in read}) == 1 for read in reads)
    assert all(a[0][0] != b[0][0] for a, b in itertools.pairwise(reads))  # 3 frames, then the next episode
    assert all(read[0][1] < read[1][1] < read[2][1] for read in reads)
    assert {(e, f) for e, f, _ in in_order} == {(e, f) for e in range(10) for f in range(12)}
    # A frame's action chunk is cut from the whole episode (padding past its end included), whatever read it came in.
    whole = {(e, f): a for e, f, a in frames(1, 600, frame_shuffle_buffer=50)}
    assert len(whole) == 120
    for e, f, a in in_order[:300]:
        np.testing.assert_array_equal(a, whole[(e, f)])


def test_bad_episode_reads_and_a_rank_without_episodes_are_named(sample_rlds) -> None:
    source = RLDSSource(name="sample", data_dir=str(sample_rlds))
    stats = {"sample": compute_statistics(source, 7, None)}
    with pytest.raises(ValueError, match=r"loader\.episode_reads must be at least 1"):
        make_frame_dataset([source], stats, LoaderConfig(episode_reads=0))
    # 10 episodes, 10% held out: one validation episode, so the second of two ranks has none.
    cfg = LoaderConfig(val_fraction=0.1)
    with pytest.raises(ValueError, match=r"sample: split .* holds no episodes"):
        make_frame_dataset([source], stats, cfg, "val", rank=1, world_size=2)


def test_train_pipeline_is_deterministic_and_skips_exactly(sample_rlds) -> None:
    source = RLDSSource(name="sample", data_dir=str(sample_rlds))
    stats = {"sample": compute_statistics(source, 7, None)}
    cfg = LoaderConfig(image_size=24, window=4, batch_size=8, frame_shuffle_buffer=50, interleave_episodes=3)

    def batches(skip: int = 0, count: int = 4) -> list[dict]:
        iterator = iterate_torch(make_frame_dataset([source], stats, cfg, skip_frames=skip))
        return [next(iterator) for _ in range(count)]

    first, again, resumed = batches(), batches(), batches(skip=2 * 8, count=2)
    for a, b in zip(first, again, strict=True):
        assert a["prompt"] == b["prompt"] and (a["image"] == b["image"]).all() and (a["action"] == b["action"]).all()
    for a, b in zip(first[2:], resumed, strict=True):
        assert (a["image"] == b["image"]).all() and (a["action"] == b["action"]).all()
    assert not (first[0]["image"] == first[1]["image"]).all()


def test_sources_of_other_state_sizes_mix_for_a_model_that_reads_no_state(sample_rlds) -> None:
    """Frames carry only the inputs the model reads (train.py: use_state follows model.proprio_dim): two robots with
    5- and 8-value states mix; a model that reads the state is told the sizes differ, before any frame is read."""
    eight = RLDSSource(name="sample", data_dir=str(sample_rlds), unnorm_key="eight")
    five = RLDSSource(name="sample", data_dir=str(sample_rlds), unnorm_key="five")
    entry = compute_statistics(eight, 7, None)
    proprio = {k: v[:5] if isinstance(v, list) else v for k, v in entry["proprio"].items()}
    stats = {"eight": entry, "five": {**entry, "proprio": proprio}}
    common = dict(image_size=16, window=2, batch_size=4, val_fraction=0.0, augment=False)
    with pytest.raises(ValueError, match=r"eight: state\[8\]; five: state\[5\]"):
        make_frame_dataset([eight, five], stats, LoaderConfig(**common))
    batch = next(iterate_torch(make_frame_dataset([eight, five], stats, LoaderConfig(**common, use_state=False))))
    assert "state" not in batch and batch["action"].shape == (4, 2, 7)
