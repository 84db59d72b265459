"""Policy-server latency and throughput with the real openpi client, each client in its own process.

    .venv/bin/python -m benchmarks.serve_latency               # the full table (a few minutes on 2 cores)
    .venv/bin/python -m benchmarks.serve_latency --quick       # fewer requests

Scenarios, every request a 224 px uint8 image and a prompt:
  - no-op policy (server overhead alone) and cogact_tiny (random weights), 1, 4 and 16 concurrent clients: p50/p99
    round trip and requests/s; cogact_tiny with the default batching (max_wait_ms=5), with no wait (max_wait_ms=0)
    and one request at a time (max_batch_size=1, workers=1), so the batching gain shows;
  - a slow request (3 s inference) from one client while a second client measures /healthz, a new connection's
    metadata, and its own (fast) inference, with one and with two inference workers;
  - failed requests over every scenario (target: none).
Writes benchmarks/results/serve_latency.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
KEYS = {"image": "image", "wrist_image": None, "state": None, "prompt": "prompt"}
SLOW_S = 3.0
LEAD_S = 0.1  # the slow request's head start in the slow-inference scenario (> the default max_wait_ms)


def _policy(kind: str):
    from models.policy import Policy

    class Instant(Policy):
        """No computation: zeros for every observation (server overhead alone); the prompt "slow" takes SLOW_S."""

        def __init__(self) -> None:
            super().__init__()
            self.action_dim, self.action_horizon, self.image_size = 7, 16, 224

        def predict_action_batch(self, observations: list) -> np.ndarray:
            if any(o.prompt == "slow" for o in observations):
                time.sleep(SLOW_S)  # the slow inference this scenario is about
            return np.zeros((len(observations), self.action_horizon, self.action_dim), np.float32)

    if kind in ("noop", "slow"):
        return Instant()
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from datasets.statistics import summarize

    torch.manual_seed(0)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model=cogact_tiny"])
    policy = instantiate(cfg.model).eval()
    values = np.random.default_rng(0).uniform(-1, 1, (100, 7))
    policy.set_statistics({"bench": {"action": {**summarize(values), "mask": [True] * 7}}})
    return policy


def _serve(kind: str, options: dict, port_out, stop) -> None:
    """Server process: the policy behind a PolicyServer on a free loopback port until `stop` is set."""
    from serving import PolicyServer, ServerThread

    with ServerThread(PolicyServer(_policy(kind), KEYS, **options)) as running:
        port_out.put(running.port)
        stop.wait()


def _client(port: int, requests: int, prompt: str, start, out) -> None:
    """Client process: a few warm-up requests, then `requests` timed ones once every client is ready."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    client = WebsocketClientPolicy("127.0.0.1", port)
    for _ in range(3):
        client.infer({"image": image, "prompt": prompt})
    start.wait()
    latencies, failures, began = [], 0, time.perf_counter()
    for _ in range(requests):
        sent = time.perf_counter()
        try:
            reply = client.infer({"image": image, "prompt": prompt})
            failures += reply.get("status") != "success"
        except Exception:
            failures += 1
        latencies.append((time.perf_counter() - sent) * 1000)
    out.put({"latencies": latencies, "failures": failures, "began": began, "ended": time.perf_counter()})


class Server:
    def __init__(self, kind: str, **options: object) -> None:
        ctx = mp.get_context("spawn")
        port, self.stop = ctx.Queue(), ctx.Event()
        self.process = ctx.Process(target=_serve, args=(kind, options, port, self.stop), daemon=True)
        self.process.start()
        self.port = port.get(timeout=300)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.process.join(30)


def load(port: int, clients: int, requests: int) -> dict:
    """`clients` client processes sending `requests` each at once: latency percentiles and throughput."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(clients + 1), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(port, requests, "push the cube", start, out)) for _ in range(clients)]
    for proc in procs:
        proc.start()
    start.wait()
    results = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(30)
    latencies = np.concatenate([r["latencies"] for r in results])
    wall = max(r["ended"] for r in results) - min(r["began"] for r in results)
    return {
        "clients": clients,
        "requests": len(latencies),
        "failures": sum(r["failures"] for r in results),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "requests_per_s": len(latencies) / wall,
    }


def slow_inference(workers: int) -> dict:
    """What a second client sees while the first one's inference takes SLOW_S seconds: /healthz, a new connection's
    metadata and the second client's own inference, measured over and over from LEAD_S after the slow request was
    sent until its reply arrives (worst case and median reported)."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    image = np.zeros((224, 224, 3), np.uint8)
    samples: dict[str, list[float]] = {"healthz_ms": [], "new_connection_ms": [], "other_client_infer_ms": []}
    failures = 0
    with Server("slow", workers=workers) as server:
        slow = WebsocketClientPolicy("127.0.0.1", server.port)
        other = WebsocketClientPolicy("127.0.0.1", server.port)
        other.infer({"image": image, "prompt": "fast"})
        replies: list[dict] = []
        thread = threading.Thread(target=lambda: replies.append(slow.infer({"image": image, "prompt": "slow"})))
        thread.start()
        # Measure what arrives while the slow request computes: a request sent within max_wait_ms of it would join
        # its batch by design (and get its reply with it), which is batching, not a stall.
        time.sleep(LEAD_S)
        while thread.is_alive():
            t = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=30) as response:
                failures += response.status != 200
            samples["healthz_ms"].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            probe = WebsocketClientPolicy("127.0.0.1", server.port)
            probe.get_server_metadata()
            probe._ws.close()  # the client has no close(); an open idle connection would hold every batch's wait
            samples["new_connection_ms"].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            failures += other.infer({"image": image, "prompt": "fast"})["status"] != "success"
            samples["other_client_infer_ms"].append((time.perf_counter() - t) * 1000)
        thread.join()
        failures += len(replies) != 1
    row: dict = {"workers": workers, "samples": len(samples["healthz_ms"]), "failures": failures}
    for name, values in samples.items():
        row[f"{name}_max"], row[f"{name}_p50"] = max(values), float(np.median(values))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests per client")
    args = parser.parse_args()
    noop_requests = {1: 2000, 4: 1000, 16: 440} if not args.quick else {1: 200, 4: 100, 16: 20}
    tiny_requests = {1: 40, 4: 20, 16: 10} if not args.quick else {1: 5, 4: 3, 16: 2}

    rows = []
    with Server("noop") as server:
        for clients, requests in noop_requests.items():
            rows.append({"policy": "no-op", "batching": "on", **load(server.port, clients, requests)})
            print(rows[-1], flush=True)
    for batching, options in (
        ("on", {}),
        ("on, no wait", {"max_wait_ms": 0}),
        ("off", {"max_batch_size": 1, "workers": 1}),
    ):
        with Server("tiny", **options) as server:
            for clients, requests in tiny_requests.items():
                rows.append({"policy": "cogact_tiny", "batching": batching, **load(server.port, clients, requests)})
                print(rows[-1], flush=True)
    slow = [slow_inference(workers) for workers in (1, 2)]
    for row in slow:
        print(row, flush=True)

    def throughput(batching: str) -> float:
        (row,) = [r for r in rows if r["policy"] == "cogact_tiny" and r["batching"] == batching and r["clients"] == 16]
        return row["requests_per_s"]

    summary = {
        "noop_p50_ms_1_client": rows[0]["p50_ms"],
        "tiny_16_clients_batched_over_serial": throughput("on") / throughput("off"),
        "tiny_16_clients_batched_no_wait_over_serial": throughput("on, no wait") / throughput("off"),
        "requests": sum(r["requests"] for r in rows),
        "failures": sum(r["failures"] for r in rows) + sum(r["failures"] for r in slow),
    }
    print(f"\n{'policy':<13}{'batching':>15}{'clients':>8}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}")
    for r in rows:
        print(
            f"{r['policy']:<13}{r['batching']:>15}{r['clients']:>8}{r['requests']:>9}{r['p50_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{r['requests_per_s']:>9.1f}"
        )
    print(f"\nduring a {SLOW_S:g} s inference of another client:")
    for r in slow:
        print(
            f"  workers={r['workers']} ({r['samples']} samples, worst / median): /healthz {r['healthz_ms_max']:.1f} / "
            f"{r['healthz_ms_p50']:.1f} ms, new connection {r['new_connection_ms_max']:.1f} / "
            f"{r['new_connection_ms_p50']:.1f} ms, the other client's inference {r['other_client_infer_ms_max']:.1f} / "
            f"{r['other_client_infer_ms_p50']:.1f} ms"
        )
    print(json.dumps(summary, indent=2))
    from models.checkpoint import git_revision

    out = REPO / "benchmarks" / "results" / f"serve_latency{'_quick' if args.quick else ''}.json"
    machine = {"cpus": mp.cpu_count(), "processor": platform.processor() or platform.machine()}
    meta = {"date": datetime.now(UTC).isoformat(), "git_revision": git_revision(), "machine": machine}
    out.write_text(json.dumps({**meta, "summary": summary, "load": rows, "slow_inference": slow}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
