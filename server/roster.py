"""Who is there: the clients of one job that sent heartbeats lately. No gRPC here.

Each heartbeat records a client's state (idle, training, uploading), the model
version it holds and when it was heard from. The roster is bounded twice over:
clients not heard from for `expiry_s` are forgotten, and at most `max_clients`
are kept; a heartbeat from a new client when the roster is full of clients
heard from lately is refused (LimitExceeded), while known clients keep beating.

Entries are kept in the order they were last heard from (an OrderedDict, moved
to the end on every beat; the time is read under the lock, so the order holds),
which makes forgetting the expired ones a pop from the front and counting
the recent ones a walk from the back that stops at the first old entry.

Lock order: Roster._lock is a leaf; nothing is called out of the roster while
holding it, and the job never holds its own lock when it calls in.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.errors import InvalidUpdate, LimitExceeded
from server.scheduling import DeviceReport

MAX_CLIENT_ID_LENGTH = 128


class ClientState(enum.Enum):
    IDLE = "idle"
    TRAINING = "training"
    UPLOADING = "uploading"


@dataclass(frozen=True)
class ClientPresence:
    """What the roster knows of one client. Times are in the roster's clock
    (time.monotonic unless the roster was given another)."""

    client_id: str
    state: ClientState
    base_version: int
    first_seen: float
    last_seen: float
    heartbeats: int
    device: DeviceReport | None = None
    """The device state of its latest heartbeat that carried one."""


class Roster:
    def __init__(self, *, max_clients: int, expiry_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        if not expiry_s > 0:
            raise ValueError(f"expiry_s must be > 0, got {expiry_s}")
        self.max_clients = max_clients
        self.expiry_s = expiry_s
        self.clock = clock
        self._lock = threading.Lock()
        self._clients: collections.OrderedDict[str, ClientPresence] = collections.OrderedDict()
        self.evicted = 0
        """Clients forgotten because they were not heard from for expiry_s (cumulative)."""
        self.refused = 0
        """Heartbeats of new clients refused because the roster was full (cumulative)."""

    def beat(self, client_id: str, state: ClientState, base_version: int, device: DeviceReport | None = None) -> ClientPresence:
        """Record a heartbeat; returns the client's updated entry."""
        if not client_id:
            raise InvalidUpdate("client_id is empty; every heartbeat names the client that sends it")
        if len(client_id) > MAX_CLIENT_ID_LENGTH:
            raise InvalidUpdate(
                f"client_id is {len(client_id)} characters long; at most {MAX_CLIENT_ID_LENGTH} are accepted"
            )
        with self._lock:
            now = self.clock()
            self._evict_expired(now)
            known = self._clients.pop(client_id, None)
            if known is None and len(self._clients) >= self.max_clients:
                self.refused += 1
                raise LimitExceeded(
                    f"this job already tracks {self.max_clients} clients heard from in the last "
                    f"{self.expiry_s:g} s (roster_max_clients); try again later, or raise roster_max_clients"
                )
            entry = ClientPresence(
                client_id=client_id,
                state=state,
                base_version=base_version,
                first_seen=known.first_seen if known else now,
                last_seen=now,
                heartbeats=(known.heartbeats if known else 0) + 1,
                device=device if device is not None else (known.device if known else None),
            )
            self._clients[client_id] = entry  # now the most recently heard from
            return entry

    def connected_clients(self, now: float, window_s: float) -> int:
        """Clients heard from in the `window_s` seconds up to `now` (roster clock)."""
        since = now - window_s
        count = 0
        with self._lock:
            for entry in reversed(self._clients.values()):
                if entry.last_seen < since:
                    break
                count += 1
        return count

    def by_state(self, now: float, window_s: float) -> dict[ClientState, int]:
        """connected_clients, split by the state each client last reported."""
        since = now - window_s
        counts = dict.fromkeys(ClientState, 0)
        with self._lock:
            for entry in reversed(self._clients.values()):
                if entry.last_seen < since:
                    break
                counts[entry.state] += 1
        return counts

    def get(self, client_id: str) -> ClientPresence | None:
        with self._lock:
            return self._clients.get(client_id)

    def clients(self) -> list[ClientPresence]:
        """Every entry, least recently heard from first (expired ones may linger
        until the next heartbeat or `evict_expired`)."""
        with self._lock:
            return list(self._clients.values())

    def evict_expired(self) -> int:
        """Forget clients not heard from for expiry_s; returns how many."""
        with self._lock:
            return self._evict_expired(self.clock())

    def __len__(self) -> int:
        with self._lock:
            return len(self._clients)

    def _evict_expired(self, now: float) -> int:
        deadline = now - self.expiry_s
        evicted = 0
        while self._clients:
            oldest = next(iter(self._clients.values()))
            if oldest.last_seen >= deadline:
                break
            self._clients.popitem(last=False)
            evicted += 1
        self.evicted += evicted
        return evicted
