from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sample_rlds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small RLDS dataset written by the project's own builder: <root>/sample/1.0.0."""
    from datasets.sample import build_sample_dataset

    root = tmp_path_factory.mktemp("rlds")
    build_sample_dataset(root, num_episodes=10, steps=12, image_size=32, num_shards=2)
    return root
