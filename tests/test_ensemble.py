from __future__ import annotations

import numpy as np
import pytest

from models.ensemble import AdaptiveEnsembler


def test_first_call_returns_the_first_action() -> None:
    chunk = np.arange(12, dtype=float).reshape(4, 3)
    np.testing.assert_allclose(AdaptiveEnsembler(3)(chunk), chunk[0])


def test_blends_what_each_chunk_predicted_for_now() -> None:
    ensemble = AdaptiveEnsembler(horizon=2, alpha=0.0)  # alpha 0: a plain mean
    ensemble(np.array([[0.0, 0.0], [1.0, 1.0], [9.0, 9.0]]))
    out = ensemble(np.array([[3.0, 3.0], [5.0, 5.0], [9.0, 9.0]]))
    np.testing.assert_allclose(out, [2.0, 2.0])  # mean of the old chunk's step 1 and the new chunk's step 0


def test_similar_predictions_weigh_more_and_reset_forgets() -> None:
    ensemble = AdaptiveEnsembler(horizon=3, alpha=5.0)
    ensemble(np.array([[0.0, 0.0], [-1.0, 0.0]]))  # predicted "now" opposite to the newest
    out = ensemble(np.array([[1.0, 0.0], [1.0, 0.0]]))
    assert out[0] > 0.9
    ensemble.reset()
    np.testing.assert_allclose(ensemble(np.array([[2.0, 2.0]])), [2.0, 2.0])
    with pytest.raises(ValueError, match=">= 1"):
        AdaptiveEnsembler(0)


def test_the_blended_gripper_is_snapped_back_to_open_or_closed() -> None:
    """Chunks that close the gripper after three open steps: the blend of open (1) and closed (0) is a fraction, which
    a controller would take for a half-closed target; with the robot's (closed, open) it is one of the two."""
    chunks = [np.array([[0.1, 1.0 if step < 3 else 0.0]] * 4) for step in range(8)]
    blended, snapped = AdaptiveEnsembler(7, 0.1), AdaptiveEnsembler(7, 0.1, gripper=(0.0, 1.0))
    raw = np.array([blended(c)[-1] for c in chunks])
    assert ((raw > 0.05) & (raw < 0.95)).any()
    grips = np.array([snapped(c)[-1] for c in chunks])
    assert set(grips) <= {0.0, 1.0} and grips[0] == 1.0 and grips[-1] == 0.0
    np.testing.assert_array_equal(grips, np.where(raw >= 0.5, 1.0, 0.0))
    signed = AdaptiveEnsembler(2, 0.0, gripper=(-1.0, 1.0))  # a robot whose data say -1 closed
    signed(np.array([[0.0, 1.0], [0.0, 1.0]]))
    assert signed(np.array([[0.0, -1.0]]))[-1] == 1.0  # the mean of 1 and -1, halfway: the tie goes to open
    assert signed(np.array([[0.0, -1.0]]))[-1] == -1.0
    three = AdaptiveEnsembler(3, 0.0, gripper=(-1.0, 1.0))
    three(np.array([[0.0, 1.0]] * 3)), three(np.array([[0.0, -1.0]] * 2))
    assert three(np.array([[0.0, -1.0]]))[-1] == -1.0  # the mean of 1, -1, -1
    with pytest.raises(ValueError, match="must differ"):
        AdaptiveEnsembler(2, gripper=(1.0, 1.0))
