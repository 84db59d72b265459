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
