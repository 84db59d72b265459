"""The crop of training augmentation and its inference-time counterpart (TensorFlow-free, shared with serving).

Training with `loader.augment` takes a random square crop of CROP_AREA of each image's area (OpenVLA's recipe), so
the model learns from views zoomed by 1/sqrt(CROP_AREA). Held-out frames and inference then take the central crop of
the same area; without it every object would look 5% smaller and farther from the centre than in training.
"""

from __future__ import annotations

import numpy as np

CROP_AREA = 0.9


def crop_side(height: int, width: int) -> int:
    """Side of the square crop of CROP_AREA of an image's area (computed as the TF pipeline does, in float32)."""
    return int(np.float32(min(height, width)) * np.float32(CROP_AREA**0.5))


def center_crop_box(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the central crop."""
    side = crop_side(height, width)
    return (height - side) // 2, (width - side) // 2, side
