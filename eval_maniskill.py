"""Evaluate a policy in ManiSkill3 through the policy server:
`python eval_maniskill.py ckpt=<dir> prompt="push the cube to the goal region" env_id=PushCube-v1 num_episodes=10`.
Writes episodes.jsonl, results.json (success rate with its 95% Wilson interval), videos/ and images/ in the run dir;
prints `results: <run dir>/results.json` as its last line."""

from __future__ import annotations

import contextlib
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


def camera_resolution(image_size: int | None, robot: dict, metadata: dict) -> int | None:
    """The camera's px: `image_size` when given, else as trained: the robot config's camera_size (a checkpoint's
    records its dataset's), else the server's camera_size, else the model's image size."""
    return image_size or robot.get("camera_size") or metadata.get("camera_size") or metadata.get("image_size")


@hydra.main(version_base="1.3", config_path="conf", config_name="eval_maniskill")
def main(cfg: DictConfig) -> float:
    from websockets.exceptions import InvalidStatus

    from serving import PolicyServer, ServerThread, wait_for_server
    from sim import EvalSettings, PolicyClient, check_task, evaluate, make_vector_env, resolve_prompt, task_kwargs

    if not cfg.ckpt and not cfg.server:
        raise SystemExit("eval_maniskill.py: pass ckpt=<checkpoint dir> (served here) or server=<host:port>")
    try:
        check_task(cfg.env_id)
        prompt = resolve_prompt(cfg.env_id, cfg.prompt)
        env_kwargs = task_kwargs(cfg.env_id, prompt, OmegaConf.to_container(cfg.env_kwargs))
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"eval_maniskill.py: env_id: {error}") from None
    ckpt_cfg = None
    if cfg.ckpt:
        from models import load_config

        try:
            ckpt_cfg = load_config(cfg.ckpt)
        except FileNotFoundError as error:
            raise SystemExit(f"eval_maniskill.py: ckpt: {error}") from None
    robot = cfg.get("robot") or (ckpt_cfg.get("robot") if ckpt_cfg is not None else None)
    if robot is None:
        raise SystemExit("eval_maniskill.py: no robot config: pass robot=<name> (conf/robot) or a ckpt that has one")
    control_mode, camera = cfg.control_mode or robot.control_mode, cfg.camera or robot.camera
    out_dir = Path(HydraConfig.get().runtime.output_dir)

    with contextlib.ExitStack() as stack:
        if cfg.server:
            if any(value is not None for value in cfg.sampling.values()):
                raise SystemExit("eval_maniskill.py: sampling.* applies to the ckpt= server only; set it on serve.py")
            if cfg.unnorm_key is not None:
                raise SystemExit(
                    "eval_maniskill.py: unnorm_key applies to the ckpt= server only; a running server un-normalizes "
                    "with its own (set it on serve.py; its metadata says which)"
                )
            address = str(cfg.server).split("://", 1)[-1].rstrip("/")  # ws://host:port as openpi's clients write it
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise SystemExit(f"eval_maniskill.py: server must be host:port, got {cfg.server!r}")
            port = int(port)
        else:
            from models import load_policy

            try:
                policy = load_policy(
                    cfg.ckpt,
                    device=cfg.device,
                    unnorm_key=cfg.unnorm_key,
                    sampling=OmegaConf.to_container(cfg.sampling),
                    dtype=cfg.dtype,
                )
            except ValueError as error:
                raise SystemExit(f"eval_maniskill.py: {error}") from None
            server = PolicyServer(
                policy, robot.observation_keys, unnorm_key=cfg.unnorm_key or ckpt_cfg.get("unnorm_key")
            )
            running = stack.enter_context(ServerThread(server))
            host, port = running.host, running.port
        try:
            wait_for_server(host, port, timeout=cfg.server_timeout)
        except TimeoutError as error:
            raise SystemExit(f"eval_maniskill.py: {error}") from None
        clients = []  # one connection per env, each env's episodes take turns on it
        for _ in range(cfg.workers):
            try:
                clients.append(PolicyClient(host, port, cfg.api_key, cfg.reconnect.attempts, cfg.reconnect.timeout_s))
            except InvalidStatus as error:  # 401: no or a wrong api_key
                raise SystemExit(
                    f"eval_maniskill.py: the server at {host}:{port} refused the connection: {error} "
                    "(a server started with an api_key wants the same api_key= here, or POLICY_API_KEY)"
                ) from None
            stack.callback(clients[-1].close)
        metadata = clients[0].metadata
        image_size = camera_resolution(cfg.image_size, robot, metadata)
        if not image_size:
            raise SystemExit("eval_maniskill.py: the server's metadata has no image_size; pass image_size=<pixels>")
        # null: 4 actions of each chunk, or the whole chunk of a policy that predicts fewer (OpenVLA-style: one).
        # A server that ensembles replies with one action ([1, 7]: its reply_horizon), already blended.
        horizon = metadata.get("reply_horizon", metadata.get("action_horizon"))
        if cfg.ensemble.enabled and horizon == 1 and metadata.get("action_horizon", 1) > 1:
            raise SystemExit(
                "eval_maniskill.py: the server already ensembles (it replies with one blended action); "
                "ensemble.enabled=true would blend its replies a second time: leave it off"
            )
        execute_steps = cfg.execute_steps if cfg.execute_steps is not None else min(4, horizon or 4)
        if not cfg.ensemble.enabled and horizon is not None and execute_steps > horizon:
            raise SystemExit(
                f"eval_maniskill.py: execute_steps={execute_steps} exceeds the {horizon} actions the server replies "
                "with (its metadata's reply_horizon, else action_horizon)"
            )
        # The wrist camera is rendered for a policy that reads it (its metadata says so), as the robot names it.
        wrist_camera = None
        if metadata.get("wrist_image"):
            wrist_camera = robot.get("wrist_camera")
            if not wrist_camera or not (robot.get("observation_keys") or {}).get("wrist_image"):
                raise SystemExit(
                    "eval_maniskill.py: the policy reads the wrist camera; the robot config needs wrist_camera "
                    "(e.g. hand_camera) and observation_keys.wrist_image"
                )
        envs = make_vector_env(
            cfg.env_id,
            control_mode,
            image_size,
            camera,
            cfg.max_steps,
            cfg.workers,
            wrist_camera=wrist_camera,
            **env_kwargs,
        )
        stack.callback(envs.close)
        settings = EvalSettings(
            num_episodes=cfg.num_episodes,
            seed=cfg.seed,
            max_steps=cfg.max_steps,
            execute_steps=execute_steps,
            prompt=prompt,
            ensemble_horizon=cfg.ensemble.horizon if cfg.ensemble.enabled else None,
            ensemble_alpha=cfg.ensemble.alpha,
            save_images=cfg.save_images,
            save_videos=cfg.save_videos,
        )
        summary = {
            "ckpt": cfg.ckpt,
            "server": cfg.server or f"in-process on {host}:{port}",
            "server_metadata": metadata,
            "robot": OmegaConf.to_container(robot, resolve=True),
            "env_id": cfg.env_id,
            "env_kwargs": env_kwargs,
            "prompt": prompt or "per episode (the task's get_language_instruction())",
            "control_mode": control_mode,
            "camera": camera,
            "wrist_camera": wrist_camera,
            "image_size": image_size,
            "max_steps": cfg.max_steps,
            "execute_steps": 1 if cfg.ensemble.enabled else execute_steps,
            "ensemble": OmegaConf.to_container(cfg.ensemble),
            "num_episodes": cfg.num_episodes,
            "seed": cfg.seed,
            "workers": cfg.workers,
        }
        results = evaluate(envs, clients, robot, settings, out_dir, summary)
    low, high = results["success_rate_ci95"]
    print(
        f"success rate {results['success_rate']:.3f} (95% CI {low:.3f}-{high:.3f}) over {results['num_episodes']} "
        f"episodes, {results['episodes_with_errors']} with errors"
    )
    print(f"results: {out_dir / 'results.json'}", flush=True)
    return results["success_rate"]


if __name__ == "__main__":
    main()
