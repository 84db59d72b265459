"""ManiSkill3 environments for evaluation: CPU-rendered envs with square RGB cameras, wrapped as plain single envs
(observation: one camera image and the Panda's proprio state) that gymnasium's vector envs can run in-process or one
per worker process."""

from __future__ import annotations

import functools
import io
import re
import sys

import gymnasium as gym
import numpy as np

# Panda tabletop tasks that build and reset here on CPU without downloaded assets (tests/test_sim.py checks each),
# with the instruction an evaluation sends by default. Not here: PushT-v1 and the drawing tasks (panda_stick: no
# gripper, 6-dim actions), the TwoRobot* tasks (two arms), and tasks with YCB objects, PartNet-Mobility articulations,
# scenes or Bridge assets (downloads; make_env refuses them at once).
TASK_PROMPTS = {
    "PushCube-v1": "push the cube to the goal region",
    "PickCube-v1": "pick up the cube and move it to the goal position",
    "StackCube-v1": "stack the red cube on top of the green cube",
    "PullCube-v1": "pull the cube to the goal region",
    "LiftPegUpright-v1": "lift the peg and stand it upright",
    "PegInsertionSide-v1": "insert the peg into the hole in the box",
    "PlaceSphere-v1": "place the sphere into the bin",
    "PlugCharger-v1": "plug the charger into the receptacle",
    "PokeCube-v1": "use the peg to push the cube to the goal region",
    "PullCubeTool-v1": "use the tool to pull the cube to the goal region",
    "RollBall-v1": "push the ball so that it rolls to the goal region",
    "StackPyramid-v1": "stack the cubes into a pyramid",
    "FMBAssembly1Easy-v1": "assemble the green bridge onto the red board",
}
# Tasks that name their instruction per episode (the env's get_language_instruction()); registered by this package.
EPISODE_PROMPT_TASKS = ("PickObject-v1",)
# The Panda's wrist camera exists only on the panda_wristcam robot.
CAMERA_ROBOTS = {"hand_camera": "panda_wristcam"}


STATE_DIM = 14
STATE_GOAL, STATE_TO_GOAL = slice(8, 11), slice(11, 14)  # where panda_state puts the goal and goal - tcp
# The tcp orientation the state measures from: the Panda's gripper pointing straight down (ManiSkill's rest tcp
# quaternion, wxyz [0, 1, 0, 0]). Absolute Euler angles of that pose sit at roll = +-pi and flip sign between
# frames; measured from it they are small and continuous.
REST_TCP_QUAT_WXYZ = (0.0, 1.0, 0.0, 0.0)
# Actors of a task whose positions make the auxiliary target (object_positions): all but the static scene.
OBJECT_SLOTS = 2
STATIC_ACTORS = ("table", "ground")


def panda_state(tcp_pose: np.ndarray, qpos: np.ndarray, goal_pos: np.ndarray | None = None) -> np.ndarray:
    """The state the RLDS builder records and the evaluator sends, float32 [..., STATE_DIM]: tcp position xyz; tcp
    orientation as the extrinsic xyz Euler angles of the world-frame rotation from the rest pose (R_tcp R_rest^-1);
    the two finger joint positions; the task's goal position xyz; and the goal minus the tcp position xyz.
    tcp_pose [..., 7] is ManiSkill's raw pose (xyz + wxyz quaternion); qpos [..., 9] the arm's joints then the
    fingers; goal_pos [..., 3] is the `goal_pos` a task adds to its RGB observations because its cameras cannot see
    the goal (PickCube-v1 hides its goal marker from them). A task without one (PushCube-v1's goal region and
    StackCube-v1's target cube are in the image) gets zeros for both goal parts."""
    from scipy.spatial.transform import Rotation

    tcp_pose, qpos = np.asarray(tcp_pose, np.float64), np.asarray(qpos, np.float64)
    rest = Rotation.from_quat(np.roll(REST_TCP_QUAT_WXYZ, -1))
    rotation = Rotation.from_quat(tcp_pose[..., [4, 5, 6, 3]].reshape(-1, 4)) * rest.inv()
    euler = rotation.as_euler("xyz").reshape(*tcp_pose.shape[:-1], 3)
    position = tcp_pose[..., :3]
    if goal_pos is None:
        goal = to_goal = np.zeros_like(position)
    else:
        goal = np.broadcast_to(np.asarray(goal_pos, np.float64), position.shape)
        to_goal = goal - position
    return np.concatenate([position, euler, qpos[..., -2:], goal, to_goal], axis=-1).astype(np.float32)


def object_positions(actors: dict[str, np.ndarray]) -> np.ndarray:
    """The task objects' positions, float32 [T, 3 * OBJECT_SLOTS]: the xyz of every actor but the static scene, in
    name order (PushCube: cube, goal_region; PickCube: cube, goal_site; StackCube: cubeA, cubeB), zero-padded.
    actors: {name: [T, 13+]} ManiSkill actor states (position xyz first), e.g. a trajectory's env_states/actors. A
    training target only (the model's auxiliary loss); evaluation never needs it."""
    names = sorted(name for name in actors if not name.startswith(STATIC_ACTORS))
    if len(names) > OBJECT_SLOTS:
        raise ValueError(f"actors {names}: more than OBJECT_SLOTS={OBJECT_SLOTS} task objects")
    if not names:
        raise ValueError(f"actors {sorted(actors)}: no task object besides the static scene {STATIC_ACTORS}")
    length = len(actors[names[0]])
    out = np.zeros((length, 3 * OBJECT_SLOTS), np.float32)
    for slot, name in enumerate(names):
        out[:, 3 * slot : 3 * slot + 3] = np.asarray(actors[name])[:, :3]
    return out


def default_prompt(env_id: str) -> str:
    """The fixed instruction of a task in TASK_PROMPTS."""
    if env_id in EPISODE_PROMPT_TASKS:
        raise ValueError(f"{env_id} names its instruction per episode (get_language_instruction()), not a fixed one")
    if env_id not in TASK_PROMPTS:
        raise ValueError(f'no default prompt for {env_id}; pass prompt="..." (defaults exist for {list(TASK_PROMPTS)})')
    return TASK_PROMPTS[env_id]


def resolve_prompt(env_id: str, prompt: str | None) -> str | None:
    """The instruction every episode gets: `prompt`, else the task's default; None for a task in
    EPISODE_PROMPT_TASKS, whose episodes each bring their own."""
    if prompt:
        return prompt
    return None if env_id in EPISODE_PROMPT_TASKS else default_prompt(env_id)


def task_kwargs(env_id: str, prompt: str | None, given: dict | None = None) -> dict:
    """gym.make arguments of a task: `given` (eval_maniskill.py's env_kwargs), plus what makes it do what one fixed
    prompt asks: PickObject-v1's target becomes the object the prompt names (without it each episode draws its own
    target, and success would be judged on another object than the one asked for)."""
    given = dict(given or {})
    if env_id not in EPISODE_PROMPT_TASKS or not prompt or "target" in given:
        return given
    from sim.pick_object import OBJECTS

    named = [name for name in OBJECTS if re.search(rf"\b{name}(e?s)?\b", prompt.lower())]
    if len(named) != 1:
        raise ValueError(
            f"{env_id}: prompt={prompt!r} names {named or 'none'} of its objects {list(OBJECTS)}, expected exactly "
            "one (the target); name it with +env_kwargs.target=<object>, or leave prompt unset: each episode then "
            "names its own target"
        )
    return {**given, "target": named[0]}


def register_tasks() -> None:
    """Register ManiSkill's tasks and this package's with gymnasium (imports mani_skill: seconds)."""
    import mani_skill.envs  # noqa: F401

    import sim.pick_object  # noqa: F401


def check_task(env_id: str) -> None:
    """ValueError for an unknown env_id; RuntimeError, with the download command, for a task whose declared assets
    are missing (instead of ManiSkill's interactive download prompt)."""
    register_tasks()
    from mani_skill.utils import assets
    from mani_skill.utils.registration import REGISTERED_ENVS

    if env_id not in REGISTERED_ENVS:
        known = ", ".join([*TASK_PROMPTS, *EPISODE_PROMPT_TASKS])
        raise ValueError(f"unknown ManiSkill env_id {env_id!r}; tasks that need no download: {known}")
    missing = []
    for asset_id in REGISTERED_ENVS[env_id].asset_download_ids or []:
        sources = (
            assets.expand_data_group_into_individual_data_source_ids(asset_id)
            if asset_id in assets.DATA_GROUPS
            else [asset_id]
        )
        missing += [source for source in sources if not assets.is_data_source_downloaded(source)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise RuntimeError(_missing_assets_message(env_id, shown))


def _missing_assets_message(env_id: str, what: str) -> str:
    return (
        f"{env_id} needs assets that are not downloaded ({what}); "
        f"run `python -m mani_skill.utils.download_asset {env_id}` on a machine with network access"
    )


def make_env(
    env_id: str,
    control_mode: str,
    image_size: int,
    camera: str = "base_camera",
    max_episode_steps: int | None = None,
    obs_mode: str = "rgb",
    wrist_camera: str | None = None,
    **env_kwargs: object,
) -> gym.Env:
    """One ManiSkill env on the CPU backends whose cameras render image_size x image_size RGB; `camera` (and
    `wrist_camera` when given) must be among them (obs_mode="state": no cameras are checked). hand_camera selects
    the panda_wristcam robot. A task whose assets are missing fails at once with the command that downloads them."""
    check_task(env_id)
    wanted = [camera, *([wrist_camera] if wrist_camera else [])]
    robots = {CAMERA_ROBOTS[c] for c in wanted if c in CAMERA_ROBOTS}
    kwargs = {"robot_uids": robots.pop()} if robots else {}
    stdin, sys.stdin = sys.stdin, io.StringIO()  # an undeclared download still asks on stdin: answer EOF at once
    try:
        env = gym.make(
            env_id,
            obs_mode=obs_mode,
            control_mode=control_mode,
            sim_backend="cpu",
            render_backend="cpu",
            sensor_configs=dict(width=image_size, height=image_size),
            max_episode_steps=max_episode_steps,
            **kwargs,
            **env_kwargs,
        )
    except EOFError:
        raise RuntimeError(_missing_assets_message(env_id, "named above")) from None
    finally:
        sys.stdin = stdin
    if obs_mode != "state":
        cameras = list(env.observation_space["sensor_data"].keys())
        for name in wanted:
            if name not in cameras:
                env.close()
                raise ValueError(f"camera {name!r} is not a camera of {env_id}; choose one of {cameras}")
    return env


def camera_image(obs: dict, camera: str) -> np.ndarray:
    """uint8 [H, W, 3] from obs["sensor_data"][camera]["rgb"] (a torch tensor [1, H, W, 3])."""
    return obs["sensor_data"][camera]["rgb"][0].cpu().numpy()


class CameraEnv(gym.Wrapper):
    """A single ManiSkill env as a plain gymnasium env for the evaluator: the observation is {"image": the camera
    image uint8 [H, W, 3], "state": panda_state float32 [STATE_DIM]}, and "wrist_image" from `wrist_camera` when
    given; reward is a float, terminated/truncated are bools;
    info is {"success": bool}, and after a reset also {"prompt": str}: the episode's own instruction ("" for a task
    without one). metadata["render_fps"] is the control frequency."""

    def __init__(self, env: gym.Env, camera: str, wrist_camera: str | None = None) -> None:
        super().__init__(env)
        self.camera, self.wrist_camera = camera, wrist_camera
        size = env.observation_space["sensor_data"][camera]["rgb"].shape[-3:]
        spaces = {
            "image": gym.spaces.Box(0, 255, size, np.uint8),
            "state": gym.spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32),
        }
        if wrist_camera:
            wrist_size = env.observation_space["sensor_data"][wrist_camera]["rgb"].shape[-3:]
            spaces["wrist_image"] = gym.spaces.Box(0, 255, wrist_size, np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        self.metadata = {**env.metadata, "render_fps": env.unwrapped.control_freq}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        obs, _ = self.env.reset(seed=seed, options=options)
        instruction = getattr(self.env.unwrapped, "get_language_instruction", None)
        return self._observation(obs), {"prompt": instruction()[0] if instruction is not None else ""}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return (
            self._observation(obs),
            float(reward.item()),
            bool(terminated.item()),
            bool(truncated.item()),
            {"success": bool(info["success"].item())},
        )

    def _observation(self, obs: dict) -> dict:
        agent = self.env.unwrapped.agent
        goal = obs.get("extra", {}).get("goal_pos")
        state = panda_state(
            agent.tcp.pose.raw_pose[0].cpu().numpy(),
            agent.robot.get_qpos()[0].cpu().numpy(),
            None if goal is None else goal[0].cpu().numpy(),
        )
        observation = {"image": camera_image(obs, self.camera), "state": state}
        if self.wrist_camera:
            observation["wrist_image"] = camera_image(obs, self.wrist_camera)
        return observation


def make_eval_env(
    env_id: str,
    control_mode: str,
    image_size: int,
    camera: str,
    max_episode_steps: int | None = None,
    wrist_camera: str | None = None,
    **env_kwargs: object,
) -> CameraEnv:
    """make_env wrapped in CameraEnv; refuses an action space other than the 7-dim arm + gripper the mapping needs.

    The scene is rebuilt at every reset (reconfiguration_freq=1, about 0.25 s): PhysX keeps contact caches across
    resets, so that without it an episode of a task with compound objects (PullCubeTool's L-shaped tool,
    PickObject's bowl) can differ in the 7th digit depending on which episodes the env ran before. With it an
    episode depends only on its seed and actions, whichever worker runs it."""
    env = make_env(
        env_id,
        control_mode,
        image_size,
        camera,
        max_episode_steps,
        wrist_camera=wrist_camera,
        reconfiguration_freq=1,
        **env_kwargs,
    )
    if env.action_space.shape != (7,):
        env.close()
        raise ValueError(
            f"{env_id} with control_mode {control_mode} has actions of shape {list(env.action_space.shape)}; the "
            f"evaluator drives a 7-dim end-effector delta + gripper (pd_ee_delta_pose on a Panda with a gripper)"
        )
    return CameraEnv(env, camera, wrist_camera)


def make_vector_env(
    env_id: str,
    control_mode: str,
    image_size: int,
    camera: str,
    max_episode_steps: int | None,
    workers: int,
    wrist_camera: str | None = None,
    **env_kwargs: object,
) -> gym.vector.VectorEnv:
    """`workers` envs: one in this process (workers=1, SyncVectorEnv) or one per worker process (AsyncVectorEnv,
    spawned: SAPIEN's renderer does not survive a fork). Autoreset is off: the evaluator resets each env itself,
    with each episode's seed. AsyncVectorEnv first builds one env here for the spaces, so bad settings fail here.
    env_kwargs: the task's own gym.make arguments (task_kwargs)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    make = functools.partial(
        make_eval_env, env_id, control_mode, image_size, camera, max_episode_steps, wrist_camera, **env_kwargs
    )
    if workers == 1:
        return gym.vector.SyncVectorEnv([make], autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    return gym.vector.AsyncVectorEnv(
        [make] * workers, context="spawn", autoreset_mode=gym.vector.AutoresetMode.DISABLED
    )
