"""Training slots: which clients of a job may train now. No gRPC here.

A job with `max_concurrent_trainers` hands out that many slots at most. A
client asks for one (with its device state) before it trains and holds it
until its push is answered (accepted or refused for good) or its lease runs
out; heartbeats in state TRAINING or UPLOADING renew the lease, so a slow
device keeps its slot while it works and a vanished one loses it. With a cap
on, a push (or a cohort join) from a client that holds no slot is refused:
a cap anyone may walk around is no cap, and synchronous rounds (below) need it.

Synchronous rounds (fedavg): a round needs exactly `clients_per_round`
distinct clients to push on its version. The job grants that many slots per
round, all for the round's version, and no more until the round closes: a
client that pushed keeps counting for the round after its slot is released.
This is how a synchronous job waits for the clients it selected, slow ones
included (an asynchronous job would simply take more clients meanwhile). A
lease that runs out, or a push refused for good, frees the slot for another
client in the same round. `max_concurrent_trainers` still bounds how many
train at once, so a cap below the round size runs the round in waves.

Preferring charging devices (`prefer_charging`): under contention, a device
that is charging wins over one that is not. The server cannot see requests
that are not made, so it remembers the charging devices it recently had to
turn away (they are told to ask again after `retry_after_s`): a device that
is not charging is granted a slot only while more slots are free than
charging devices are waiting for one. With no charging device waiting, any
device gets a free slot, so a fleet with no charger in sight still trains
(and a fedavg round still fills); with several waiting, the slots that free
up go to them first.

`min_battery`: a device on battery, not charging, below this charge is turned
away (a charging device, or one without a battery, is not: training does not
drain it).

Slots are soft state, kept in memory only: after a restart clients ask again.

Lock order: TrainingSlots._lock is a leaf; nothing is called out of it while
it is held but logging (the job may call in while holding its own lock).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from proto.logcontext import log_context
from server.errors import InvalidUpdate, NoTrainingSlot

logger = logging.getLogger("tributary.server")

RETRY_AFTER_S = 1.0
"""When a refused client should ask again while slots are busy."""
INELIGIBLE_RETRY_S = 30.0
"""When a device the server turned away for its battery should ask again."""
WAITING_TTL_S = 3 * RETRY_AFTER_S
"""How long a turned-away charging device counts as waiting (it asks again within RETRY_AFTER_S)."""
MAX_PROFILE_LENGTH = 128


@dataclass(frozen=True)
class DeviceReport:
    """A device's state as it reported it (proto DeviceState)."""

    battery_level: float | None
    """Charge in [0, 1]; None: no battery (mains powered)."""
    charging: bool
    idle: bool
    unmetered: bool
    profile: str = ""

    def __post_init__(self) -> None:
        level = self.battery_level
        if level is not None and not (isinstance(level, (int, float)) and math.isfinite(level) and 0.0 <= level <= 1.0):
            raise InvalidUpdate(f"device battery_level must be in [0, 1] (leave it unset without a battery), got {level!r}")
        if len(self.profile) > MAX_PROFILE_LENGTH:
            raise InvalidUpdate(f"device profile is {len(self.profile)} characters long; at most {MAX_PROFILE_LENGTH} are accepted")

    @property
    def on_power(self) -> bool:
        """Charging, or without a battery: training drains nothing."""
        return self.charging or self.battery_level is None


@dataclass(frozen=True)
class SlotPolicy:
    max_concurrent_trainers: int
    lease_s: float
    prefer_charging: bool = False
    min_battery: float | None = None
    round_size: int | None = None
    """fedavg's clients_per_round: slots per round; None for asynchronous jobs."""


@dataclass(frozen=True)
class SlotDecision:
    granted: bool
    version: int
    """The version to train on."""
    lease_s: float = 0.0
    retry_after_s: float = 0.0
    reason: str = ""


@dataclass
class _Slot:
    version: int
    expires_at: float
    device: DeviceReport | None


class TrainingSlots:
    def __init__(self, policy: SlotPolicy, *, clock: Callable[[], float] = time.monotonic, job_id: str | None = None) -> None:
        self.policy = policy
        self.job_id = job_id
        """Only for the context of log events."""
        self._clock = clock
        self._lock = threading.Lock()
        self._holders: dict[str, _Slot] = {}
        self._round: int | None = None
        """fedavg: the round (version) the holders and `_pushed` belong to."""
        self._pushed: set[str] = set()
        """fedavg: clients that pushed in the current round (their slot counts until it closes)."""
        self._waiting_charging: dict[str, float] = {}
        """Charging devices turned away lately -> when they last asked (insertion: first asked first)."""
        self.granted = 0
        self.expired = 0

    # -- asking ------------------------------------------------------------------

    def acquire(self, client_id: str, device: DeviceReport, version: int) -> SlotDecision:
        """Grant `client_id` a slot to train on `version` (the job's current one), or say why not."""
        policy = self.policy
        with self._lock:
            now = self._clock()
            self._tidy(now, version)
            held = self._holders.get(client_id)
            if held is not None:  # asking again: renew, same version
                held.expires_at = now + policy.lease_s
                held.device = device
                return SlotDecision(True, held.version, policy.lease_s)
            if client_id in self._pushed:
                return SlotDecision(
                    False, version, retry_after_s=RETRY_AFTER_S,
                    reason=f"client {client_id!r} already pushed in round {version}; wait for version {version + 1}",
                )  # fmt: skip
            if policy.min_battery is not None and not device.on_power and device.battery_level is not None and device.battery_level < policy.min_battery:
                return SlotDecision(
                    False, version, retry_after_s=INELIGIBLE_RETRY_S,
                    reason=f"battery {device.battery_level:.2f} below this job's min_battery {policy.min_battery:.2f} and not charging",
                )  # fmt: skip
            free = self._free()
            if free > 0 and not device.charging and policy.prefer_charging:
                waiting = sum(1 for other in self._waiting_charging if other != client_id)
                if free <= waiting:
                    return SlotDecision(
                        False, version, retry_after_s=RETRY_AFTER_S,
                        reason=f"the {free} free slot(s) go to {waiting} charging device(s) waiting (prefer_charging); ask again",
                    )  # fmt: skip
            if free <= 0:
                if device.charging and policy.prefer_charging:
                    self._waiting_charging.pop(client_id, None)
                    self._waiting_charging[client_id] = now
                return SlotDecision(False, version, retry_after_s=RETRY_AFTER_S, reason=self._busy_reason(version))
            self._waiting_charging.pop(client_id, None)
            self._holders[client_id] = _Slot(version, now + policy.lease_s, device)
            self.granted += 1
            return SlotDecision(True, version, policy.lease_s)

    def renew(self, client_id: str) -> float:
        """A heartbeat saying the holder works: extend its lease. Returns what
        is left of it (0.0 when it holds no slot)."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            held = self._holders.get(client_id)
            if held is None:
                return 0.0
            held.expires_at = now + self.policy.lease_s
            return self.policy.lease_s

    def lease_left(self, client_id: str) -> float:
        with self._lock:
            now = self._clock()
            self._expire(now)
            held = self._holders.get(client_id)
            return 0.0 if held is None else held.expires_at - now

    def require(self, client_id: str, job_id: str) -> None:
        """Refuse (NoTrainingSlot, a PreconditionFailed) a client that holds no slot."""
        with self._lock:
            self._expire(self._clock())
            if client_id in self._holders:
                return
        raise NoTrainingSlot(
            f"client {client_id!r} holds no training slot in job {job_id!r} (max_concurrent_trainers="
            f"{self.policy.max_concurrent_trainers}); ask for one (AcquireTrainingSlot) before training. "
            f"A slot is released by the client's push and lapses {self.policy.lease_s:g} s after its last "
            "TRAINING or UPLOADING heartbeat"
        )

    def release(self, client_id: str, *, pushed: bool) -> None:
        """The holder's push was answered: accepted (`pushed`; in a round, it
        keeps counting until the round closes) or refused for good."""
        with self._lock:
            held = self._holders.pop(client_id, None)
            if held is not None and pushed and self.policy.round_size is not None and held.version == self._round:
                self._pushed.add(client_id)

    @property
    def active(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._holders)

    def holders(self) -> dict[str, int]:
        """Client id -> the version its slot is for."""
        with self._lock:
            self._expire(self._clock())
            return {client_id: slot.version for client_id, slot in self._holders.items()}

    # -- machinery (call with the lock held) ----------------------------------------

    def _tidy(self, now: float, version: int) -> None:
        if self.policy.round_size is not None and version != self._round:
            # a new round: the old one's slots are spent (its pushes would be refused as closed)
            self._round = version
            self._holders.clear()
            self._pushed.clear()
        self._expire(now)
        for client_id, asked in list(self._waiting_charging.items()):
            if now - asked > WAITING_TTL_S:
                del self._waiting_charging[client_id]

    def _expire(self, now: float) -> None:
        for client_id, slot in list(self._holders.items()):
            if slot.expires_at <= now:
                del self._holders[client_id]
                self.expired += 1
                logger.info(
                    "training slot lease lapsed (no TRAINING or UPLOADING heartbeat for %g s); the slot is free again", self.policy.lease_s,
                    extra=log_context(job=self.job_id, client=client_id, version=slot.version),
                )  # fmt: skip

    def _free(self) -> int:
        free = self.policy.max_concurrent_trainers - len(self._holders)
        if self.policy.round_size is not None:
            free = min(free, self.policy.round_size - len(self._holders) - len(self._pushed))
        return free

    def _busy_reason(self, version: int) -> str:
        if self.policy.round_size is not None and len(self._holders) + len(self._pushed) >= self.policy.round_size:
            return (
                f"round {version} has its {self.policy.round_size} clients (clients_per_round); ask again, "
                "or for the next round once this one closes"
            )
        return f"all {self.policy.max_concurrent_trainers} training slots are taken (max_concurrent_trainers); ask again"
