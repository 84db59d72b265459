"""Serve a checkpoint over the openpi WebSocket protocol: `python serve.py ckpt=<dir> host=0.0.0.0 port=8000`."""

from __future__ import annotations

import errno
import socket

import hydra
from omegaconf import DictConfig, OmegaConf


def port_in_use(host: str, port: int) -> str | None:
    """Why host:port cannot be served (another server holds it), or None: checked before a model is built."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.strerror if error.errno == errno.EADDRINUSE else None
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    if not cfg.ckpt:
        raise SystemExit("serve.py: ckpt is required: python serve.py ckpt=<checkpoint dir>")
    from models import load_config, load_policy
    from models.ensemble import robot_gripper
    from serving import PolicyServer, run_server

    try:
        ckpt_cfg = load_config(cfg.ckpt)
    except FileNotFoundError as error:
        raise SystemExit(f"serve.py: ckpt: {error}") from None
    robot = cfg.get("robot") or ckpt_cfg.get("robot")
    if robot is None:
        raise SystemExit(f"serve.py: {cfg.ckpt}/config.yaml has no robot config; pass robot=<name>")
    if cfg.port and (why := port_in_use(cfg.host, cfg.port)):
        raise SystemExit(f"serve.py: {cfg.host}:{cfg.port}: {why.lower()} (another server?); pass port=<another>")

    try:
        policy = load_policy(
            cfg.ckpt,
            device=cfg.device,
            unnorm_key=cfg.unnorm_key,
            sampling=OmegaConf.to_container(cfg.sampling),
            dtype=cfg.dtype,
        )
    except ValueError as error:
        raise SystemExit(f"serve.py: {error}") from None
    # The ensembled gripper is snapped back to the robot's open or closed value, as CogACT's adapters do.
    ensemble = {"horizon": cfg.ensemble.horizon, "alpha": cfg.ensemble.alpha, "gripper": robot_gripper(robot)}
    server = PolicyServer(
        policy,
        robot.observation_keys,
        unnorm_key=cfg.unnorm_key or ckpt_cfg.get("unnorm_key"),
        api_key=cfg.api_key,
        max_batch_size=cfg.batching.max_batch_size,
        max_wait_ms=cfg.batching.max_wait_ms,
        workers=cfg.batching.workers,
        max_message_bytes=int(cfg.max_message_mb * 2**20),
        ensemble=ensemble if cfg.ensemble.enabled else None,
    )

    def on_ready(port: int) -> None:
        print(f"serving {server.metadata['model']} on ws://{cfg.host}:{port}", flush=True)

    run_server(server, cfg.host, cfg.port, on_ready)


if __name__ == "__main__":
    main()
