"""The image geometry training and serving share (TensorFlow-free): resizing to the square, the region of interest,
and the crop of training augmentation with its inference-time counterpart.

Training with `loader.augment` takes a random crop of CROP_AREA of each image's area (OpenVLA's recipe; of the image's
aspect ratio, so square on square images), so
the model learns from views zoomed by 1/sqrt(CROP_AREA). Held-out frames and inference then take the central crop of
the same area; without it every object would look 5% smaller and farther from the centre than in training.

`loader.image_roi` narrows the external camera's image to a region of interest (e.g. the workspace) before either
crop, in training and at inference alike, so small objects get more of the model's pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

CROP_AREA = 0.9


def crop_shape(height: int, width: int) -> tuple[int, int]:
    """(height, width) of the crop of CROP_AREA of an image's area, of the image's aspect ratio (computed as the TF
    pipeline does, in float32). Resized to the model's square afterwards, as the whole image would be."""
    scale = np.float32(CROP_AREA**0.5)
    return int(np.float32(height) * scale), int(np.float32(width) * scale)


def center_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the central crop."""
    crop_h, crop_w = crop_shape(height, width)
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def roi_box(height: int, width: int, roi: Sequence[float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) in pixels of `loader.image_roi` = [top, left, height, width] as fractions of the
    image: float32 products rounded half to even, at least one pixel, inside the image (as datasets.rlds._roi_crop)."""

    def span(start: float, length: float, size: int) -> tuple[int, int]:
        first = min(int(np.round(np.float32(start) * np.float32(size))), size - 1)
        return first, min(max(1, int(np.round(np.float32(length) * np.float32(size)))), size - first)

    (top, box_h), (left, box_w) = span(roi[0], roi[2], height), span(roi[1], roi[3], width)
    return top, left, box_h, box_w


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


def resize_square(image: np.ndarray, size: int, max_bilinear_factor: float = 1.0) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3], the aspect ratio not kept (as OpenVLA and CogACT resize theirs): how
    the RLDS builder stores frames and the server resizes clients' images, a non-square camera alike in both.
    Bilinear, unless the image is more than max_bilinear_factor times larger on its shorter side: then area-averaged
    (a bilinear kernel would alias). The builder averages any shrinking; the server resamples bilinearly up to 2x,
    as the training loader resamples a stored frame (tf.image.resize, bilinear without antialias: cv2's bilinear
    agrees within one level), so a client sending frames at the dataset's resolution gets the training pixels."""
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return np.array(image)  # a copy: arrays decoded from msgpack are read-only
    shrink = min(height, width) / size
    interpolation = cv2.INTER_AREA if shrink > max_bilinear_factor else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=interpolation)
