from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from datasets.rlds import RLDSSource, compute_statistics
from datasets.tfrecord_columns import read_columns

RAGGED = {
    "steps/action": tf.io.RaggedFeature(tf.float32),
    "steps/observation/state": tf.io.RaggedFeature(tf.float32),
    "steps/is_first": tf.io.RaggedFeature(tf.int64),
    "episode_metadata/file_path": tf.io.RaggedFeature(tf.string),
}


def test_columns_equal_tensorflows_parse_on_the_builders_shards(sample_rlds) -> None:
    shards = sorted((sample_rlds / "sample" / "1.0.0").glob("*.tfrecord-*"))
    ours = [record for shard in shards for record in read_columns(shard, list(RAGGED))]
    theirs = [tf.io.parse_single_example(r, RAGGED) for r in tf.data.TFRecordDataset([str(s) for s in shards])]
    assert len(ours) == len(theirs) == 10
    for mine, reference in zip(ours, theirs, strict=True):
        for key in ("steps/action", "steps/observation/state", "steps/is_first"):
            assert mine[key].dtype == reference[key].numpy().dtype
            np.testing.assert_array_equal(mine[key], reference[key].numpy())
        assert mine["episode_metadata/file_path"] == list(reference["episode_metadata/file_path"].numpy())
        assert "steps/observation/image" not in mine  # not asked for: skipped


def test_unpacked_lists_negative_ints_and_missing_keys(tmp_path) -> None:
    """Protobuf allows repeated floats and ints one per field instead of packed; writers differ."""
    example = tf.train.Example()
    example.features.feature["f"].float_list.value.extend([1.5, -2.0, np.inf])
    example.features.feature["i"].int64_list.value.extend([-3, 2**40])
    serialized = bytearray(example.SerializeToString())
    path = tmp_path / "one.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(bytes(serialized))
        # The same feature written by hand unpacked: Example{features{feature{key "f" value{float_list{value...}}}}}.
        floats = b"".join(b"\x0d" + np.float32(v).tobytes() for v in (0.25, 4.0))  # field 1, wire type 5, each
        float_list = b"\x12" + bytes([len(floats)]) + floats  # Feature.float_list = 2
        entry = b"\x0a\x01f" + b"\x12" + bytes([len(float_list)]) + float_list
        features = b"\x0a" + bytes([len(entry)]) + entry
        writer.write(b"\x0a" + bytes([len(features)]) + features)
    first, second = read_columns(path, ["f", "i", "absent"])
    np.testing.assert_array_equal(first["f"], np.array([1.5, -2.0, np.inf], np.float32))
    np.testing.assert_array_equal(first["i"], np.array([-3, 2**40], np.int64))
    np.testing.assert_array_equal(second["f"], np.array([0.25, 4.0], np.float32))
    assert "absent" not in first and "i" not in second


def test_truncated_and_garbled_files_are_named(tmp_path) -> None:
    example = tf.train.Example()
    example.features.feature["f"].float_list.value.extend(range(100))
    path = tmp_path / "cut.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(example.SerializeToString())
    whole = path.read_bytes()
    path.write_bytes(whole[:-50])
    with pytest.raises(OSError, match=r"cut\.tfrecord: truncated TFRecord file \(record 0 declares"):
        list(read_columns(path, ["f"]))
    garbled = tmp_path / "garbled.tfrecord"
    with tf.io.TFRecordWriter(str(garbled)) as writer:
        writer.write(b"\x0a\xff\xff\xff\x0f not an example")
    with pytest.raises(ValueError, match=r"garbled\.tfrecord: record 0 is not a tf\.train\.Example"):
        list(read_columns(garbled, ["f"]))


def test_statistics_name_the_episode_with_nan_actions_or_states(tmp_path) -> None:
    from datasets.sample import build_sample_dataset

    path = build_sample_dataset(tmp_path, num_episodes=4, steps=5, image_size=16, num_shards=1)
    shard = next(path.glob("*.tfrecord-*"))
    records = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(shard))]
    records[2].features.feature["steps/action"].float_list.value[3] = float("nan")
    records[1].features.feature["steps/observation/state"].float_list.value[0] = float("inf")
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for record in records:
            writer.write(record.SerializeToString())
    names = [r.features.feature["episode_metadata/file_path"].bytes_list.value[0].decode() for r in records]
    with pytest.raises(ValueError, match=f"episode {names[1]} holds NaN or inf values of observation/state"):
        compute_statistics(RLDSSource(name="sample", data_dir=str(tmp_path)), 7)
    with pytest.raises(ValueError, match=f"episode {names[2]} holds NaN or inf values of action"):
        compute_statistics(RLDSSource(name="sample", data_dir=str(tmp_path), state_key=None), 7)
