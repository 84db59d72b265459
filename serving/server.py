"""A policy behind the openpi WebSocket protocol, with inference off the event loop.

Protocol (what openpi-client 0.1.2 speaks):
  1. On connect the server sends one binary msgpack-numpy frame: the metadata (policy.metadata() plus unnorm_key,
     observation_keys, required_observation_keys, image_size, and accepts_reset: true).
  2. Each binary msgpack-numpy observation gets a binary reply
     {"actions": float32 [T, A], "status": "success", "server_timing": {"infer_ms", "prev_total_ms"}};
     as in openpi, prev_total_ms (the previous request's receive-to-reply time) is absent from a connection's
     first reply.
  3. {"reset": true} resets this connection's state (its action ensemble) and calls policy.reset(); the reply is
     {"status": "reset"}. A new connection starts with fresh state.
  4. A bad request (not msgpack, missing key, wrong shape, dtype, NaN, over max_message_bytes) or a failed inference
     gets a TEXT frame that names what was wrong and the expected form; unlike openpi the connection stays open and
     keeps serving. Only a frame over the transport's hard limit (4 x max_message_bytes, so that a client cannot make
     the server buffer without bound) closes the connection, with code 1009.
  5. GET /healthz on the same port answers 200 "OK"; with an api_key, WebSocket connections without
     `Authorization: Api-Key <key>` are refused with 401 (/healthz stays open).

Inference never runs on the event loop, so keepalive pings, /healthz and new connections are answered while a model
computes. Requests from all connections go into one queue; a batcher hands `workers` threads batches of up to
max_batch_size observations for one predict_action_batch call each: whatever queued while the previous batch ran
(nothing is held back when the server is idle), plus what arrives within max_wait_ms from connections that could
still send one (a connection has one request at a time, so a lone client never waits). A batch that fails is re-run
one request at a time, so a bad request fails alone. With `ensemble`, each connection keeps its own CogACT adaptive
ensemble and the reply is the ensembled action for now, [1, A]; it starts afresh on {"reset": true} and whenever the
connection's prompt changes (openpi-client's reset() sends nothing, and its examples keep one connection across
episodes: the first actions of a new task would otherwise be blended with the last task's).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import http
import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from openpi_client import msgpack_numpy
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from models.ensemble import AdaptiveEnsembler
from models.policy import Observation, Policy
from serving.observation import (
    ObservationError,
    check_observation_keys,
    expected_form,
    policy_observation,
    required_fields,
)

logger = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"


class RequestError(Exception):
    """A request the server answers with a text frame; the connection stays open."""


@dataclass
class _Pending:
    """One observation waiting for the batcher; `reply` gets (chunk [T, A], infer_ms, batch size) or an error."""

    observation: Observation
    reply: asyncio.Future


class _PromptEnsembler:
    """A connection's ensemble, started afresh when its prompt changes (a new task: nothing to blend with)."""

    def __init__(self, ensembler: AdaptiveEnsembler) -> None:
        self.ensembler, self.prompt = ensembler, None

    def reset(self) -> None:
        self.ensembler.reset()

    def __call__(self, chunk: np.ndarray, prompt: str) -> np.ndarray:
        if prompt != self.prompt:
            self.ensembler.reset()
            self.prompt = prompt
        return self.ensembler(chunk)


class PolicyServer:
    """Serves `policy` to openpi clients; `observation_keys` is robot.observation_keys (canonical -> client key).

    max_batch_size: observations per predict_action_batch call (1 disables batching). max_wait_ms: how long a batch
    waits for requests from connected clients that have none queued or computing (0: take what is queued and go).
    workers: batches computed at once.
    max_message_bytes: larger requests get a text frame. ensemble: {"horizon", "alpha"} for a per-connection
    AdaptiveEnsembler, or None to reply with whole chunks.
    """

    def __init__(
        self,
        policy: Policy,
        observation_keys: Mapping[str, str | None],
        unnorm_key: str | None = None,
        api_key: str | None = None,
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        workers: int = 2,
        max_message_bytes: int = 16 * 2**20,
        ensemble: Mapping | None = None,
    ) -> None:
        for name, value in (("max_batch_size", max_batch_size), ("workers", workers)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if max_wait_ms < 0 or max_message_bytes < 1:
            raise ValueError(
                f"max_wait_ms must be >= 0 and max_message_bytes >= 1, got {max_wait_ms}, {max_message_bytes}"
            )
        self.max_batch_size, self.max_wait_ms, self.workers = max_batch_size, max_wait_ms, workers
        self.max_message_bytes = max_message_bytes
        self.ensemble = dict(ensemble) if ensemble else None
        check_observation_keys(observation_keys, policy)
        self.policy = policy
        self.observation_keys = dict(observation_keys)
        self.api_key = api_key or None  # an empty POLICY_API_KEY is none: openpi-client sends no header for it
        policy_metadata = policy.metadata()
        self.metadata = {
            **policy_metadata,
            "unnorm_key": policy_metadata.get("unnorm_key") or unnorm_key,
            "observation_keys": {name: key for name, key in self.observation_keys.items() if key},
            "required_observation_keys": [
                self.observation_keys[n] for n in required_fields(policy.proprio_dim, policy.reads_wrist_image)
            ],
            "image_size": policy.image_size,
            "accepts_reset": True,  # openpi servers do not know {"reset": true}; clients check this before sending it
            "reply_horizon": 1 if self.ensemble else policy.action_horizon,
        }
        form = expected_form(self.observation_keys, policy.proprio_dim, policy.reads_wrist_image)
        self._expected = f'Expected a binary msgpack-numpy map {form}, or {{"reset": true}}.'
        self._executor: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._connections = 0  # open WebSocket connections
        self._computing = 0  # requests in batches handed to workers

    async def serve(
        self, host: str, port: int, stop: asyncio.Event, on_ready: Callable[[int], None] | None = None
    ) -> None:
        """Listen on host:port (0: any free port) until `stop` is set; on_ready(bound_port) once accepting."""
        self._queue = asyncio.Queue()
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="policy") as self._executor:
            batcher = asyncio.create_task(self._batch_loop())
            try:
                async with serve(
                    self._handle,
                    host,
                    port,
                    compression=None,
                    max_size=4 * self.max_message_bytes,
                    process_request=self._process_request,
                ) as server:
                    if on_ready is not None:
                        on_ready(server.sockets[0].getsockname()[1])
                    await stop.wait()
            finally:  # connections are closed and their handlers done: nothing waits on the batcher any more
                batcher.cancel()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0] == HEALTH_PATH:
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.api_key is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Api-Key {self.api_key}".encode()):
                return connection.respond(
                    http.HTTPStatus.UNAUTHORIZED, "missing or wrong header; expected 'Authorization: Api-Key <key>'\n"
                )
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        logger.info("client %s connected", connection.remote_address)
        prev_total_ms: float | None = None
        ensembler = _PromptEnsembler(AdaptiveEnsembler(**self.ensemble)) if self.ensemble else None
        self._connections += 1
        try:
            await connection.send(msgpack_numpy.packb(self.metadata))
            async for message in connection:
                start = time.monotonic()
                try:
                    reply = await self._reply(message, prev_total_ms, ensembler)
                except RequestError as error:
                    await connection.send(str(error))
                    continue
                await connection.send(msgpack_numpy.packb(reply))
                prev_total_ms = None if reply["status"] == "reset" else (time.monotonic() - start) * 1000
        except ConnectionClosed:
            pass
        finally:
            self._connections -= 1
        logger.info("client %s disconnected", connection.remote_address)

    async def _reply(
        self, message: str | bytes, prev_total_ms: float | None, ensembler: _PromptEnsembler | None
    ) -> dict:
        if isinstance(message, str):
            raise self._bad_request("got a text frame")
        if len(message) > self.max_message_bytes:
            raise self._bad_request(
                f"the message has {len(message)} bytes, over this server's maximum of {self.max_message_bytes} "
                f"(serve.py max_message_mb)"
            )
        try:
            data = msgpack_numpy.unpackb(message)
        except Exception as error:  # msgpack and numpy raise many types on malformed input
            raise self._bad_request(f"not msgpack-numpy ({type(error).__name__}: {error})") from None
        if not isinstance(data, dict):
            raise self._bad_request(f"got a msgpack {type(data).__name__}, not a map")
        if data.get("reset") is True:
            if ensembler is not None:
                ensembler.reset()
            await self._in_worker("reset", self.policy.reset)
            return {"status": "reset"}
        try:
            observation = policy_observation(data, self.observation_keys, self.policy)
        except ObservationError as error:
            raise self._bad_request(str(error)) from None
        except Exception as error:  # a check missed: still a text frame, and the connection stays open
            logger.exception("reading an observation failed")
            raise self._bad_request(f"the observation could not be read ({type(error).__name__}: {error})") from None
        assert self._queue is not None, "the server is not running"
        pending = _Pending(observation, asyncio.get_running_loop().create_future())
        await self._queue.put(pending)
        actions, infer_ms, batch_size = await pending.reply
        if ensembler is not None:
            actions = ensembler(actions, observation.prompt)[None].astype(np.float32)
        timing = {"infer_ms": infer_ms, "batch_size": batch_size}
        if prev_total_ms is not None:
            timing["prev_total_ms"] = prev_total_ms
        return {"actions": actions, "status": "success", "server_timing": timing}

    async def _batch_loop(self) -> None:
        """Take what is queued (up to max_batch_size, waiting max_wait_ms for more) whenever a worker is free."""
        loop, free = asyncio.get_running_loop(), asyncio.Semaphore(self.workers)
        while True:
            await free.acquire()
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_ms / 1000
            while len(batch) < self.max_batch_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                if len(batch) >= self._connections - self._computing:
                    break  # every other connection's request is already computing: nobody else can send now
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            batch = [pending for pending in batch if not pending.reply.done()]  # their clients left
            if not batch:
                free.release()
                continue
            observations = [pending.observation for pending in batch]
            self._computing += len(batch)
            done = loop.run_in_executor(self._executor, self._infer_batch, observations)
            done.add_done_callback(functools.partial(self._deliver, batch, free))

    def _deliver(self, batch: list[_Pending], free: asyncio.Semaphore, done: asyncio.Future) -> None:
        self._computing -= len(batch)
        free.release()
        results = done.result() if done.exception() is None else [done.exception()] * len(batch)
        for pending, result in zip(batch, results, strict=True):
            if pending.reply.done():
                continue
            if isinstance(result, BaseException):
                pending.reply.set_exception(result)
            else:
                pending.reply.set_result((*result, len(batch)))

    def _bad_request(self, what: str) -> RequestError:
        return RequestError(f"bad request: {what}. {self._expected}")

    async def _in_worker(self, what: str, fn: Callable, *args: object) -> object:
        """fn(*args) in the policy thread; its errors become RequestError (traceback logged, not sent)."""
        assert self._executor is not None, "the server is not running"
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except RequestError:
            raise
        except Exception as error:
            logger.exception("%s failed", what)
            raise RequestError(f"{what} failed: {type(error).__name__}: {error}.") from None

    def _infer_batch(self, observations: list[Observation]) -> list[tuple[np.ndarray, float] | RequestError]:
        """One predict_action_batch call (in a worker thread): per observation, (chunk, infer_ms) or the error to
        send. A failed batch of several is re-run one by one so that only the request at fault fails."""
        start = time.monotonic()
        try:
            chunks = np.asarray(self.policy.predict_action_batch(observations))
        except Exception as error:
            if len(observations) > 1:
                logger.warning("a batch of %d failed (%s); re-running it request by request", len(observations), error)
                return [self._infer_batch([observation])[0] for observation in observations]
            logger.exception("inference failed")
            return [RequestError(f"inference failed: {type(error).__name__}: {error}.")]
        infer_ms = (time.monotonic() - start) * 1000
        if chunks.ndim != 3 or chunks.shape[0] != len(observations):
            shape = list(chunks.shape)
            return [
                RequestError(f"inference failed: the policy returned {shape}, not [{len(observations)}, T, A].")
            ] * len(observations)
        return [
            (chunk.astype(np.float32), infer_ms)
            if np.isfinite(chunk).all()
            else RequestError("inference failed: the policy returned NaN or inf actions.")
            for chunk in chunks
        ]


def run_server(server: PolicyServer, host: str, port: int, on_ready: Callable[[int], None] | None = None) -> None:
    """Serve in the calling (main) thread until SIGINT or SIGTERM, then close connections and return."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await server.serve(host, port, stop, on_ready)

    asyncio.run(main())


class ServerThread:
    """Runs a PolicyServer on its own event loop in a daemon thread (evaluation and tests).

    `with ServerThread(server) as running:` starts it, bound to `running.port` (a free one when port=0), and stops it.
    Use a literal IP as host: with port 0 a name such as "localhost" may bind IPv4 and IPv6 to different ports.
    """

    def __init__(self, server: PolicyServer, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server, self.host, self.port = server, host, port
        self._thread = threading.Thread(target=self._run, name="policy-server", daemon=True)
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await self.server.serve(self.host, self.port, self._stop, self._on_ready)

        try:
            asyncio.run(main())
        except BaseException as error:  # reported to start(); a bind failure must not pass silently
            self._error = error
        finally:
            self._started.set()

    def _on_ready(self, port: int) -> None:
        self.port = port
        self._started.set()

    def start(self) -> ServerThread:
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise RuntimeError(f"the policy server failed to start on {self.host}:{self.port}") from self._error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Close every connection (waiting for an inference in flight) and join the thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_server(host: str, port: int, timeout: float = 60.0) -> None:
    """Poll GET http://host:port/healthz until it answers 200; TimeoutError after `timeout` seconds."""
    url = f"http://{host}:{port}{HEALTH_PATH}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no policy server answered {url} within {timeout:g} s")
        time.sleep(0.1)  # polling interval between health checks
