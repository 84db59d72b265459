"""The policy server against the real openpi client, with a fake policy."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import websockets.sync.client
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import InvalidStatus

from datasets.build_rlds import _resize
from datasets.crop import resize_square
from models.policy import Observation, Policy
from serving import ObservationError, PolicyServer, ServerThread, adapt_observation, wait_for_server

REPO = Path(__file__).resolve().parent.parent
KEYS = {"image": "image", "wrist_image": None, "state": None, "prompt": "prompt"}
LIBERO_KEYS = {
    "image": "observation/image",
    "wrist_image": "observation/wrist_image",
    "state": "observation/state",
    "prompt": "prompt",
}
WAIT_S = 10.0  # generous bound for events that should happen within milliseconds


class FakePolicy(Policy):
    """Returns `action` (default [0, 1, ..., 6]) at every step of the chunk; blocks on `gate` when given (only batches
    holding `gate_prompt` when that is set); raises when a batch holds the prompt "explode"."""

    def __init__(
        self,
        horizon: int = 4,
        image_size: int = 32,
        gate: threading.Event | None = None,
        action: np.ndarray | None = None,
        gate_prompt: str | None = None,
    ) -> None:
        super().__init__()
        self.action_dim, self.action_horizon, self.image_size = 7, horizon, image_size
        self.gate, self.gate_prompt = gate, gate_prompt
        self.action = np.arange(7, dtype=np.float32) if action is None else np.asarray(action, np.float32)
        self.entered = threading.Event()
        self.seen: list[Observation] = []
        self.batch_sizes: list[int] = []
        self.resets = 0

    def predict_action_batch(self, observations: list[Observation]) -> np.ndarray:
        self.seen.extend(observations)
        self.batch_sizes.append(len(observations))
        self.entered.set()
        if self.gate is not None and (
            self.gate_prompt is None or any(o.prompt == self.gate_prompt for o in observations)
        ):
            assert self.gate.wait(WAIT_S), "the test never opened the gate"
        if any(o.prompt == "explode" for o in observations):
            raise ValueError("the fake policy exploded")
        return np.tile(self.action, (len(observations), self.action_horizon, 1))

    def reset(self) -> None:
        self.resets += 1


def _observation(height: int = 48, width: int = 64, prompt: str = "push the cube") -> dict:
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return {"image": image, "prompt": prompt}


def _healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=WAIT_S) as response:
        return response.status


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def start(policy: Policy, **kwargs: object) -> ServerThread:
        servers.append(ServerThread(PolicyServer(policy, KEYS, **kwargs)).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_metadata_and_action_reply(start_server: Callable[..., ServerThread]) -> None:
    policy = FakePolicy()
    server = start_server(policy, unnorm_key="fake_dataset")
    client = WebsocketClientPolicy("127.0.0.1", server.port)

    metadata = client.get_server_metadata()
    assert metadata["model"] == "FakePolicy" and metadata["unnorm_key"] == "fake_dataset"
    assert (metadata["action_dim"], metadata["action_horizon"], metadata["image_size"]) == (7, 4, 32)
    assert metadata["observation_keys"] == {"image": "image", "prompt": "prompt"}
    assert metadata["required_observation_keys"] == ["image", "prompt"]

    first = client.infer(_observation())
    assert first["status"] == "success"
    assert first["actions"].dtype == np.float32 and first["actions"].shape == (4, 7)
    np.testing.assert_array_equal(first["actions"][2], np.arange(7))
    assert first["server_timing"]["infer_ms"] >= 0
    assert "prev_total_ms" in client.infer(_observation())["server_timing"]
    assert policy.seen[0].image.shape == (32, 32, 3) and policy.seen[0].prompt == "push the cube"


def test_a_policy_trained_on_a_region_of_interest_is_served_that_region(
    start_server: Callable[..., ServerThread],
) -> None:
    policy = FakePolicy()
    policy.image_roi, policy.camera_size = (0.5, 0.0, 0.5, 0.5), 64
    client = WebsocketClientPolicy("127.0.0.1", start_server(policy).port)
    metadata = client.get_server_metadata()
    assert metadata["image_roi"] == [0.5, 0.0, 0.5, 0.5] and metadata["camera_size"] == 64
    image = np.zeros((64, 64, 3), np.uint8)
    image[32:, :32] = 255  # only the bottom-left quarter, which is the region of interest, is white
    assert client.infer({"image": image, "prompt": "push the cube"})["status"] == "success"
    assert policy.seen[0].image.shape == (32, 32, 3) and (policy.seen[0].image == 255).all()


def test_healthz_answers_200(start_server: Callable[..., ServerThread]) -> None:
    assert _healthz(start_server(FakePolicy()).port) == 200


def test_reset_message(start_server: Callable[..., ServerThread]) -> None:
    policy = FakePolicy()
    client = WebsocketClientPolicy("127.0.0.1", start_server(policy).port)
    assert client.infer({"reset": True}) == {"status": "reset"}
    assert policy.resets == 1


BAD_OBSERVATIONS = {
    "missing 'prompt'": lambda obs: {"image": obs["image"]},
    "missing 'image'": lambda obs: {"prompt": obs["prompt"]},
    '"image" must be an image': lambda obs: {**obs, "image": obs["image"][..., 0]},
    "uint8 or float": lambda obs: {**obs, "image": obs["image"].astype(np.int64)},
    "NaN": lambda obs: {**obs, "image": np.full((8, 8, 3), np.nan, np.float32)},
    "must lie in [0, 1]": lambda obs: {**obs, "image": obs["image"].astype(np.float32)},
    '"prompt" must be a non-empty str': lambda obs: {**obs, "prompt": 3},
    "has 3000 characters, over the 2000": lambda obs: {**obs, "prompt": "x" * 3000},
}


def test_bad_input_gets_text_frame_and_connections_keep_serving(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(FakePolicy())
    client = WebsocketClientPolicy("127.0.0.1", server.port)
    for fragment, corrupt in BAD_OBSERVATIONS.items():
        with pytest.raises(RuntimeError) as error:
            client.infer(corrupt(_observation()))
        assert fragment in str(error.value)
        assert '{"image": uint8 [H, W, 3]' in str(error.value), "the error shows the expected form"
    assert client.infer(_observation())["actions"].shape == (4, 7)
    assert WebsocketClientPolicy("127.0.0.1", server.port).infer(_observation())["status"] == "success"


def test_an_image_the_models_crop_leaves_nothing_of_gets_a_text_frame(
    start_server: Callable[..., ServerThread],
) -> None:
    policy = FakePolicy()
    policy.center_crop = True  # trained on random crops: served the central 0.9 of the area
    client = WebsocketClientPolicy("127.0.0.1", start_server(policy).port)
    with pytest.raises(RuntimeError, match=r'"image" of shape \[1, 1, 3\] is too small for the crop'):
        client.infer(_observation(height=1, width=1))
    assert client.infer(_observation())["status"] == "success", "the same connection keeps serving"


def test_inference_error_is_reported_without_traceback(start_server: Callable[..., ServerThread]) -> None:
    client = WebsocketClientPolicy("127.0.0.1", start_server(FakePolicy()).port)
    with pytest.raises(RuntimeError, match="inference failed: ValueError: the fake policy exploded") as error:
        client.infer(_observation(prompt="explode"))
    assert "Traceback" not in str(error.value)
    assert client.infer(_observation())["status"] == "success"


def test_malformed_frames_get_text_frames(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(FakePolicy())
    with websockets.sync.client.connect(f"ws://127.0.0.1:{server.port}", compression=None, max_size=None) as ws:
        assert isinstance(ws.recv(timeout=WAIT_S), bytes)
        for frame, fragment in [
            (b"\xc1", "not msgpack-numpy"),  # 0xc1 is never used by msgpack
            ("hello", "text frame"),
            (msgpack_numpy.packb([1, 2]), "not a map"),
            (
                msgpack_numpy.packb({"image": {b"__ndarray__": True, b"data": b"", b"dtype": "|u1", b"shape": [9]}}),
                "not msgpack-numpy",
            ),
        ]:
            ws.send(frame)
            reply = ws.recv(timeout=WAIT_S)
            assert isinstance(reply, str) and fragment in reply
        ws.send(msgpack_numpy.packb(_observation()))
        assert msgpack_numpy.unpackb(ws.recv(timeout=WAIT_S))["status"] == "success"


def test_a_message_over_the_maximum_size_gets_a_text_frame(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(FakePolicy(), max_message_bytes=20_000)
    client = WebsocketClientPolicy("127.0.0.1", server.port)
    with pytest.raises(RuntimeError, match=r"has \d+ bytes, over this server's maximum of 20000"):
        client.infer(_observation(height=100, width=100))  # 30 kB of pixels
    assert client.infer(_observation())["status"] == "success", "the same connection keeps serving"


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.001)  # polling interval


def _concurrent_replies(server: ServerThread, policy: FakePolicy, gate: threading.Event, prompts: list[str]) -> list:
    """The first prompt's request blocks the policy; the others queue behind it; then the gate opens."""
    replies: list = [None] * len(prompts)

    def ask(i: int) -> None:
        try:
            replies[i] = WebsocketClientPolicy("127.0.0.1", server.port).infer(_observation(prompt=prompts[i]))
        except RuntimeError as error:
            replies[i] = error

    threads = [threading.Thread(target=ask, args=(0,))]
    threads[0].start()
    assert policy.entered.wait(WAIT_S)
    threads += [threading.Thread(target=ask, args=(i,)) for i in range(1, len(prompts))]
    for thread in threads[1:]:
        thread.start()
    _wait_until(lambda: server.server._queue.qsize() == len(prompts) - 1, "the other requests are queued")
    gate.set()
    for thread in threads:
        thread.join(WAIT_S)
    return replies


def test_requests_that_queue_during_an_inference_share_the_next_forward_pass(
    start_server: Callable[..., ServerThread],
) -> None:
    gate = threading.Event()
    policy = FakePolicy(gate=gate)
    server = start_server(policy, workers=1, max_wait_ms=0)
    replies = _concurrent_replies(server, policy, gate, ["push the cube"] * 5)
    assert policy.batch_sizes == [1, 4]
    assert sorted(r["server_timing"]["batch_size"] for r in replies) == [1, 4, 4, 4, 4]
    assert all(r["actions"].shape == (4, 7) for r in replies)

    gate = threading.Event()
    policy = FakePolicy(gate=gate)
    unbatched = start_server(policy, max_batch_size=1, workers=1)
    _concurrent_replies(unbatched, policy, gate, ["push the cube"] * 3)
    assert policy.batch_sizes == [1, 1, 1]


def test_a_lone_client_never_waits_for_a_batch_to_fill(start_server: Callable[..., ServerThread]) -> None:
    policy = FakePolicy()
    server = start_server(policy, max_wait_ms=3_600_000)  # an hour: any wait for a second request would show
    with websockets.sync.client.connect(f"ws://127.0.0.1:{server.port}", compression=None, max_size=None) as ws:
        ws.recv(timeout=WAIT_S)
        for _ in range(3):
            ws.send(msgpack_numpy.packb(_observation()))
            assert msgpack_numpy.unpackb(ws.recv(timeout=WAIT_S))["server_timing"]["batch_size"] == 1
    assert policy.batch_sizes == [1, 1, 1]


def test_a_failing_request_in_a_batch_fails_alone(start_server: Callable[..., ServerThread]) -> None:
    gate = threading.Event()
    policy = FakePolicy(gate=gate)
    server = start_server(policy, workers=1, max_wait_ms=0)
    replies = _concurrent_replies(server, policy, gate, ["push the cube", "push", "explode", "pick"])
    assert isinstance(replies[2], RuntimeError) and "the fake policy exploded" in str(replies[2])
    assert all(replies[i]["status"] == "success" for i in (0, 1, 3))
    assert policy.batch_sizes[:2] == [1, 3] and sorted(policy.batch_sizes[2:]) == [1, 1, 1]


def test_the_action_ensemble_is_kept_per_connection(start_server: Callable[..., ServerThread]) -> None:
    class Counting(FakePolicy):
        """Call n predicts the value n at every step and dimension."""

        def predict_action_batch(self, observations: list[Observation]) -> np.ndarray:
            self.action = np.full(7, len(self.batch_sizes), np.float32)
            return super().predict_action_batch(observations)

    server = start_server(Counting(), ensemble={"horizon": 4, "alpha": 0.0})
    first, second = (WebsocketClientPolicy("127.0.0.1", server.port) for _ in range(2))
    assert first.get_server_metadata()["reply_horizon"] == 1
    assert first.infer(_observation())["actions"].tolist() == [[0.0] * 7]
    assert first.infer(_observation())["actions"].tolist() == [[0.5] * 7], "the mean of calls 0 and 1 (alpha 0)"
    assert second.infer(_observation())["actions"].tolist() == [[2.0] * 7], "a new connection starts afresh"
    assert first.infer({"reset": True}) == {"status": "reset"}
    assert first.infer(_observation())["actions"].tolist() == [[3.0] * 7], "reset forgets the history"
    assert first.infer(_observation())["actions"].tolist() == [[3.5] * 7]
    # openpi-client's reset() sends nothing: a new task on the same connection starts afresh by its prompt
    assert first.infer(_observation(prompt="pick the cube"))["actions"].tolist() == [[5.0] * 7], "a new prompt"


def test_api_key_is_required_when_set(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(FakePolicy(), api_key="secret")
    for key in (None, "wrong"):
        with pytest.raises(InvalidStatus) as error:
            WebsocketClientPolicy("127.0.0.1", server.port, api_key=key)
        assert error.value.response.status_code == 401
    assert (
        WebsocketClientPolicy("127.0.0.1", server.port, api_key="secret").infer(_observation())["status"] == "success"
    )
    assert _healthz(server.port) == 200
    # An empty key (POLICY_API_KEY= exported empty) is no key: openpi-client sends no header for it.
    open_server = start_server(FakePolicy(), api_key="")
    assert WebsocketClientPolicy("127.0.0.1", open_server.port, api_key="").infer(_observation())["status"] == "success"


def test_server_stays_responsive_during_slow_inference(start_server: Callable[..., ServerThread]) -> None:
    gate = threading.Event()
    policy = FakePolicy(gate=gate)
    server = start_server(policy)
    replies: list[dict] = []
    slow = threading.Thread(
        target=lambda: replies.append(WebsocketClientPolicy("127.0.0.1", server.port).infer(_observation()))
    )
    slow.start()
    try:
        assert policy.entered.wait(WAIT_S)
        assert _healthz(server.port) == 200
        assert WebsocketClientPolicy("127.0.0.1", server.port).get_server_metadata()["model"] == "FakePolicy"
        assert not replies, "the inference is still blocked"
    finally:
        gate.set()
        slow.join(WAIT_S)
    assert replies[0]["actions"].shape == (4, 7)


def test_a_second_worker_answers_other_clients_while_a_slow_batch_computes(
    start_server: Callable[..., ServerThread],
) -> None:
    gate = threading.Event()
    policy = FakePolicy(gate=gate, gate_prompt="slow")
    server = start_server(policy)  # the default two workers
    replies: list[dict] = []
    slow = threading.Thread(
        target=lambda: replies.append(
            WebsocketClientPolicy("127.0.0.1", server.port).infer(_observation(prompt="slow"))
        )
    )
    slow.start()
    try:
        assert policy.entered.wait(WAIT_S)
        other = WebsocketClientPolicy("127.0.0.1", server.port).infer(_observation(prompt="fast"))
        assert other["status"] == "success" and other["server_timing"]["batch_size"] == 1
        assert not replies, "the slow batch is still blocked"
    finally:
        gate.set()
        slow.join(WAIT_S)
    assert replies[0]["status"] == "success"
    assert policy.batch_sizes == [1, 1]


def test_client_leaving_mid_inference_leaves_server_healthy(start_server: Callable[..., ServerThread]) -> None:
    gate = threading.Event()
    policy = FakePolicy(gate=gate)
    server = start_server(policy)
    with websockets.sync.client.connect(f"ws://127.0.0.1:{server.port}", compression=None, max_size=None) as ws:
        ws.recv(timeout=WAIT_S)
        ws.send(msgpack_numpy.packb(_observation()))
        assert policy.entered.wait(WAIT_S)
    gate.set()
    assert WebsocketClientPolicy("127.0.0.1", server.port).infer(_observation())["status"] == "success"
    assert _healthz(server.port) == 200


def test_wait_for_server_times_out_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TimeoutError, match="healthz"):
        wait_for_server("127.0.0.1", port, timeout=0.3)


def test_frames_are_squashed_to_the_square_as_the_builder_stores_them() -> None:
    camera = np.full((48, 64, 3), 200, np.uint8)
    camera[:, 32:] = 0  # the right half dark
    out = resize_square(camera, 32)
    np.testing.assert_array_equal(out, _resize(camera[None], 32)[0])  # datasets.build_rlds stores this frame
    assert out.shape == (32, 32, 3) and (out[:, :15] == 200).all() and (out[:, 17:] == 0).all()  # no black bars


def test_adapter_maps_client_keys_and_accepts_float_images() -> None:
    message = {
        "observation/image": np.ones((16, 16, 3), np.float32),
        "observation/wrist_image": np.zeros((16, 8, 3), np.uint8),
        "observation/state": [0.1] * 8,
        "prompt": "open the drawer",
    }
    obs = adapt_observation(message, LIBERO_KEYS, 32)
    assert obs.image.dtype == np.uint8 and (obs.image == 255).all()
    assert obs.wrist_image.shape == (32, 32, 3)
    assert obs.state.dtype == np.float32 and obs.state.shape == (8,)
    with pytest.raises(ObservationError, match='"observation/state" contains NaN'):
        adapt_observation({**message, "observation/state": [np.nan] * 8}, LIBERO_KEYS, 32)
    # A model that reads an 8-value state: the state is required, and of its size.
    assert adapt_observation(message, LIBERO_KEYS, 32, state_dim=8).state.shape == (8,)
    with pytest.raises(ObservationError, match=r'"observation/state" must hold the 8 values .* got 7'):
        adapt_observation({**message, "observation/state": [0.1] * 7}, LIBERO_KEYS, 32, state_dim=8)
    without = {k: v for k, v in message.items() if k != "observation/state"}
    with pytest.raises(ObservationError, match="missing 'observation/state'"):
        adapt_observation(without, LIBERO_KEYS, 32, state_dim=8)
    assert adapt_observation(without, LIBERO_KEYS, 32).state is None


def test_a_model_reading_a_state_needs_a_client_key_for_it() -> None:
    policy = FakePolicy()
    policy.proprio_dim = 8
    with pytest.raises(ValueError, match=r"robot\.observation_keys\.state is null"):
        PolicyServer(policy, KEYS)
    server = PolicyServer(policy, {**KEYS, "state": "state"})
    assert server.metadata["required_observation_keys"] == ["image", "prompt", "state"]
    assert '"state": float [8]}' in server._expected


def test_models_trained_on_random_crops_get_the_central_crop() -> None:
    image = np.full((100, 100, 3), 200, np.uint8)
    image[:3], image[-3:], image[:, :3], image[:, -3:] = 0, 0, 0, 0  # a ring outside the central 0.9 of the area
    message = {"observation/image": image, "prompt": "open the drawer"}
    plain = adapt_observation(message, LIBERO_KEYS, 100).image
    cropped = adapt_observation(message, LIBERO_KEYS, 100, crop=True).image
    assert (plain[0] == 0).all() and cropped.shape == (100, 100, 3) and (cropped == 200).all()
    floats = adapt_observation({**message, "observation/image": image / 255.0}, LIBERO_KEYS, 100, crop=True).image
    assert (floats == 200).all()


@pytest.mark.slow  # the subprocess imports torch and models
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_server_shuts_down_cleanly_on_signal(sig: signal.Signals) -> None:
    code = (
        "from serving import PolicyServer, run_server; from tests.test_serving import KEYS, FakePolicy; "
        "run_server(PolicyServer(FakePolicy(), KEYS), '127.0.0.1', 0, lambda port: print(port, flush=True))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline() or 0)
        assert port, proc.stderr.read().decode()
        client = WebsocketClientPolicy("127.0.0.1", port)  # a connected client must not hold the shutdown up
        assert client.infer(_observation())["status"] == "success"
        proc.send_signal(sig)
        assert proc.wait(timeout=WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_port_another_server_holds_is_named_before_a_model_is_built() -> None:
    from serve import port_in_use

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert "in use" in port_in_use("127.0.0.1", port).lower()
    assert port_in_use("127.0.0.1", port) is None


@pytest.mark.parametrize(
    ("ckpt", "fragment"),
    [
        (None, "ckpt is required"),
        pytest.param("/nonexistent/ckpt", "/nonexistent/ckpt does not exist", marks=pytest.mark.slow),  # imports models
    ],
)
def test_serve_cli_rejects_a_bad_checkpoint(ckpt: str | None, fragment: str, tmp_path: Path) -> None:
    args = [sys.executable, str(REPO / "serve.py"), f"hydra.run.dir={tmp_path}"] + ([f"ckpt={ckpt}"] if ckpt else [])
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode != 0 and fragment in result.stderr
