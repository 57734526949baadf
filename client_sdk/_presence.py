"""Heartbeats while `fit` runs, from a background thread, best effort.

The training loop only says what it is doing (`set`); a daemon thread sends a
heartbeat at once on every change, and again every `next_heartbeat_s` the
server asks for while the state lasts, so a long local round still shows the
client as connected. The loop never waits for a heartbeat and never sees one
fail: failures are logged and the next interval tries again. A server that does
not know the Heartbeat RPC (UNIMPLEMENTED) is not asked again.
"""

from __future__ import annotations

import logging
import threading

import grpc

from client_sdk._client import Client, ClientState
from client_sdk._device import DeviceState
from client_sdk._errors import TributaryError

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0
"""Until the server's first reply says otherwise."""
MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 3600.0
CALL_TIMEOUT_S = 5.0
"""Per heartbeat, and how long closing waits for the last one."""


class Presence:
    def __init__(self, client: Client) -> None:
        self._client = client
        self._changed = threading.Condition()
        self._state = ClientState.IDLE
        self._base_version = 0
        self._device: DeviceState | None = None
        self._due = True  # announce the client as soon as the thread starts
        self._closing = False
        self._interval_s = DEFAULT_INTERVAL_S
        self._thread = threading.Thread(target=self._run, name="tributary-heartbeat", daemon=True)
        self.sent = 0
        self.failed = 0

    def __enter__(self) -> Presence:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set(self, state: ClientState, base_version: int, device: DeviceState | None = None) -> None:
        """What the client does now (and, if given, the device's state); a
        heartbeat says so without delay."""
        with self._changed:
            device = device if device is not None else self._device
            if (state, base_version, device) != (self._state, self._base_version, self._device):
                self._state, self._base_version, self._device = state, base_version, device
                self._due = True
                self._changed.notify()

    def close(self) -> None:
        """Say IDLE one last time (if the client was doing something else), then stop."""
        with self._changed:
            self._closing = True
            if self._state is not ClientState.IDLE:
                self._state = ClientState.IDLE
                self._due = True
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join(CALL_TIMEOUT_S)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._due or self._closing, timeout=self._interval_s)
                if self._closing and not self._due:
                    return
                state, base_version, device, closing = self._state, self._base_version, self._device, self._closing
                self._due = False
            if not self._send(state, base_version, device) or closing:
                return

    def _send(self, state: ClientState, base_version: int, device: DeviceState | None) -> bool:
        """One heartbeat; False when the server will never take one."""
        try:
            reply = self._client.heartbeat(state, base_version=base_version, timeout_s=CALL_TIMEOUT_S, device=device)
        except TributaryError as error:
            self.failed += 1
            if error.code == grpc.StatusCode.UNIMPLEMENTED:
                logger.info("server at %s takes no heartbeats; training goes on without them", self._client.address, extra=self._client.log_context())
                return False
            log = logger.warning if self.failed == 1 else logger.debug
            log("heartbeat failed (training goes on): %s", error, extra=self._client.log_context(base_version))
            return True
        except Exception as error:  # best effort: e.g. the channel was closed under us
            self.failed += 1
            logger.debug("heartbeat failed (training goes on): %r", error, extra=self._client.log_context(base_version))
            return True
        self.sent += 1
        with self._changed:
            self._interval_s = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, reply.next_heartbeat_s))
        return True
