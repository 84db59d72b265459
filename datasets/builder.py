"""Write RLDS datasets in TFDS layout (LIBERO-like schema) from users' episodes, without any network access.

    <out_dir>/<name>/<version>/{dataset_info.json, features.json, <name>-train.tfrecord-00000-of-0000N, ...}

Each step: observation/image (JPEG), optional observation/wrist_image, observation/state, optional
observation/object_pos (task objects' positions: a target for an auxiliary loss, see RLDSSource.aux_key), action,
language_instruction, reward, discount, is_first, is_last, is_terminal; episode_metadata/file_path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import naming

from datasets.atomic import building_dir, replace_dir

SPLIT_FIRST_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"


@dataclass(frozen=True)
class EpisodeSchema:
    """Shapes of one step. wrist_image_size 0 means no wrist camera; object_dim 0 no observation/object_pos."""

    image_size: int = 256
    wrist_image_size: int = 0
    state_dim: int = 8
    action_dim: int = 7
    object_dim: int = 0


def _features(schema: EpisodeSchema) -> tfds.features.FeaturesDict:
    observation = {
        "image": tfds.features.Image(shape=(schema.image_size, schema.image_size, 3), encoding_format="jpeg"),
        "state": tfds.features.Tensor(shape=(schema.state_dim,), dtype=np.float32),
    }
    if schema.wrist_image_size:
        size = schema.wrist_image_size
        observation["wrist_image"] = tfds.features.Image(shape=(size, size, 3), encoding_format="jpeg")
    if schema.object_dim:
        observation["object_pos"] = tfds.features.Tensor(shape=(schema.object_dim,), dtype=np.float32)
    step = {
        "observation": observation,
        "action": tfds.features.Tensor(shape=(schema.action_dim,), dtype=np.float32),
        "language_instruction": tfds.features.Text(),
        "reward": tfds.features.Scalar(dtype=np.float32),
        "discount": tfds.features.Scalar(dtype=np.float32),
        "is_first": tfds.features.Scalar(dtype=np.bool_),
        "is_last": tfds.features.Scalar(dtype=np.bool_),
        "is_terminal": tfds.features.Scalar(dtype=np.bool_),
    }
    return tfds.features.FeaturesDict(
        {
            "steps": tfds.features.Dataset(step),
            "episode_metadata": {"file_path": tfds.features.Text()},
        }
    )


def check_frames(images: np.ndarray, key: str, source: str) -> None:
    """Camera frames must be uint8 [T, H, W, 3] in 0-255: a float [0, 1] image cast to uint8 would be stored black,
    and a channels-first one resized into nonsense."""
    values = np.asarray(images)
    if values.ndim != 4 or values.shape[-1] != 3:
        hint = "; channels first? np.moveaxis(images, 1, -1)" if values.ndim == 4 and values.shape[1] == 3 else ""
        raise ValueError(f"{source}: {key} has shape {list(values.shape)}, expected uint8 [T, H, W, 3]{hint}")
    if values.dtype != np.uint8:
        found = f" in [{values.min():g}, {values.max():g}]" if values.size and values.dtype.kind in "fiu" else ""
        raise ValueError(
            f"{source}: {key} is {values.dtype}{found}, expected uint8 [T, H, W, 3] in 0-255 "
            "(a float image in [0, 1]: (image * 255).round().astype(np.uint8))"
        )


def _check_episode(index: int, episode: dict, schema: EpisodeSchema) -> int:
    """Validate one episode dict; returns its length T."""
    source = episode.get("file_path", f"episode {index}")
    action = np.asarray(episode["action"])
    if action.ndim != 2 or action.shape[1] != schema.action_dim:
        raise ValueError(f"{source}: action has shape {action.shape}, expected [T, {schema.action_dim}]")
    if not np.isfinite(action).all():
        raise ValueError(f"{source}: action holds NaN or inf at steps {np.where(~np.isfinite(action).all(1))[0][:5]}")
    steps = len(action)
    if steps == 0:
        raise ValueError(f"{source}: episode has no steps")
    expected = {
        "image": (steps, schema.image_size, schema.image_size, 3),
        "state": (steps, schema.state_dim),
    }
    if schema.wrist_image_size:
        expected["wrist_image"] = (steps, schema.wrist_image_size, schema.wrist_image_size, 3)
    if schema.object_dim:
        expected["object_pos"] = (steps, schema.object_dim)
    for key, shape in expected.items():
        got = np.shape(episode.get(key))
        if got != shape:
            raise ValueError(f"{source}: {key} has shape {got}, expected {shape}")
    for key in ("image", "wrist_image"):
        if key in expected:
            check_frames(episode[key], key, source)
    for key in ("state", "object_pos"):
        finite = np.isfinite(episode[key]).all(1) if key in expected else None
        if finite is not None and not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(f"{source}: {key} holds NaN or inf at steps {bad[:5].tolist()} ({len(bad)} steps)")
    if not isinstance(episode.get("language_instruction"), str):
        raise ValueError(f"{source}: language_instruction must be a string")
    return steps


def _to_rlds(index: int, episode: dict, schema: EpisodeSchema) -> dict:
    steps = _check_episode(index, episode, schema)
    reward = np.asarray(episode.get("reward", np.zeros(steps)), dtype=np.float32)
    out_steps = []
    for t in range(steps):
        observation = {"image": episode["image"][t], "state": np.asarray(episode["state"][t], np.float32)}
        if schema.wrist_image_size:
            observation["wrist_image"] = episode["wrist_image"][t]
        if schema.object_dim:
            observation["object_pos"] = np.asarray(episode["object_pos"][t], np.float32)
        out_steps.append(
            {
                "observation": observation,
                "action": np.asarray(episode["action"][t], np.float32),
                "language_instruction": episode["language_instruction"],
                "reward": reward[t],
                "discount": np.float32(1.0),
                "is_first": t == 0,
                "is_last": t == steps - 1,
                "is_terminal": t == steps - 1 and bool(episode.get("terminal", True)),
            }
        )
    return {"steps": out_steps, "episode_metadata": {"file_path": episode.get("file_path", f"episode_{index}")}}


def write_rlds(
    episodes: Iterable[dict],
    out_dir: str | Path,
    name: str,
    schema: EpisodeSchema,
    num_shards: int = 1,
    version: str = "1.0.0",
    description: str = "",
    file_template: str | None = None,
) -> Path:
    """Write episodes as an RLDS dataset; returns <out_dir>/<name>/<version>.

    An episode is a dict: image uint8 [T, H, W, 3], optional wrist_image, state float [T, S], optional object_pos
    float [T, K] (written when schema.object_dim is K), action float [T, A],
    language_instruction str, optional reward [T], file_path str. The dataset appears only once complete (built in a
    temp dir, then renamed); an existing dataset of the same name and version is replaced only after success.
    file_template: shard names, e.g. SPLIT_FIRST_TEMPLATE gives train-00000-of-00004.tfrecord; None: TFDS's default
    {DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}. Readers follow dataset_info.json's filepathTemplate either way.
    """
    out_dir = Path(out_dir)
    final = out_dir / name / version
    out_dir.mkdir(parents=True, exist_ok=True)
    features = _features(schema)
    episodes = iter(episodes)

    with tfds.core.registered.skip_registration():  # built per call; never enters TFDS's global registry

        class Builder(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version(version)

            def _info(self) -> tfds.core.DatasetInfo:
                return tfds.core.DatasetInfo(builder=self, description=description, features=features)

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _get_filename_template(self, split_name: str) -> naming.ShardedFileTemplate:
                template = super()._get_filename_template(split_name)
                return dataclasses.replace(template, template=file_template) if file_template else template

            def _generate_examples(self) -> Iterator[tuple[str, dict]]:
                for i, episode in enumerate(episodes):
                    yield f"episode_{i:06d}", _to_rlds(i, episode, schema)

    Builder.name = name
    with building_dir(out_dir, name) as tmp:
        builder = Builder(data_dir=tmp)
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False, num_shards=num_shards),
            )
        except AssertionError as e:
            if "number_of_shards" not in str(e):
                raise
            raise ValueError(f"{name}: fewer episodes than num_shards={num_shards}; write fewer shards") from e
        replace_dir(Path(tmp) / name / version, final)
    return final
