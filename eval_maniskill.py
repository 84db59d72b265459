"""Evaluate a policy in ManiSkill3 through the policy server:
`python eval_maniskill.py ckpt=<dir> prompt="push the cube to the goal region" env_id=PushCube-v1 num_episodes=10`.
Prints `results: <run dir>/results.json` as its last line."""

from __future__ import annotations

import contextlib
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base="1.3", config_path="conf", config_name="eval_maniskill")
def main(cfg: DictConfig) -> float:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from serving import PolicyServer, ServerThread, wait_for_server
    from sim import default_prompt, evaluate, make_env

    if not cfg.ckpt and not cfg.server:
        raise SystemExit("eval_maniskill.py: pass ckpt=<checkpoint dir> (served here) or server=<host:port>")
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
    prompt = cfg.prompt or default_prompt(cfg.env_id)
    control_mode, camera = cfg.control_mode or robot.control_mode, cfg.camera or robot.camera
    out_dir = Path(HydraConfig.get().runtime.output_dir)

    with contextlib.ExitStack() as stack:
        if cfg.server:
            host, _, port = str(cfg.server).rpartition(":")
            if not host or not port.isdigit():
                raise SystemExit(f"eval_maniskill.py: server must be host:port, got {cfg.server!r}")
            port = int(port)
        else:
            from models import load_policy

            policy = load_policy(cfg.ckpt, device=cfg.device, unnorm_key=cfg.unnorm_key)
            server = PolicyServer(
                policy, robot.observation_keys, unnorm_key=cfg.unnorm_key or ckpt_cfg.get("unnorm_key")
            )
            running = stack.enter_context(ServerThread(server))
            host, port = running.host, running.port
        wait_for_server(host, port, timeout=cfg.server_timeout)
        client = WebsocketClientPolicy(host, port, api_key=cfg.api_key)
        metadata = client.get_server_metadata()
        image_size = cfg.image_size or metadata.get("image_size")
        if not image_size:
            raise SystemExit("eval_maniskill.py: the server's metadata has no image_size; pass image_size=<pixels>")
        if cfg.execute_steps > metadata.get("action_horizon", cfg.execute_steps):
            raise SystemExit(
                f"eval_maniskill.py: execute_steps={cfg.execute_steps} exceeds the policy's action_horizon "
                f"{metadata['action_horizon']}"
            )
        env = make_env(cfg.env_id, control_mode, image_size, camera, max_episode_steps=cfg.max_steps)
        stack.callback(env.close)
        summary = {
            "ckpt": cfg.ckpt,
            "server": cfg.server or f"in-process on {host}:{port}",
            "server_metadata": metadata,
            "robot": OmegaConf.to_container(robot, resolve=True),
            "env_id": cfg.env_id,
            "prompt": prompt,
            "control_mode": control_mode,
            "camera": camera,
            "image_size": image_size,
            "max_steps": cfg.max_steps,
            "execute_steps": cfg.execute_steps,
            "num_episodes": cfg.num_episodes,
            "seed": cfg.seed,
        }
        results = evaluate(
            env,
            client,
            robot,
            prompt=prompt,
            camera=camera,
            max_steps=cfg.max_steps,
            execute_steps=cfg.execute_steps,
            num_episodes=cfg.num_episodes,
            seed=cfg.seed,
            out_dir=out_dir,
            save_images=cfg.save_images,
            summary=summary,
        )
    print(f"success rate {results['success_rate']:.3f} over {results['num_episodes']} episodes")
    print(f"results: {out_dir / 'results.json'}", flush=True)
    return results["success_rate"]


if __name__ == "__main__":
    main()
