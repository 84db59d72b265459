"""The openpi WebSocket policy server (`serving.server`) and the client-message adapter (`serving.observation`)."""

from serving.observation import ObservationError, adapt_observation, expected_form
from serving.server import PolicyServer, ServerThread, run_server, wait_for_server

__all__ = [
    "ObservationError",
    "PolicyServer",
    "ServerThread",
    "adapt_observation",
    "expected_form",
    "run_server",
    "wait_for_server",
]
