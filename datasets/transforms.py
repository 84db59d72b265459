"""Named action standardization transforms, applied to raw action tensors [T, A]: one episode's steps when frames
are made, the steps of several episodes concatenated in the statistics pass, so a transform treats each step alone.

Datasets name one in their YAML (`action_transform: libero_gripper`); a user whose data needs something else adds a
function here with `@register_action_transform("name")`.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

ActionTransform = Callable[[tf.Tensor], tf.Tensor]
_ACTION_TRANSFORMS: dict[str, ActionTransform] = {}


def register_action_transform(name: str) -> Callable[[ActionTransform], ActionTransform]:
    def register(fn: ActionTransform) -> ActionTransform:
        if name in _ACTION_TRANSFORMS:
            raise ValueError(f"action transform {name!r} is already registered")
        _ACTION_TRANSFORMS[name] = fn
        return fn

    return register


def get_action_transform(name: str | None) -> ActionTransform:
    if name is None or name == "identity":
        return lambda action: action
    if name not in _ACTION_TRANSFORMS:
        raise KeyError(f"unknown action_transform {name!r}; registered: {['identity', *sorted(_ACTION_TRANSFORMS)]}")
    return _ACTION_TRANSFORMS[name]


@register_action_transform("libero_gripper")
def libero_gripper(action: tf.Tensor) -> tf.Tensor:
    """LIBERO (OpenVLA): gripper -1 open / +1 close -> clip to [0, 1] and invert, so that +1 = open."""
    gripper = 1.0 - tf.clip_by_value(action[:, -1:], 0.0, 1.0)
    return tf.concat([action[:, :-1], gripper], axis=-1)


@register_action_transform("gripper_signed_to_unit")
def gripper_signed_to_unit(action: tf.Tensor) -> tf.Tensor:
    """Gripper in [-1 close, +1 open] (ManiSkill's pd_ee_delta_pose) -> [0 close, 1 open]."""
    gripper = tf.clip_by_value((action[:, -1:] + 1.0) / 2.0, 0.0, 1.0)
    return tf.concat([action[:, :-1], gripper], axis=-1)
