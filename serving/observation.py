"""Client message -> canonical `Observation`: key mapping (robot.observation_keys), validation, the region of interest
of models trained on one (loader.image_roi), resizing to the model's square, and the central crop for models trained
on random crops: the geometry of training (datasets.crop), so that a frame looks as it did in training.

A robot config maps each canonical name (image, wrist_image, state, prompt) to the key its clients send, or to null
when they do not send it. `image` and `prompt` are required; `wrist_image` and `state` are read when present.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from datasets.crop import center_crop_box, resize_square, roi_box
from models.policy import Observation, Policy

REQUIRED = ("image", "prompt")
# Up to this shrink factor the server resamples bilinearly when it does not know the dataset's resolution (a
# checkpoint without robot.camera_size); beyond it, it averages (datasets.crop.resize_square).
LOADER_BILINEAR_FACTOR = 2.0
MAX_PROMPT_CHARS = 2000  # an instruction is a sentence; a longer one only holds a worker (and may overflow the LLM)
OPTIONAL = ("wrist_image", "state")
_FORMS = {
    "image": "uint8 [H, W, 3] (or float in [0, 1])",
    "wrist_image": "uint8 [H, W, 3] (or float in [0, 1])",
    "state": "float [S]",
    "prompt": "str",
}


class ObservationError(ValueError):
    """The client's message does not have the expected form; the text is meant for the client."""


def required_fields(state_dim: int | None, wrist: bool = False) -> tuple[str, ...]:
    """The canonical names a client must send: REQUIRED, the wrist image to a model that reads it, and the state
    to a model that reads one."""
    return (*REQUIRED, *(("wrist_image",) if wrist else ()), *(("state",) if state_dim else ()))


_EXAMPLE_KEYS = {
    "image": "observation/image",
    "prompt": "prompt",
    "wrist_image": "observation/wrist_image",
    "state": "observation/state",
}


def check_observation_keys(observation_keys: Mapping[str, str | None], policy: Policy) -> None:
    """Every field a client must send to this policy (required_fields) has the client's key for it in
    robot.observation_keys: ValueError naming the first that has none. The server checks it at start, train.py
    before the first step."""
    for name in required_fields(policy.proprio_dim, policy.reads_wrist_image):
        if not observation_keys.get(name):
            why = {"state": f"model.proprio_dim={policy.proprio_dim}", "wrist_image": "model.wrist_image=true"}
            raise ValueError(
                f"{why.get(name, f'the {name} is required')} but robot.observation_keys.{name} is null: name the key "
                f"clients send it under, e.g. robot.observation_keys.{name}={_EXAMPLE_KEYS[name]}; "
                f"got {dict(observation_keys)}"
            )


def expected_form(observation_keys: Mapping[str, str | None], state_dim: int | None = None, wrist: bool = False) -> str:
    """The message a client must send, e.g. '{"image": uint8 [H, W, 3] (or float in [0, 1]), "prompt": str}'."""
    required = required_fields(state_dim, wrist)
    forms = {**_FORMS, "state": f"float [{state_dim}]"} if state_dim else _FORMS

    def fields(names: tuple[str, ...]) -> str:
        return ", ".join(f'"{observation_keys[n]}": {forms[n]}' for n in names if observation_keys.get(n))

    optional = fields(tuple(n for n in OPTIONAL if n not in required))
    return "{" + fields(required) + "}" + (f" (optional: {optional})" if optional else "")


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} {list(value.shape)}"
    return type(value).__name__


def _image(
    value: object,
    field: str,
    size: int,
    crop: bool,
    roi: Sequence[float] | None = None,
    stored_size: int | None = None,
) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.ndim != 3 or value.shape[2] != 3 or 0 in value.shape:
        raise ObservationError(f'"{field}" must be an image {_FORMS["image"]}, got {_describe(value)}')
    if value.dtype == np.uint8:
        given = list(value.shape)
        # The path of a training frame: stored by the RLDS builder at the dataset's resolution (area-averaged down
        # to it), cropped (the region of interest, then the central crop of a model trained on random crops, both
        # fractions of the image), then resampled once, bilinearly, to the model's square by the loader.
        if stored_size and max(value.shape[:2]) > stored_size:
            value = resize_square(value, stored_size)
        if roi is not None:
            top, left, height, width = roi_box(value.shape[0], value.shape[1], roi)
            value = value[top : top + height, left : left + width]
        if crop:
            top, left, height, width = center_crop_box(value.shape[0], value.shape[1])
            value = value[top : top + height, left : left + width]
        if 0 in value.shape[:2]:
            raise ObservationError(
                f'"{field}" of shape {given} is too small for the crop this model was trained with: nothing of it is '
                "left; send the camera image, at least a few px a side"
            )
        return resize_square(value, size, max_bilinear_factor=math.inf if stored_size else LOADER_BILINEAR_FACTOR)
    if value.dtype.kind != "f":
        raise ObservationError(f'"{field}" must be uint8 or float in [0, 1], got {value.dtype}')
    if not np.isfinite(value).all():
        raise ObservationError(f'"{field}" contains NaN or inf')
    low, high = float(value.min()), float(value.max())
    if low < 0 or high > 1:
        raise ObservationError(f'"{field}" is float, so it must lie in [0, 1]; got values in [{low:g}, {high:g}]')
    return _image(np.round(value * 255).astype(np.uint8), field, size, crop, roi, stored_size)


def _state(value: object, field: str, size: int | None) -> np.ndarray:
    try:
        state = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise ObservationError(f'"{field}" must be {_FORMS["state"]}, got {_describe(value)}') from None
    if state.ndim != 1:
        raise ObservationError(f'"{field}" must be {_FORMS["state"]}, got shape {list(state.shape)}')
    if size is not None and len(state) != size:
        raise ObservationError(
            f'"{field}" must hold the {size} values of the robot state the model reads, got {len(state)}'
        )
    if not np.isfinite(state).all():
        raise ObservationError(f'"{field}" contains NaN or inf')
    return state


def adapt_observation(
    message: Mapping,
    observation_keys: Mapping[str, str | None],
    image_size: int,
    crop: bool = False,
    roi: Sequence[float] | None = None,
    state_dim: int | None = None,
    stored_size: int | None = None,
    wrist: bool = False,
) -> Observation:
    """Validate a decoded client message and build the canonical observation (images at image_size px square; with
    crop, the central crop a model trained on random crops expects; with roi, the external image's region of interest
    first, as in training). state_dim: the state size of a model that reads one; the state is then required.
    stored_size: px of the dataset's frames (the longer side; robot.camera_size of a checkpoint), to resample the
    external image as its training frames were. wrist: the model reads the wrist camera; its image is then required."""
    required = required_fields(state_dim, wrist)
    missing = [observation_keys[n] for n in required if observation_keys.get(n) and observation_keys[n] not in message]
    if missing:
        raise ObservationError(f"missing {', '.join(repr(k) for k in missing)}")
    prompt_key = observation_keys["prompt"]
    prompt = message[prompt_key]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ObservationError(f'"{prompt_key}" must be a non-empty str, got {_describe(prompt)}')
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ObservationError(
            f'"{prompt_key}" has {len(prompt)} characters, over the {MAX_PROMPT_CHARS} an instruction may have '
            "(it would hold a policy worker, and could overflow the LLM's context)"
        )

    def optional(name: str) -> object | None:
        key = observation_keys.get(name)
        return message.get(key) if key else None

    wrist, state = optional("wrist_image"), optional("state")
    return Observation(
        image=_image(message[observation_keys["image"]], observation_keys["image"], image_size, crop, roi, stored_size),
        prompt=prompt,
        wrist_image=None if wrist is None else _image(wrist, observation_keys["wrist_image"], image_size, crop),
        state=None if state is None else _state(state, observation_keys["state"], state_dim),
    )


def policy_observation(message: Mapping, observation_keys: Mapping[str, str | None], policy: Policy) -> Observation:
    """adapt_observation with what the policy trained on: its square, crop, region of interest, state size and
    dataset resolution."""
    return adapt_observation(
        message,
        observation_keys,
        policy.image_size,
        policy.center_crop,
        policy.image_roi,
        policy.proprio_dim,
        policy.camera_size,
        policy.reads_wrist_image,
    )
