"""Read RLDS datasets (TFDS layout) from local directories and turn them into training frames with plain tf.data.

Pipeline (train): serialized episodes from the shards of this rank's slice (files in a new order every pass) ->
parse only the used columns (images stay JPEG bytes) -> action chunks of the model's window on the whole episode ->
keep a random 1/episode_reads of its frames -> shuffle those groups -> interleave many of them -> bounded frame
shuffle of *encoded* frames -> weighted mixture -> crop, resize, colour jitter -> batches of numpy -> torch.
Validation reads held-out episodes in order, every frame, no augmentation; a model trained with augmentation sees
the central crop of the same area instead, as it does at inference (`center_crop`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
import torch
from tqdm import tqdm

from datasets.atomic import write_json_atomic
from datasets.crop import CROP_AREA, check_roi
from datasets.statistics import normalize, summarize
from datasets.tfrecord_columns import read_columns
from datasets.transforms import get_action_transform

tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds data; the accelerator belongs to torch.


@dataclass
class RLDSSource:
    """One RLDS dataset and how its keys map onto the canonical frame. Defaults follow OpenVLA's LIBERO schema.

    Keys are paths inside a step ("observation/image"). `action_mask[i]` false keeps dim i un-normalized
    (default: every dim but the last, the gripper). `aux_key`: a float feature (e.g. "observation/object_pos", the
    task objects' positions) that frames carry as "aux", normalized like the state, the target of a model's auxiliary
    loss (model.aux_dim); its statistics are stored under "aux".
    """

    name: str
    data_dir: str
    version: str | None = None
    weight: float = 1.0
    image_key: str = "observation/image"
    wrist_image_key: str | None = None
    state_key: str | None = "observation/state"
    action_key: str = "action"
    language_key: str = "language_instruction"
    aux_key: str | None = None
    action_transform: str | None = None
    action_mask: list[bool] | None = None
    unnorm_key: str | None = None

    @property
    def key(self) -> str:
        """The dataset's key in dataset_statistics.json."""
        return self.unnorm_key or self.name

    @property
    def path(self) -> Path:
        """<data_dir>/<name>/<version>; the newest version when none is set."""
        root = Path(self.data_dir).expanduser() / self.name
        if not root.is_dir():
            hint = ""
            if root.parent.name == "modified_libero_rlds":  # OpenVLA's LIBERO release (README: Data)
                hint = (
                    "; download OpenVLA's LIBERO release: hf download openvla/modified_libero_rlds "
                    f"--repo-type dataset --local-dir {root.parent}"
                )
            raise FileNotFoundError(f"RLDS dataset {self.name!r} not found: {root} does not exist{hint}")
        if self.version:
            path = root / self.version
        else:
            versions = sorted((p for p in root.iterdir() if (p / "dataset_info.json").is_file()), key=_version_key)
            if not versions:
                raise FileNotFoundError(f"{root} holds no TFDS version dir (<version>/dataset_info.json)")
            path = versions[-1]
        if not (path / "dataset_info.json").is_file():
            raise FileNotFoundError(f"{path} is not a TFDS dataset dir: dataset_info.json is missing")
        return path


def _version_key(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in path.name.split("."))


@dataclass
class LoaderConfig:
    """How frames are made. Sizes come from the model (image_size, window) and the robot (action_dim)."""

    image_size: int = 224
    window: int = 16
    action_dim: int = 7
    batch_size: int = 32
    val_fraction: float = 0.05
    episode_reads: int = 8
    episode_shuffle_buffer: int = 64
    interleave_episodes: int = 32
    frame_shuffle_buffer: int = 4_000
    augment: bool = True
    use_wrist_image: bool = False
    use_state: bool = True  # frames carry the source's state (state_key) / aux target (aux_key): false for a model
    use_aux: bool = True  #   that reads none (train.py follows model.proprio_dim / aux_dim), so mixed sizes may mix
    image_roi: Sequence[float] | None = None  # [top, left, height, width] fractions of the external camera's image
    num_parallel_calls: int = -1
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_roi = check_roi(self.image_roi)


# What each key of an RLDSSource must name: an image (encoded frames), numbers, or text.
KEY_KINDS = {
    "image_key": ("image", "bytes"),
    "wrist_image_key": ("image", "bytes"),
    "state_key": ("vector",),
    "action_key": ("vector",),
    "aux_key": ("vector",),
    "language_key": ("text", "bytes"),
}


def open_builder(source: RLDSSource, action_dim: int | None = None) -> tfds.core.DatasetBuilder:
    """The TFDS builder of a source, with its configured keys (and action size) checked against its features."""
    path = source.path
    try:
        builder = tfds.builder_from_directory(str(path))
    except Exception as e:  # tfds raises several types for a broken dir
        raise ValueError(f"{path} is not a readable TFDS dataset: {e}") from e
    step_features = builder.info.features["steps"].feature
    available = sorted(_flatten_keys(step_features))
    for field_name, expected in KEY_KINDS.items():
        key = getattr(source, field_name)
        if key is None:
            continue
        if key not in available:
            raise KeyError(f"{source.name}: {field_name}={key!r} is not a step feature of {path}; it has {available}")
        found = _feature_kind(_get(step_features, key))
        if found not in expected:
            candidates = [k for k in available if _feature_kind(_get(step_features, k)) in expected]
            raise ValueError(
                f"{source.name}: {field_name}={key!r} is a {found} feature of {path}, expected "
                f"{' or '.join(expected)} (its features of that kind: {candidates})"
            )
    action_shape = _get(step_features, source.action_key).shape
    if action_dim is not None and tuple(action_shape) != (action_dim,):
        raise ValueError(
            f"{source.name}: {source.action_key} has shape {tuple(action_shape)} in {path}, "
            f"but the robot config says action_dim={action_dim}"
        )
    if builder.info.splits.total_num_examples == 0:
        raise ValueError(f"{path}: the dataset holds no episodes")
    return builder


def _feature_kind(feature) -> str:
    """What a tfds step feature holds: an image, text, bytes (a string tensor: encoded frames or text), or a vector
    (numbers)."""
    if isinstance(feature, tfds.features.Image):
        return "image"
    if isinstance(feature, tfds.features.Text):
        return "text"
    return "bytes" if np.dtype(feature.np_dtype) == np.object_ else "vector"


def image_side(builder: tfds.core.DatasetBuilder, image_key: str) -> int | None:
    """The longer side in px of a dataset's (external camera) images, from its TFDS features (`open_builder`); None
    when the features leave it open."""
    shape = _get(builder.info.features["steps"].feature, image_key).shape
    return None if None in shape[:2] else int(max(shape[:2]))


def _flatten_keys(features, prefix: str = "") -> list[str]:
    keys = []
    for name, feature in features.items():
        if isinstance(feature, tfds.features.FeaturesDict):
            keys += _flatten_keys(feature, f"{prefix}{name}/")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def find_corrupt_shards(path: Path) -> list[str]:
    """Names of the tfrecord files under path that cannot be read to the end."""
    corrupt = []
    for file in sorted(path.glob("*tfrecord*")):
        try:
            for _ in tf.data.TFRecordDataset(str(file)):
                pass
        except tf.errors.DataLossError:
            corrupt.append(file.name)
    return corrupt


def _raise_data_loss(sources: list[RLDSSource], error: Exception) -> None:
    for source in sources:
        corrupt = find_corrupt_shards(source.path)
        if corrupt:
            raise OSError(f"{source.path}: truncated or corrupt tfrecord file(s) {corrupt}; rebuild them") from error
    raise error


def _get(tree, key: str):
    """tree["a"]["b"] for key "a/b": a step's tensors, or a step's tfds features."""
    for part in key.split("/"):
        tree = tree[part]
    return tree


def _columns(builder: tfds.core.DatasetBuilder, columns: dict[str, str]) -> tuple[dict, dict]:
    """How to parse step features straight out of a serialized episode (tfds flattens each step feature `a/b` into one
    list `steps/a/b` over the episode): {name: (example key, RaggedFeature)} and {name: values per step} (0 for
    scalars such as an encoded image or an instruction)."""
    steps = builder.info.features["steps"]
    spec, width = {}, {}
    for name, key in columns.items():
        feature = _get(steps, key)
        if isinstance(feature, tfds.features.Image) or feature.np_dtype == np.object_:
            spec[name], width[name] = (f"steps/{key}", tf.io.RaggedFeature(tf.string)), 0
        else:
            dtype = tf.float32 if np.dtype(feature.np_dtype).kind == "f" else tf.int64
            spec[name], width[name] = (f"steps/{key}", tf.io.RaggedFeature(dtype)), int(np.prod(feature.shape))
    return spec, width


def _episodes(
    builder: tfds.core.DatasetBuilder, source: RLDSSource, cfg: LoaderConfig, split: str, shuffle: bool, seed: int
) -> tuple[tf.data.Dataset, Callable]:
    """The serialized episodes of a split (a tfds split string or even split) as (episode_index, record), and the
    function that parses one into {"steps": {key path: [T, ...]}, "episode_index"} holding only the step features
    frames are made of (the wrist camera only when used). The tfrecord files are read directly, an episode is parsed
    where its frames are cut (no buffer holds it whole) and only those columns are parsed out of it, so an unused
    camera is never even copied; with `shuffle` the file order is reshuffled every pass. (tfds's own reader,
    as_dataset, buffers whole episodes of every camera per file: ~0.2 GB more on a LIBERO-like set.)"""
    keys = [source.image_key, source.action_key, source.language_key, source.state_key, source.aux_key]
    if cfg.use_wrist_image:
        keys.append(source.wrist_image_key)
    spec, width = _columns(builder, {key: key for key in keys if key})
    # An episode's index: its position in the train split (shard by shard), the same whatever rank or pass reads it.
    train = builder.info.splits["train"]
    first_index = {
        Path(file).name: int(offset)
        for file, offset in zip(train.filepaths, np.cumsum([0, *train.shard_lengths[:-1]]), strict=True)
    }
    files, skips, takes, starts = [], [], [], []
    for instruction in builder.info.splits[split].file_instructions:
        files.append(str(instruction.filename))
        skips.append(instruction.skip)
        starts.append(first_index[Path(instruction.filename).name] + instruction.skip)
        take = instruction.take
        takes.append(instruction.examples_in_shard - instruction.skip if take is None or take < 0 else take)
    if not files:
        raise ValueError(
            f"{source.name}: split {split} of {source.path} holds no episodes (too few episodes for this many "
            "processes or this validation fraction?)"
        )
    slices = tf.data.Dataset.from_tensor_slices(
        (files, tf.constant(skips, tf.int64), tf.constant(takes, tf.int64), tf.constant(starts, tf.int64))
    )
    if shuffle:
        slices = slices.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)

    def read(file: tf.Tensor, skip: tf.Tensor, take: tf.Tensor, start: tf.Tensor) -> tf.data.Dataset:
        return tf.data.TFRecordDataset(file).skip(skip).take(take).enumerate(start)

    # Files read side by side a record at a time: episode order mixes across shards before the episode shuffle.
    records = slices.interleave(read, cycle_length=min(len(files), 8) if shuffle else 1)

    def parse(index: tf.Tensor, record: tf.Tensor) -> dict:
        parsed = tf.io.parse_single_example(record, {key: feature for key, feature in spec.values()})
        kept: dict = {}
        for key, (example_key, _) in spec.items():
            column = parsed[example_key]  # one example: a flat list over the episode's steps
            if width[key]:
                column = tf.reshape(tf.cast(column, tf.float32), [-1, width[key]])
            *parents, leaf = key.split("/")
            node = kept
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = column
        return {"steps": kept, "episode_index": index}

    return records, parse


def _actions(source: RLDSSource, steps: dict, action_dim: int) -> tf.Tensor:
    action = tf.cast(_get(steps, source.action_key), tf.float32)
    action = get_action_transform(source.action_transform)(action)
    tf.debugging.assert_equal(
        tf.shape(action)[-1], action_dim, message=f"{source.name}: action size differs from the robot's action_dim"
    )
    return action


def action_mask(source: RLDSSource, action_dim: int) -> list[bool]:
    mask = list(source.action_mask) if source.action_mask is not None else [True] * (action_dim - 1) + [False]
    if len(mask) != action_dim:
        raise ValueError(f"{source.name}: action_mask has {len(mask)} entries, the actions have {action_dim} dims")
    return mask


# ----------------------------------------------------------------------------------------------------------- statistics


_EPISODE_NAME = "episode_metadata/file_path"


def _named_errors(source: RLDSSource, records: Iterator[dict]) -> Iterator[dict]:
    """records, with a truncated or garbled shard's error prefixed by the dataset's path."""
    try:
        yield from records
    except OSError as e:
        raise OSError(f"{source.path}: {e}") from e
    except ValueError as e:
        raise ValueError(f"{source.path}: {e}") from e


def dataset_fingerprint(source: RLDSSource) -> str:
    """Hash of the dataset's files (names, sizes, modification times, dataset_info.json) and of what shapes the
    statistics. The time is what tells a rebuilt dataset from the old one: new action values of the same byte size
    (a flipped gripper, a rescaled dx) keep every name and size."""
    path = source.path
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file():
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    digest.update((path / "dataset_info.json").read_bytes())
    digest.update(
        json.dumps(
            [source.action_key, source.state_key, source.action_transform, source.action_mask]
            + ([source.aux_key] if source.aux_key else [])
        ).encode()
    )
    return digest.hexdigest()[:16]


def _statistics_keys(source: RLDSSource) -> dict[str, str]:
    """The step features statistics are computed over: {"action", and "state" / "aux" where the source has them}."""
    optional = {"state": source.state_key, "aux": source.aux_key}
    return {"action": source.action_key, **{name: key for name, key in optional.items() if key}}


def _statistics_columns(source: RLDSSource, action_dim: int) -> tuple[dict[str, np.ndarray], int]:
    """Every step's action (transformed), state and aux of a dataset, [N, D] each, and its episode count."""
    builder = open_builder(source, action_dim)
    columns = _statistics_keys(source)
    _, width = _columns(builder, columns)
    keys = {name: f"steps/{key}" for name, key in columns.items()}
    found: dict[str, list[np.ndarray]] = {name: [] for name in columns}
    count = 0
    with tqdm(total=builder.info.splits["train"].num_examples, desc=f"statistics {source.name}", unit="episode") as bar:
        for file in builder.info.splits["train"].filepaths:
            for index, record in enumerate(_named_errors(source, read_columns(file, [*keys.values(), _EPISODE_NAME]))):
                names = record.get(_EPISODE_NAME) or [f"record {index} of {Path(file).name}"]
                episode = names[0].decode() if isinstance(names[0], bytes) else names[0]
                for name, key in keys.items():
                    values = np.asarray(record.get(key, []), np.float32)
                    if key not in record or len(values) % width[name]:
                        raise ValueError(
                            f"{source.path}: episode {episode} has {len(values)} values of {key}, expected a "
                            f"multiple of {width[name]} (one [{width[name]}] per step)"
                        )
                    if not np.isfinite(values).all():  # one NaN would make every frame's normalized input NaN
                        hint = " (a model that reads no state: state_key null)" if name == "state" else ""
                        raise ValueError(
                            f"{source.path}: episode {episode} holds NaN or inf values of {columns[name]}{hint}"
                        )
                    found[name].append(values.reshape(-1, width[name]))
                count += 1
                bar.update(1)
    if not count:
        raise ValueError(f"{source.path}: the dataset holds no episodes")
    arrays = {name: np.concatenate(values) for name, values in found.items()}
    # Transforms treat each step alone, so one call covers every episode.
    arrays["action"] = np.asarray(get_action_transform(source.action_transform)(tf.constant(arrays["action"])))
    return arrays, count


def _check_poolable(sources: list[RLDSSource], action_dim: int) -> None:
    """Datasets that share one statistics entry must agree on what it describes: the action mask, which of state and
    aux they have, and each one's width. Read from the datasets' feature specs, before any episode is."""
    if len(sources) < 2:
        return
    first, *others = sources
    widths = [_columns(open_builder(s, action_dim), _statistics_keys(s))[1] for s in sources]
    mask = action_mask(first, action_dim)
    for other, width in zip(others, widths[1:], strict=True):
        problems = []
        if action_mask(other, action_dim) != mask:
            problems.append(f"differ in action_mask ({mask} vs {action_mask(other, action_dim)})")
        problems += [
            f"differ in {name}_key set ({name in widths[0]} vs {name in width})"
            for name in ("state", "aux")
            if (name in widths[0]) != (name in width)
        ]
        problems += [
            f"their {name} has {widths[0][name]} and {width[name]} dims"
            for name in sorted(widths[0].keys() & width.keys())
            if widths[0][name] != width[name]
        ]
        if problems:
            raise ValueError(
                f"datasets {first.name!r} and {other.name!r} share the statistics key {first.key!r} but "
                f"{'; '.join(problems)}: one normalization cannot describe both; expected the same, or different "
                "unnorm_key values"
            )


def compute_statistics(
    source: RLDSSource | list[RLDSSource], action_dim: int, cache_dir: str | Path | None = None
) -> dict:
    """One statistics entry for a dataset, or pooled over several datasets that share one unnorm_key (their steps
    taken together, as if one dataset). One pass over every episode that reads only the action, state and aux lists
    of each record (datasets.tfrecord_columns: the image bytes are never read). Cached by `dataset_fingerprint`."""
    sources = [source] if isinstance(source, RLDSSource) else list(source)
    _check_poolable(sources, action_dim)
    cache_file = None
    if cache_dir is not None:
        fingerprints = [dataset_fingerprint(s) for s in sources]
        fingerprint = (
            fingerprints[0] if len(sources) == 1 else hashlib.sha256("".join(fingerprints).encode()).hexdigest()[:16]
        )
        stem = sources[0].name if len(sources) == 1 else f"{sources[0].key}-pooled"
        cache_file = Path(cache_dir).expanduser() / f"{stem}-{fingerprint}.json"
        if cache_file.is_file():
            return json.loads(cache_file.read_text())
    parts = [_statistics_columns(s, action_dim) for s in sources]
    arrays = {name: np.concatenate([columns[name] for columns, _ in parts]) for name in parts[0][0]}
    entry = {"action": {**summarize(arrays["action"]), "mask": action_mask(sources[0], action_dim)}}
    if "state" in arrays:
        entry["proprio"] = summarize(arrays["state"])
    if "aux" in arrays:
        entry["aux"] = summarize(arrays["aux"])
    entry["num_transitions"] = len(arrays["action"])
    entry["num_trajectories"] = sum(count for _, count in parts)
    if cache_file is not None:
        write_json_atomic(cache_file, entry)
    return entry


# --------------------------------------------------------------------------------------------------------------- frames


def _bounds_q99(stats: dict, mask: np.ndarray):
    """In-graph twin of datasets.statistics.normalize (BOUNDS_Q99, min == max -> 0, unmasked dims untouched)."""
    q01 = tf.constant(stats["q01"], tf.float32)
    q99 = tf.constant(stats["q99"], tf.float32)
    constant = tf.constant(np.asarray(stats["min"]) == np.asarray(stats["max"]))
    tf_mask = tf.constant(mask)

    def normalize_tf(x: tf.Tensor) -> tf.Tensor:
        normed = tf.clip_by_value(2 * (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
        return tf.where(tf_mask, tf.where(constant, 0.0, normed), x)

    return normalize_tf


def _frames(source: RLDSSource, stats: dict, cfg: LoaderConfig, index: int):
    """Returns a function episode -> its frames as tensors [T, ...], each with its action chunk [window, A] and pad
    mask."""
    mask = np.asarray(action_mask(source, cfg.action_dim))
    action_stats = stats["action"]
    normalize_action = _bounds_q99(action_stats, mask)
    tf_mask = tf.constant(mask)
    # Past the episode end: no motion (the normalized value of a raw zero) on normalized dims, last value elsewhere.
    pad_value = tf.constant(normalize(np.zeros(cfg.action_dim), {**action_stats, "mask": mask}))
    inputs = _optional_inputs(source, stats, cfg)
    normalize_state = None
    if "state" in inputs:
        normalize_state = _bounds_q99(stats["proprio"], np.ones(len(stats["proprio"]["q01"]), bool))
    normalize_aux = None
    if "aux" in inputs:
        if "aux" not in stats:
            raise ValueError(
                f"{source.name}: aux_key={source.aux_key!r} is set but its statistics have no 'aux' entry; "
                "recompute them (delete the cached statistics of this dataset)"
            )
        normalize_aux = _bounds_q99(stats["aux"], np.ones(len(stats["aux"]["q01"]), bool))

    def to_frames(episode: dict) -> dict:
        steps = episode["steps"]
        action = normalize_action(_actions(source, steps, cfg.action_dim))
        length = tf.shape(action)[0]
        index_grid = tf.range(length)[:, None] + tf.range(cfg.window)[None, :]  # [T, W]
        pad_mask = index_grid < length
        chunks = tf.gather(action, tf.minimum(index_grid, length - 1))  # [T, W, A]
        chunks = tf.where(pad_mask[..., None] | ~tf_mask, chunks, pad_value)
        frame = {
            "image": _get(steps, source.image_key),
            "prompt": _get(steps, source.language_key),
            "action": chunks,
            "action_pad_mask": pad_mask,
            "dataset_index": tf.fill([length], index),
            "frame_index": tf.range(length),
            "episode_index": tf.fill([length], episode["episode_index"]),
        }
        if "wrist_image" in inputs:
            frame["wrist_image"] = _get(steps, source.wrist_image_key)
        if normalize_state is not None:
            frame["state"] = normalize_state(tf.cast(_get(steps, source.state_key), tf.float32))
        if normalize_aux is not None:
            frame["aux"] = normalize_aux(tf.cast(_get(steps, source.aux_key), tf.float32))
        return frame

    return to_frames


def _optional_inputs(source: RLDSSource, stats: dict, cfg: LoaderConfig) -> list[str]:
    """The optional frame keys a source's frames carry (as `_frames` makes them)."""
    carried = {
        "wrist_image": bool(cfg.use_wrist_image and source.wrist_image_key),
        "state": bool(cfg.use_state and source.state_key and "proprio" in stats),
        "aux": bool(cfg.use_aux and source.aux_key),
    }
    return [key for key, present in carried.items() if present]


def _check_same_inputs(sources: list[RLDSSource], statistics: dict, cfg: LoaderConfig) -> None:
    """Mixed sources must carry the same optional inputs, of the same sizes: a batch cannot hold a state for some
    frames only, nor states of 5 and 8 values."""

    def described(source: RLDSSource) -> tuple[str, ...]:
        stats = statistics[source.key]
        sizes = {"state": len(stats.get("proprio", {}).get("q01", [])), "aux": len(stats.get("aux", {}).get("q01", []))}
        return tuple(f"{key}[{sizes[key]}]" if key in sizes else key for key in _optional_inputs(source, stats, cfg))

    carried = [(source.key, described(source)) for source in sources]
    if len({keys for _, keys in carried}) > 1:
        listing = "; ".join(f"{name}: {', '.join(keys) or 'none'}" for name, keys in carried)
        raise ValueError(
            f"the dataset's sources carry different optional inputs ({listing}); expected the same for every source: "
            "set state_key / aux_key / wrist_image_key on all of them or on none, of one size (state also needs "
            "'proprio' statistics); a model that reads no state (model.proprio_dim null) ignores state_key"
        )


def _derived_seed(*parts) -> int:
    """A seed of its own for each random stream (the streams stay independent of each other)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def _subsample(reads: int, to_frames: Callable):
    """(episode, seed [2]) -> a random ceil(T / reads) of its T frames (`to_frames`), in time order. Every read of an
    episode takes such a share, so over `reads` passes each frame is drawn once in expectation."""

    def subsample(episode: dict, seed: tf.Tensor) -> dict:
        frames = to_frames(episode)
        length = tf.shape(frames["frame_index"])[0]
        keep = tf.sort(tf.argsort(tf.random.stateless_uniform([length], seed))[: (length + reads - 1) // reads])
        return {key: tf.gather(value, keep) for key, value in frames.items()}

    return subsample


def _decode(cfg: LoaderConfig, train: bool):
    size, roi = cfg.image_size, cfg.image_roi

    def decode_image(encoded: tf.Tensor, seed: tf.Tensor, roi: tuple | None = None) -> tf.Tensor:
        image = tf.io.decode_jpeg(encoded, channels=3)
        if roi is not None:
            image = _roi_crop(image, roi)
        augment = train and cfg.augment
        if augment:
            seeds = tf.random.experimental.stateless_split(seed, 5)
            image = _random_crop(image, seeds[0])  # still uint8: the crop copies a quarter of the bytes of a float one
        elif cfg.augment:
            image = _center_crop(image)  # held-out frames see what inference sees
        image = tf.image.resize(image, [size, size], method="bilinear") / 255  # the one resampling: float [0, 1]
        if augment:
            image = _jitter_colors(image, seeds[1:])  # at the model's resolution (as OpenVLA does)
        return tf.cast(tf.clip_by_value(image, 0, 1) * 255 + 0.5, tf.uint8)

    def decode(frame: dict, seed: tf.Tensor) -> dict:
        frame = dict(frame)
        frame["image"] = decode_image(frame["image"], seed, roi)  # the region of interest: external camera only
        if "wrist_image" in frame:
            frame["wrist_image"] = decode_image(frame["wrist_image"], seed[::-1])
        return frame

    return decode


# OpenVLA's augmentation recipe, split in two: random resized crop (area 0.9, of the image's aspect ratio: square on
# OpenVLA's square images; a non-square image is squashed to the square afterwards, as it is whole) on the decoded
# image, then
# brightness 0.2, contrast and saturation 0.8-1.2, hue 0.05 on the resized one. Stateless ops: the same frame seed gives
# the same augmentation whatever thread runs it, so a resumed run sees exactly the images an uninterrupted one would.


def _crop_shape(image: tf.Tensor) -> tf.Tensor:
    """[height, width] of the crop of CROP_AREA of the image's area (`datasets.crop.crop_shape`)."""
    return tf.cast(tf.cast(tf.shape(image)[:2], tf.float32) * CROP_AREA**0.5, tf.int32)


def _roi_crop(image: tf.Tensor, roi: tuple[float, float, float, float]) -> tf.Tensor:
    """The image's region of interest (`datasets.crop.roi_box`, which serving applies at inference)."""
    size = tf.shape(image)[:2]

    def span(start: float, length: float, side: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        def pixels(fraction: float) -> tf.Tensor:
            return tf.cast(tf.round(tf.constant(fraction, tf.float32) * tf.cast(side, tf.float32)), tf.int32)

        first = tf.minimum(pixels(start), side - 1)
        return first, tf.minimum(tf.maximum(1, pixels(length)), side - first)

    (top, height), (left, width) = span(roi[0], roi[2], size[0]), span(roi[1], roi[3], size[1])
    return image[top : top + height, left : left + width]


def _random_crop(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """A random crop of CROP_AREA of the image's area, of its aspect ratio. image: [H, W, 3]; seed: int64 [2]."""
    crop = _crop_shape(image)
    return tf.image.stateless_random_crop(image, [crop[0], crop[1], 3], seed=seed)


def _center_crop(image: tf.Tensor) -> tf.Tensor:
    """The central crop of CROP_AREA of the image's area (`serving.observation.center_crop` at inference)."""
    shape, crop = tf.shape(image), _crop_shape(image)
    top, left = (shape[0] - crop[0]) // 2, (shape[1] - crop[1]) // 2
    return image[top : top + crop[0], left : left + crop[1]]


def _jitter_colors(image: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
    """image: float [H, W, 3] in [0, 1]; seeds: int64 [4, 2]."""
    image = tf.image.stateless_random_brightness(image, 0.2, seed=seeds[0])
    image = tf.image.stateless_random_contrast(image, 0.8, 1.2, seed=seeds[1])
    image = tf.image.stateless_random_saturation(image, 0.8, 1.2, seed=seeds[2])
    image = tf.image.stateless_random_hue(image, 0.05, seed=seeds[3])
    return tf.clip_by_value(image, 0, 1)


def split_name(split: str, val_fraction: float) -> str:
    """The TFDS split of "train" / "val": held-out episodes are the last `val_fraction` of the train split."""
    percent = round(100 * (1 - val_fraction))
    if split == "train":
        return "train" if val_fraction <= 0 else f"train[:{percent}%]"
    return f"train[{percent}%:]"


def count_episodes(source: RLDSSource, split: str, val_fraction: float) -> int:
    return open_builder(source).info.splits[split_name(split, val_fraction)].num_examples


def make_frame_dataset(
    sources: list[RLDSSource],
    statistics: dict,
    cfg: LoaderConfig,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    skip_frames: int = 0,
) -> tf.data.Dataset:
    """Batched frames. split "train" repeats forever (shuffled, augmented); "val" is one ordered pass (whole episodes,
    one of each source in turn).

    The held-out episodes are the last `val_fraction` of each dataset's train split (deterministic). Under a
    multi-process launch each rank reads its own slice of episodes. The pipeline is deterministic given the seed, so
    `skip_frames` (frames already consumed, skipped while still encoded) resumes exactly where a run stopped; with
    `episode_reads` > 1 that replays (reads and parses) that many times more episodes than whole-episode reads.
    """
    train = split == "train"
    if cfg.episode_reads < 1:
        raise ValueError(
            f"loader.episode_reads must be at least 1 (1 = every frame of a read), got {cfg.episode_reads}"
        )
    _check_same_inputs(sources, statistics, cfg)
    tfds_split = split_name(split, cfg.val_fraction)
    parallel = cfg.num_parallel_calls if cfg.num_parallel_calls > 0 else tf.data.AUTOTUNE
    per_source = []
    for index, source in enumerate(sources):
        builder = open_builder(source, cfg.action_dim)
        split_for_rank = tfds.even_splits(tfds_split, n=world_size, drop_remainder=False)[rank]
        records, parse = _episodes(builder, source, cfg, split_for_rank, shuffle=train, seed=cfg.seed + index)
        to_frames = _frames(source, statistics[source.key], cfg, index)
        if train:
            # Each read of an episode keeps a random 1/episode_reads of its frames (chunked on the whole episode
            # first), so the buffers below hold that share of each episode and draw from that many times more.
            seeds = tf.data.Dataset.random(seed=_derived_seed(cfg.seed, "episode reads", index, rank)).batch(2)
            groups = tf.data.Dataset.zip(records.repeat(), seeds).map(
                _subsample(
                    cfg.episode_reads, lambda record, parse=parse, to_frames=to_frames: to_frames(parse(*record))
                ),
                num_parallel_calls=parallel,
            )
            groups = groups.shuffle(cfg.episode_shuffle_buffer, seed=cfg.seed + index)
            frames = groups.interleave(tf.data.Dataset.from_tensor_slices, cycle_length=cfg.interleave_episodes)
        else:  # whole episodes, in order; the sources' episodes alternate below
            frames = records.map(
                lambda index, record, parse=parse, to_frames=to_frames: to_frames(parse(index, record))
            )
        per_source.append(frames)
    if train:
        weights = np.asarray([s.weight for s in sources], np.float64)
        frames = (
            per_source[0]
            if len(per_source) == 1
            else tf.data.Dataset.sample_from_datasets(
                per_source, weights=(weights / weights.sum()).tolist(), seed=cfg.seed
            )
        )
        frames = frames.shuffle(cfg.frame_shuffle_buffer, seed=cfg.seed)
    else:
        # One episode of each source in turn (a source that runs out is skipped), so that the first validation
        # batches hold every source's episodes, not only the first source's.
        episodes = tf.data.Dataset.choose_from_datasets(
            per_source, tf.data.Dataset.range(len(per_source)).repeat(), stop_on_empty_dataset=False
        )
        frames = episodes.flat_map(tf.data.Dataset.from_tensor_slices)
    seeds = tf.data.Dataset.random(seed=cfg.seed + 7919 * rank).batch(2)  # one augmentation seed per frame
    frames = tf.data.Dataset.zip(frames, seeds).skip(skip_frames)
    frames = frames.map(_decode(cfg, train), num_parallel_calls=parallel)
    options = tf.data.Options()
    options.deterministic = True
    return frames.batch(cfg.batch_size, drop_remainder=train).prefetch(2).with_options(options)


def iterate_torch(dataset: tf.data.Dataset, sources: list[RLDSSource] | None = None) -> Iterator[dict]:
    """Numpy batches from tf.data as torch tensors (images stay uint8; prompts become str). With `sources`, a
    truncated tfrecord is reported by file name."""
    iterator = dataset.as_numpy_iterator()
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.DataLossError as e:
            _raise_data_loss(sources or [], e)
        out = {key: torch.from_numpy(np.array(value)) for key, value in batch.items() if key != "prompt"}
        out["prompt"] = [p.decode("utf-8") for p in batch["prompt"]]
        yield out


def sources_from_config(dataset_cfg: dict) -> list[RLDSSource]:
    """The RLDSSource list of a `dataset` config group; builds the dataset first when it has a `generate` recipe and
    is not on disk yet."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    entries = dataset_cfg.get("sources") or []
    if not entries:
        raise ValueError("dataset config has no `sources`: expected a list of {name, data_dir, ...}")
    sources = []
    for entry in entries:
        fields = OmegaConf.to_container(entry, resolve=True) if OmegaConf.is_config(entry) else dict(entry)
        try:
            sources.append(RLDSSource(**fields))  # plain lists and dicts (a ListConfig action_mask is not JSON)
        except TypeError as e:
            raise ValueError(f"dataset source {fields} has an unknown field: {e}") from e
    generate = dataset_cfg.get("generate")
    if generate is not None and not (Path(sources[0].data_dir).expanduser() / sources[0].name).is_dir():
        print(f"dataset: generating {sources[0].name} in {sources[0].data_dir}", flush=True)
        instantiate(generate)
    return sources


def balance_by_size(sources: list[RLDSSource], action_dim: int, cache_dir: str | Path | None) -> list[RLDSSource]:
    """The sources with each weight multiplied by its number of transitions (OpenVLA's and CogACT's
    `balance_weights`): every frame of the mixture is then drawn about equally often, whatever its dataset's size."""
    sizes = [compute_statistics(source, action_dim, cache_dir)["num_transitions"] for source in sources]
    return [replace(source, weight=source.weight * size) for source, size in zip(sources, sizes, strict=True)]


def compute_all_statistics(sources: list[RLDSSource], action_dim: int, cache_dir: str | Path | None) -> dict:
    """dataset_statistics.json content for a mixture: one entry per unnorm_key, pooled over the sources that share
    it (e.g. one dataset per task, sampled with equal weights, normalized as one)."""
    groups: dict[str, list[RLDSSource]] = {}
    for source in sources:
        groups.setdefault(source.key, []).append(source)
    return {key: compute_statistics(group, action_dim, cache_dir) for key, group in groups.items()}
