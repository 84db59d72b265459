"""The crop of training augmentation and its inference-time counterpart (TensorFlow-free, shared with serving).

Training with `loader.augment` takes a random square crop of CROP_AREA of each image's area (OpenVLA's recipe), so
the model learns from views zoomed by 1/sqrt(CROP_AREA). Held-out frames and inference then take the central crop of
the same area; without it every object would look 5% smaller and farther from the centre than in training.

`loader.image_roi` narrows the external camera's image to a region of interest (e.g. the workspace) before either
crop, in training and at inference alike, so small objects get more of the model's pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CROP_AREA = 0.9


def crop_side(height: int, width: int) -> int:
    """Side of the square crop of CROP_AREA of an image's area (computed as the TF pipeline does, in float32)."""
    return int(np.float32(min(height, width)) * np.float32(CROP_AREA**0.5))


def center_crop_box(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the central crop."""
    side = crop_side(height, width)
    return (height - side) // 2, (width - side) // 2, side


def roi_box(height: int, width: int, roi: Sequence[float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) in pixels of `loader.image_roi` = [top, left, height, width] as fractions of the
    image (computed as the TF pipeline does: float32 products, rounded half to even)."""
    top, left, box_h, box_w = (np.float32(v) for v in roi)
    size_h, size_w = np.float32(height), np.float32(width)
    return (
        int(np.round(top * size_h)),
        int(np.round(left * size_w)),
        max(1, int(np.round(box_h * size_h))),
        max(1, int(np.round(box_w * size_w))),
    )


def check_roi(roi: object) -> tuple[float, float, float, float] | None:
    """`loader.image_roi` validated: None, or [top, left, height, width] fractions of a box inside the image."""
    if roi is None:
        return None
    try:
        values = tuple(float(v) for v in roi)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        values = ()
    top, left, height, width = values if len(values) == 4 else (-1.0,) * 4
    if not (0 <= top < 1 and 0 <= left < 1 and 0 < height <= 1 - top + 1e-6 and 0 < width <= 1 - left + 1e-6):
        raise ValueError(
            f"loader.image_roi={roi!r}: expected null or [top, left, height, width] as fractions of the camera image, "
            "a box inside it (e.g. [0.33, 0.19, 0.62, 0.62])"
        )
    return values
