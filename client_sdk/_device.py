"""Device state and the policy that says when this device may train.

The app (or `edge.device_state.read_host_state`) reports a `DeviceState`; an
`EligibilityPolicy` decides, on the device, whether training may start now,
and says why not. `fit` checks it before every local round and waits while
the answer is no; the server may further limit trainers with training slots
(`Client.acquire_training_slot`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_PROFILE_LENGTH = 128


@dataclass(frozen=True)
class DeviceState:
    """What the device is doing now.

    `battery_level`: charge in [0, 1], or None for a device without a battery
    (mains powered). `idle`: the user is not using the device. `unmetered`: on
    a network that does not bill by the byte (e.g. Wi-Fi). `profile`: the
    device profile's name, for reports."""

    battery_level: float | None
    charging: bool
    idle: bool
    unmetered: bool
    profile: str = ""

    def __post_init__(self) -> None:
        level = self.battery_level
        if level is not None and not (
            isinstance(level, (int, float)) and not isinstance(level, bool) and math.isfinite(level) and 0.0 <= level <= 1.0
        ):
            raise ValueError(f"battery_level must be a number in [0, 1], or None for a device without a battery; got {level!r}")
        for name in ("charging", "idle", "unmetered"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.profile, str) or len(self.profile) > MAX_PROFILE_LENGTH:
            raise ValueError(f"profile must be a string of at most {MAX_PROFILE_LENGTH} characters, got {self.profile!r}")

    @property
    def on_power(self) -> bool:
        """Charging, or without a battery: training drains no battery."""
        return self.charging or self.battery_level is None


@dataclass(frozen=True)
class Eligible:
    """The device may train now."""

    def __bool__(self) -> bool:
        return True


@dataclass(frozen=True)
class Ineligible:
    """The device may not train now; `reason` says why (every rule it breaks)."""

    reason: str

    def __bool__(self) -> bool:
        return False


Eligibility = Eligible | Ineligible


@dataclass(frozen=True)
class EligibilityPolicy:
    """When this device may train. The defaults allow anything.

    `min_battery` applies only on battery: a charging device, or one without
    a battery, is not drained by training (as Android's "battery not low"
    constraint is met while charging)."""

    require_charging: bool = False
    require_idle: bool = False
    require_unmetered: bool = False
    min_battery: float = 0.0

    def __post_init__(self) -> None:
        for name in ("require_charging", "require_idle", "require_unmetered"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        level = self.min_battery
        if isinstance(level, bool) or not (isinstance(level, (int, float)) and math.isfinite(level) and 0.0 <= level <= 1.0):
            raise ValueError(f"min_battery must be a number in [0, 1], got {level!r}")

    def check(self, state: DeviceState) -> Eligibility:
        """Eligible(), or Ineligible naming every rule `state` breaks."""
        reasons = []
        if self.require_charging and not state.on_power:
            reasons.append("not charging (require_charging)")
        if self.require_idle and not state.idle:
            reasons.append("device in use (require_idle)")
        if self.require_unmetered and not state.unmetered:
            reasons.append("on a metered network (require_unmetered)")
        level = state.battery_level
        if level is not None and not state.charging and level < self.min_battery:
            reasons.append(f"battery {level:.2f} below min_battery {self.min_battery:.2f}")
        return Ineligible("; ".join(reasons)) if reasons else Eligible()


@dataclass(frozen=True)
class SlotGrant:
    """The server's answer to `Client.acquire_training_slot`."""

    granted: bool
    version: int
    """The version to train on (in synchronous jobs: the round's)."""
    lease_s: float
    """How long the slot is held without a TRAINING or UPLOADING heartbeat; 0.0
    when the job has no slots (nothing is held, train at will)."""
    retry_after_s: float
    """When not granted: when to ask again."""
    reason: str
