"""PickObject-v1: a language-conditioned ManiSkill3 tabletop task built from primitives, so it needs no download.

Five everyday objects stand on the table in distinct colours: a red apple (sphere), a blue can (upright cylinder),
a green cube, a yellow banana (capsule) and a purple bowl (a square tray of boxes). Every reset shuffles them over six
spots of a grid (with jitter and a random yaw) and draws the target, all from the reset seed; `target="apple"` in
gym.make fixes the target instead. `get_language_instruction()` names it: "pick up the apple".
Success: the target is grasped and its origin is at least `lift_height` above where it rests on the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import sapien
import torch
from mani_skill.agents.robots.panda import Panda, PandaWristCam
from mani_skill.envs.sapien_env import BaseEnv
from mani_skill.envs.utils import randomization
from mani_skill.sensors.camera import CameraConfig
from mani_skill.utils import sapien_utils
from mani_skill.utils.building.actor_builder import ActorBuilder
from mani_skill.utils.registration import register_env
from mani_skill.utils.scene_builder.table import TableSceneBuilder
from mani_skill.utils.structs.pose import Pose

ENV_ID = "PickObject-v1"
UPRIGHT = sapien.Pose(q=[np.cos(np.pi / 4), 0, np.sin(np.pi / 4), 0])  # SAPIEN cylinders lie along x: turn to z


def _material(rgb: tuple[float, float, float]) -> sapien.render.RenderMaterial:
    return sapien.render.RenderMaterial(base_color=[*rgb, 1.0])


def _apple(builder: ActorBuilder) -> float:
    builder.add_sphere_collision(radius=0.03)
    builder.add_sphere_visual(radius=0.03, material=_material((0.8, 0.08, 0.08)))
    stem = sapien.Pose(p=[0, 0, 0.033], q=UPRIGHT.q)
    builder.add_cylinder_visual(stem, radius=0.004, half_length=0.008, material=_material((0.35, 0.2, 0.05)))
    return 0.03


def _can(builder: ActorBuilder) -> float:
    builder.add_cylinder_collision(UPRIGHT, radius=0.025, half_length=0.05)
    builder.add_cylinder_visual(UPRIGHT, radius=0.025, half_length=0.05, material=_material((0.1, 0.3, 0.85)))
    return 0.05


def _cube(builder: ActorBuilder) -> float:
    builder.add_box_collision(half_size=[0.02] * 3)
    builder.add_box_visual(half_size=[0.02] * 3, material=_material((0.1, 0.7, 0.2)))
    return 0.02


def _banana(builder: ActorBuilder) -> float:
    builder.add_capsule_collision(radius=0.018, half_length=0.045)
    builder.add_capsule_visual(radius=0.018, half_length=0.045, material=_material((0.95, 0.8, 0.1)))
    return 0.018


def _bowl(builder: ActorBuilder) -> float:
    """A square bowl 9 cm wide and 4 cm tall, its origin at the bottom; grasp it by a wall."""
    purple = _material((0.55, 0.3, 0.8))
    parts = [([0, 0, 0.004], [0.045, 0.045, 0.004])]
    for sign in (-1, 1):
        parts.append(([sign * 0.04, 0, 0.02], [0.005, 0.045, 0.02]))
        parts.append(([0, sign * 0.04, 0.02], [0.035, 0.005, 0.02]))
    for center, half_size in parts:
        builder.add_box_collision(sapien.Pose(p=center), half_size=half_size)
        builder.add_box_visual(sapien.Pose(p=center), half_size=half_size, material=purple)
    return 0.0


# name -> builder that adds the shapes and returns the height of the object's origin when it rests on the table.
OBJECTS: dict[str, Callable[[ActorBuilder], float]] = {
    "apple": _apple,
    "can": _can,
    "cube": _cube,
    "banana": _banana,
    "bowl": _bowl,
}
# Six spots 16 cm apart (objects are at most 6.4 cm from their origin, jitter 1 cm): no two objects ever touch.
SPOTS = torch.tensor([[x, y] for x in (-0.08, 0.08) for y in (-0.16, 0.0, 0.16)])
JITTER = 0.01


@register_env(ENV_ID, max_episode_steps=50)
class PickObjectEnv(BaseEnv):
    """Pick up the object named in the instruction among five on the table (see the module docstring)."""

    SUPPORTED_ROBOTS = ("panda", "panda_wristcam")
    SUPPORTED_REWARD_MODES = ("normalized_dense", "dense", "sparse", "none")
    agent: Panda | PandaWristCam
    lift_height = 0.05

    def __init__(
        self,
        *args: Any,
        robot_uids: str = "panda",
        robot_init_qpos_noise: float = 0.02,
        target: str | None = None,
        **kwargs: Any,
    ) -> None:
        if target is not None and target not in OBJECTS:
            raise ValueError(f"{ENV_ID}: target must be one of {list(OBJECTS)} or None (per episode), got {target!r}")
        self.robot_init_qpos_noise = robot_init_qpos_noise
        self.fixed_target = target
        self.object_names = list(OBJECTS)
        super().__init__(*args, robot_uids=robot_uids, **kwargs)

    @property
    def _default_sensor_configs(self) -> list[CameraConfig]:
        pose = sapien_utils.look_at(eye=[0.3, 0, 0.6], target=[-0.1, 0, 0.1])
        return [CameraConfig("base_camera", pose, 128, 128, np.pi / 2, 0.01, 100)]

    @property
    def _default_human_render_camera_configs(self) -> CameraConfig:
        pose = sapien_utils.look_at(eye=[0.6, 0.7, 0.6], target=[0.0, 0.0, 0.1])
        return CameraConfig("render_camera", pose, 512, 512, 1, 0.01, 100)

    def _load_agent(self, options: dict) -> None:
        super()._load_agent(options, sapien.Pose(p=[-0.615, 0, 0]))

    def _load_scene(self, options: dict) -> None:
        self.table_scene = TableSceneBuilder(self, robot_init_qpos_noise=self.robot_init_qpos_noise)
        self.table_scene.build()
        self.objects, rest_heights = [], []
        for (name, build), (x, y) in zip(OBJECTS.items(), SPOTS.tolist(), strict=False):
            builder = self.scene.create_actor_builder()
            rest_heights.append(build(builder))
            builder.initial_pose = sapien.Pose(p=[x, y, rest_heights[-1]])
            self.objects.append(builder.build(name=name))
        self.rest_heights = torch.tensor(rest_heights, device=self.device)
        self.target_index = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)

    def _initialize_episode(self, env_idx: torch.Tensor, options: dict) -> None:
        # Under a seeded reset ManiSkill seeds torch with the episode seed first: layout and target follow the seed.
        with torch.device(self.device):
            b = len(env_idx)
            self.table_scene.initialize(env_idx)
            spots = torch.stack([torch.randperm(len(SPOTS))[: len(self.objects)] for _ in range(b)])  # [b, N]
            for i, actor in enumerate(self.objects):
                xyz = torch.zeros((b, 3))
                xyz[:, :2] = SPOTS.to(self.device)[spots[:, i]] + (torch.rand((b, 2)) * 2 - 1) * JITTER
                xyz[:, 2] = self.rest_heights[i]
                yaw = randomization.random_quaternions(b, lock_x=True, lock_y=True)
                actor.set_pose(Pose.create_from_pq(xyz, yaw))
            if self.fixed_target is not None:
                target = torch.full((b,), self.object_names.index(self.fixed_target), dtype=torch.long)
            else:
                target = torch.randint(len(self.objects), (b,))
            self.target_index[env_idx] = target

    def get_language_instruction(self) -> list[str]:
        """One instruction per parallel env, naming its target."""
        return [f"pick up the {self.object_names[i]}" for i in self.target_index.tolist()]

    def target_names(self) -> list[str]:
        return [self.object_names[i] for i in self.target_index.tolist()]

    def _target_position(self) -> torch.Tensor:
        positions = torch.stack([actor.pose.p for actor in self.objects], dim=1)  # [b, N, 3]
        return positions[torch.arange(self.num_envs, device=self.device), self.target_index]

    def evaluate(self) -> dict:
        grasped = torch.stack([self.agent.is_grasping(actor) for actor in self.objects], dim=1)  # [b, N]
        rows = torch.arange(self.num_envs, device=self.device)
        is_grasped = grasped[rows, self.target_index]
        lift = self._target_position()[:, 2] - self.rest_heights[self.target_index]
        is_lifted = lift >= self.lift_height
        return {"success": is_grasped & is_lifted, "is_grasped": is_grasped, "is_lifted": is_lifted, "lift": lift}

    def _get_obs_extra(self, info: dict) -> dict:
        obs = dict(
            tcp_pose=self.agent.tcp_pose.raw_pose,
            target=torch.nn.functional.one_hot(self.target_index, len(self.objects)).float(),
        )
        if "state" in self.obs_mode:
            target = self._target_position()
            obs.update(target_pos=target, tcp_to_target_pos=target - self.agent.tcp_pose.p)
        return obs

    def compute_dense_reward(self, obs: Any, action: torch.Tensor, info: dict) -> torch.Tensor:
        """Reach the target (0..1), grasp it (+1), lift it (0..1 while grasped); 4 on success."""
        distance = torch.linalg.norm(self._target_position() - self.agent.tcp_pose.p, axis=1)
        lifted = torch.clamp(info["lift"] / self.lift_height, 0, 1)
        reward = 1 - torch.tanh(5 * distance) + info["is_grasped"] * (1 + lifted)
        reward[info["success"]] = 4
        return reward

    def compute_normalized_dense_reward(self, obs: Any, action: torch.Tensor, info: dict) -> torch.Tensor:
        return self.compute_dense_reward(obs=obs, action=action, info=info) / 4
