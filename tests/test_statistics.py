from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from datasets.atomic import building_dir, replace_dir, write_json_atomic
from datasets.statistics import (
    check_unnormalized_ranges,
    load_statistics,
    normalize,
    select_statistics,
    summarize,
    to_norm_stats,
    unnormalize,
)


def _stats(values: np.ndarray) -> dict:
    return {**summarize(values), "mask": [True] * (values.shape[1] - 1) + [False]}


def test_summarize_matches_numpy_definitions() -> None:
    values = np.random.default_rng(0).normal(size=(1000, 3))
    stats = summarize(values)
    np.testing.assert_allclose(stats["q01"], np.quantile(values, 0.01, axis=0))
    np.testing.assert_allclose(stats["std"], values.std(0))
    assert set(stats) == {"mean", "std", "max", "min", "q01", "q99"}


def test_normalize_formula_and_gripper_untouched() -> None:
    values = np.random.default_rng(1).uniform(-2, 3, size=(500, 4)).astype(np.float32)
    values[:, -1] = np.random.default_rng(2).integers(0, 2, 500)
    stats = _stats(values)
    normed = normalize(values, stats)
    q01, q99 = np.array(stats["q01"]), np.array(stats["q99"])
    expected = np.clip(2 * (values[:, 0] - q01[0]) / (q99[0] - q01[0] + 1e-8) - 1, -1, 1)
    np.testing.assert_allclose(normed[:, 0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(normed[:, -1], values[:, -1])
    assert normed[:, :-1].min() >= -1 and normed[:, :-1].max() <= 1


def test_constant_dims_normalize_to_zero() -> None:
    values = np.random.default_rng(3).normal(size=(100, 3)).astype(np.float32)
    values[:, 1] = 0.25
    assert np.all(normalize(values, _stats(values))[:, 1] == 0)


def test_round_trip_inside_the_quantile_range() -> None:
    rng = np.random.default_rng(4)
    values = rng.normal(size=(2000, 7)).astype(np.float32)
    values[:, -1] = rng.integers(0, 2, 2000)
    stats = _stats(values)
    inside = values[np.all((values[:, :-1] > stats["q01"][:-1]) & (values[:, :-1] < stats["q99"][:-1]), axis=1)]
    restored = unnormalize(normalize(inside, stats), stats)
    np.testing.assert_allclose(restored, inside, atol=1e-4)


def test_unnormalize_clips_and_binarizes_gripper() -> None:
    stats = {"q01": [-1.0, 0.0], "q99": [1.0, 1.0], "min": [-1.0, 0.0], "max": [1.0, 1.0], "mask": [True, False]}
    out = unnormalize(np.array([[3.0, 0.49], [-0.5, 0.5]]), stats)
    np.testing.assert_allclose(out, [[1.0, 0.0], [-0.5, 1.0]])


def test_a_normalized_gripper_is_unnormalized_not_binarized() -> None:
    """A -1 close / +1 open gripper with action_mask true comes back as -1 / +1 (binarizing it at 0.5 in the
    normalized space, then un-normalizing, served 0: half open), as check_unnormalized_ranges' advice promises."""
    values = np.array([[0.1, -1.0], [0.0, 1.0], [-0.1, -1.0], [0.05, 1.0]])
    stats = {**summarize(values), "mask": [True, True]}
    np.testing.assert_allclose(unnormalize(normalize(values, stats), stats)[:, 1], values[:, 1], atol=1e-5)


def test_select_statistics_needs_key_when_ambiguous() -> None:
    stats = {"a": {"action": {}}, "b": {"action": {}}}
    with pytest.raises(ValueError, match="unnorm_key"):
        select_statistics(stats, None)
    with pytest.raises(KeyError, match="available"):
        select_statistics(stats, "c")
    assert select_statistics({"only": {"x": 1}}, None) == ("only", {"x": 1})


def test_norm_stats_export_and_atomic_write(tmp_path) -> None:
    values = np.random.default_rng(5).normal(size=(50, 7))
    entry = {
        "action": _stats(values),
        "proprio": summarize(values[:, :3]),
        "num_transitions": 50,
        "num_trajectories": 2,
    }
    path = tmp_path / "dataset_statistics.json"
    write_json_atomic(path, {"mine": entry})
    assert load_statistics(tmp_path)["mine"]["num_transitions"] == 50
    assert [p.name for p in tmp_path.iterdir()] == ["dataset_statistics.json"]
    norm = to_norm_stats(entry)["norm_stats"]
    assert set(norm) == {"actions", "state"} and set(norm["actions"]) == {"mean", "std", "q01", "q99"}
    (tmp_path / "bad.json").write_text(json.dumps({"k": {"nothing": 1}}))
    with pytest.raises(ValueError, match=r"action\.q01"):
        load_statistics(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match=r"dataset_statistics\.json"):
        load_statistics(tmp_path / "missing")


def test_failed_write_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "stats.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]


def test_atomic_writes_are_readable_by_others_as_the_umask_allows(tmp_path) -> None:
    """mkstemp / mkdtemp make private files and dirs (0600 / 0700): a checkpoint or dataset written through them is
    still readable by another account (a serving user) when the umask is 022."""
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "stats.json", {"a": 1})
        with building_dir(tmp_path, "ckpt") as built:
            write_json_atomic(built / "meta.json", {"b": 2})
            replace_dir(built, tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "stats.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "ckpt" / "meta.json").stat().st_mode) == 0o644


def test_unnormalized_dims_must_lie_where_inference_returns_them() -> None:
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (100, 7))
    actions[:, 6] = rng.integers(0, 2, 100)  # 0 closed / 1 open
    entry = {"action": {**summarize(actions), "mask": [True] * 6 + [False]}}
    check_unnormalized_ranges({"ok": entry})
    signed = actions.copy()
    signed[:, 6] = 2 * signed[:, 6] - 1  # -1 / +1: would be served as 0 / 1
    with pytest.raises(ValueError, match=r"'signed': action dim 6 .* \[-1, 1\], outside \[0, 1\] .* gripper_signed"):
        check_unnormalized_ranges({"signed": {"action": {**summarize(signed), "mask": [True] * 6 + [False]}}})
    check_unnormalized_ranges({"normalized": {"action": {**summarize(signed), "mask": [True] * 7}}})
    wide = actions.copy()
    wide[:, 2] *= 3
    with pytest.raises(ValueError, match=r"action dim 2 .* outside \[-1, 1\] \(clipped at inference\)"):
        check_unnormalized_ranges(
            {"wide": {"action": {**summarize(wide), "mask": [True, True, False] + [True] * 3 + [False]}}}
        )
