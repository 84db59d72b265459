"""The evaluator's connection to the policy server: openpi's own client, reconnected when the server goes away."""

from __future__ import annotations

import logging

from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import WebSocketException

from serving import wait_for_server

logger = logging.getLogger(__name__)


class PolicyConnectionError(Exception):
    """The server went away and did not come back within the reconnect budget."""


class PolicyClient:
    """openpi-client's WebsocketClientPolicy at host:port that survives a server restart.

    When a request fails because the connection dropped or was refused, the client waits for /healthz (at most
    `reconnect_timeout_s`), connects again and resends the same request, up to `reconnect_attempts` times in a
    row; then it raises PolicyConnectionError with the last error. A server that comes back with different metadata
    (another policy) is refused the same way. An error the server reports (a text frame: RuntimeError from openpi's
    client) is not retried. Connect only to a server that is up: `wait_for_server` first.
    """

    def __init__(
        self,
        host: str,
        port: int,
        api_key: str | None = None,
        reconnect_attempts: int = 3,
        reconnect_timeout_s: float = 30.0,
    ) -> None:
        if reconnect_attempts < 0 or reconnect_timeout_s <= 0:
            raise ValueError(
                f"reconnect.attempts must be >= 0 and reconnect.timeout_s > 0, got {reconnect_attempts} and "
                f"{reconnect_timeout_s}"
            )
        self.host, self.port, self.api_key = host, port, api_key
        self.reconnect_attempts, self.reconnect_timeout_s = reconnect_attempts, reconnect_timeout_s
        self.reconnects = 0  # successful reconnections over this client's life
        self._client: WebsocketClientPolicy | None = WebsocketClientPolicy(host, port, api_key=api_key)
        self.metadata: dict = self._client.get_server_metadata()

    def infer(self, observation: dict) -> dict:
        tries = 0
        while True:
            try:
                if self._client is None:
                    tries += 1
                    self._reconnect()
                return self._client.infer(observation)
            except (WebSocketException, OSError) as error:  # dropped, refused, reset, timed out
                self.close()
                if tries >= self.reconnect_attempts:
                    raise PolicyConnectionError(
                        f"lost the policy server at {self.host}:{self.port} and could not reconnect in {tries} tries "
                        f"({self.reconnect_timeout_s:g} s each): {type(error).__name__}: {error}"
                    ) from None
                logger.warning("policy server at %s:%d: %s; reconnecting", self.host, self.port, error)

    def reset(self) -> None:
        """Tell the server a new episode starts ({"reset": true}), where it accepts that."""
        if self.metadata.get("accepts_reset"):
            self.infer({"reset": True})

    def _reconnect(self) -> None:
        wait_for_server(self.host, self.port, timeout=self.reconnect_timeout_s)
        client = WebsocketClientPolicy(self.host, self.port, api_key=self.api_key)
        metadata = client.get_server_metadata()
        if metadata != self.metadata:
            client._ws.close()
            raise PolicyConnectionError(
                f"the policy server at {self.host}:{self.port} came back serving something else: metadata "
                f"{metadata} instead of {self.metadata}"
            )
        self._client = client
        self.reconnects += 1
        logger.info("reconnected to the policy server at %s:%d", self.host, self.port)

    def close(self) -> None:
        if self._client is not None:
            self._client._ws.close()  # openpi's client has no close(); its connection is `_ws`
            self._client = None
