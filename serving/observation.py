"""Client message -> canonical `Observation`: key mapping (robot.observation_keys), validation, the region of interest
of models trained on one (loader.image_roi), resizing to the model's square, and the central crop for models trained
on random crops: the geometry of training (datasets.crop), so that a frame looks as it did in training.

A robot config maps each canonical name (image, wrist_image, state, prompt) to the key its clients send, or to null
when they do not send it. `image` and `prompt` are required; `wrist_image` and `state` are read when present.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from datasets.crop import center_crop_box, resize_square, roi_box
from models.policy import Observation

REQUIRED = ("image", "prompt")
OPTIONAL = ("wrist_image", "state")
_FORMS = {
    "image": "uint8 [H, W, 3] (or float in [0, 1])",
    "wrist_image": "uint8 [H, W, 3] (or float in [0, 1])",
    "state": "float [S]",
    "prompt": "str",
}


class ObservationError(ValueError):
    """The client's message does not have the expected form; the text is meant for the client."""


def expected_form(observation_keys: Mapping[str, str | None]) -> str:
    """The message a client must send, e.g. '{"image": uint8 [H, W, 3] (or float in [0, 1]), "prompt": str}'."""

    def fields(names: tuple[str, ...]) -> str:
        return ", ".join(f'"{observation_keys[n]}": {_FORMS[n]}' for n in names if observation_keys.get(n))

    optional = fields(OPTIONAL)
    return "{" + fields(REQUIRED) + "}" + (f" (optional: {optional})" if optional else "")


def center_crop(image: np.ndarray) -> np.ndarray:
    """uint8 [S, S, 3] -> the central crop of datasets.crop.CROP_AREA of its area, resized back to [S, S, 3]: what a
    model trained on random crops saw, on average."""
    height, width = image.shape[:2]
    top, left, crop_h, crop_w = center_crop_box(height, width)
    crop = np.ascontiguousarray(image[top : top + crop_h, left : left + crop_w])
    return cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} {list(value.shape)}"
    return type(value).__name__


def _image(value: object, field: str, size: int, crop: bool, roi: Sequence[float] | None = None) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.ndim != 3 or value.shape[2] != 3 or 0 in value.shape:
        raise ObservationError(f'"{field}" must be an image {_FORMS["image"]}, got {_describe(value)}')
    if value.dtype == np.uint8:
        if roi is not None:
            top, left, height, width = roi_box(value.shape[0], value.shape[1], roi)
            value = value[top : top + height, left : left + width]
        image = resize_square(value, size)
        return center_crop(image) if crop else image
    if value.dtype.kind != "f":
        raise ObservationError(f'"{field}" must be uint8 or float in [0, 1], got {value.dtype}')
    if not np.isfinite(value).all():
        raise ObservationError(f'"{field}" contains NaN or inf')
    low, high = float(value.min()), float(value.max())
    if low < 0 or high > 1:
        raise ObservationError(f'"{field}" is float, so it must lie in [0, 1]; got values in [{low:g}, {high:g}]')
    return _image(np.round(value * 255).astype(np.uint8), field, size, crop, roi)


def _state(value: object, field: str) -> np.ndarray:
    try:
        state = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise ObservationError(f'"{field}" must be {_FORMS["state"]}, got {_describe(value)}') from None
    if state.ndim != 1:
        raise ObservationError(f'"{field}" must be {_FORMS["state"]}, got shape {list(state.shape)}')
    if not np.isfinite(state).all():
        raise ObservationError(f'"{field}" contains NaN or inf')
    return state


def adapt_observation(
    message: Mapping,
    observation_keys: Mapping[str, str | None],
    image_size: int,
    crop: bool = False,
    roi: Sequence[float] | None = None,
) -> Observation:
    """Validate a decoded client message and build the canonical observation (images at image_size px square; with
    crop, the central crop a model trained on random crops expects; with roi, the external image's region of interest
    first, as in training)."""
    missing = [observation_keys[n] for n in REQUIRED if observation_keys.get(n) and observation_keys[n] not in message]
    if missing:
        raise ObservationError(f"missing {', '.join(repr(k) for k in missing)}")
    prompt_key = observation_keys["prompt"]
    prompt = message[prompt_key]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ObservationError(f'"{prompt_key}" must be a non-empty str, got {_describe(prompt)}')

    def optional(name: str) -> object | None:
        key = observation_keys.get(name)
        return message.get(key) if key else None

    wrist, state = optional("wrist_image"), optional("state")
    return Observation(
        image=_image(message[observation_keys["image"]], observation_keys["image"], image_size, crop, roi),
        prompt=prompt,
        wrist_image=None if wrist is None else _image(wrist, observation_keys["wrist_image"], image_size, crop),
        state=None if state is None else _state(state, observation_keys["state"]),
    )
