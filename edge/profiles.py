"""Device profiles and fleets: what an emulated edge device is like.

A `DeviceProfile` is data: how fast the device trains (emulated seconds per
training example), when it is online and when it is charging (each an
`OnOffProcess`), its battery, its network (bandwidth up and down, latency),
how likely it is to abandon a round (dropout), and its power draw while
training (for energy). Profiles validate themselves; every error names the
field and the value.

A `Fleet` is a tuple of profiles. Built-in fleets (`uniform`, `heavy_tailed`,
`diurnal`) are drawn from a seed, and a custom fleet loads from a TOML or JSON
file (format in README.md, "Simulation"); errors there name the file, the
device index and the field.

All times here are *emulated* seconds: the simulator compresses them into
real seconds by its `time_scale`. A profile's random processes (availability,
charging, dropouts) are drawn from a generator the simulator seeds per device,
so the same seed gives the same schedule.
"""

from __future__ import annotations

import json
import math
import tomllib
from bisect import bisect_right
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

PROCESS_KINDS = ("always", "never", "alternating", "diurnal")
BUILTIN_FLEETS = ("uniform", "heavy_tailed", "diurnal")
DAY_S = 86_400.0


class ProfileError(ValueError):
    """A device profile or fleet description is invalid; the message names the field and value."""


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(condition: bool, name: str, value: object, requirement: str) -> None:
    if not condition:
        raise ProfileError(f"{name} must be {requirement}, got {value!r}")


@dataclass(frozen=True)
class OnOffProcess:
    """A two-state process over emulated time (online/offline, charging/not).

    always / never: constant. alternating: on and off periods with exponential
    durations of means `mean_on_s` and `mean_off_s`, starting on with
    probability mean_on / (mean_on + mean_off) (the stationary share).
    diurnal: on for `on_s` seconds of every `period_s`, starting at `phase_s`
    into each period (a phone online in the evening, charging at night).
    """

    kind: str = "always"
    mean_on_s: float = 3600.0
    mean_off_s: float = 600.0
    period_s: float = DAY_S
    on_s: float = DAY_S / 2
    phase_s: float = 0.0

    def __post_init__(self) -> None:
        _check(self.kind in PROCESS_KINDS, "kind", self.kind, f"one of {', '.join(PROCESS_KINDS)}")
        for name in ("mean_on_s", "mean_off_s", "period_s", "on_s"):
            value = getattr(self, name)
            _check(_number(value) and value > 0, name, value, "a positive number of seconds")
        _check(_number(self.phase_s) and self.phase_s >= 0, "phase_s", self.phase_s, "a number of seconds >= 0")
        _check(self.on_s <= self.period_s, "on_s", self.on_s, f"at most period_s ({self.period_s})")

    @classmethod
    def from_mapping(cls, values: Any, where: str) -> OnOffProcess:
        if isinstance(values, str):
            values = {"kind": values}
        if not isinstance(values, dict):
            raise ProfileError(f"{where} must be a table (e.g. {{ kind = \"alternating\", mean_on_s = 600 }}) or a kind, got {values!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ProfileError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            return cls(**values)
        except ProfileError as error:
            raise ProfileError(f"{where}.{error}") from None

    def timeline(self, rng: np.random.Generator) -> Timeline:
        return Timeline(self, rng)


class Timeline:
    """One draw of an `OnOffProcess`: answers "on at t?" and "when does it next
    change?" for t >= 0, drawing alternating periods lazily (so an endless run
    needs no horizon) from its own generator, hence deterministically."""

    def __init__(self, process: OnOffProcess, rng: np.random.Generator) -> None:
        self._process = process
        self._rng = rng
        self._starts: list[float] = [0.0]
        """Alternating: the times the state changes; state in [starts[i], starts[i+1]) is _first_on xor (i odd)."""
        self._first_on = True
        if process.kind == "alternating":
            share = process.mean_on_s / (process.mean_on_s + process.mean_off_s)
            self._first_on = bool(rng.random() < share)

    def _extend_to(self, t: float) -> None:
        p = self._process
        while self._starts[-1] <= t:
            mean = p.mean_on_s if self._state_of(len(self._starts) - 1) else p.mean_off_s
            self._starts.append(self._starts[-1] + float(self._rng.exponential(mean)))

    def _state_of(self, index: int) -> bool:
        return self._first_on ^ (index % 2 == 1)

    def is_on(self, t: float) -> bool:
        p = self._process
        if p.kind in ("always", "never"):
            return p.kind == "always"
        if p.kind == "diurnal":
            return (t - p.phase_s) % p.period_s < p.on_s
        self._extend_to(t)
        return self._state_of(bisect_right(self._starts, t) - 1)

    def next_change(self, t: float) -> float:
        """The first time after t at which the state differs from at t (inf if never)."""
        p = self._process
        if p.kind in ("always", "never"):
            return math.inf
        if p.kind == "diurnal":
            into = (t - p.phase_s) % p.period_s
            return t + (p.on_s - into if into < p.on_s else p.period_s - into)
        self._extend_to(t)
        return self._starts[bisect_right(self._starts, t)]

    def next_on(self, t: float) -> float:
        """t if on at t, else when it next turns on."""
        return t if self.is_on(t) else self.next_change(t)


@dataclass(frozen=True)
class DeviceProfile:
    """One emulated device. Times are emulated seconds, rates bytes per second."""

    seconds_per_sample: float = 0.01
    """Compute speed: emulated seconds to train on one example (one epoch's share)."""
    availability: OnOffProcess = field(default_factory=OnOffProcess)
    charging: OnOffProcess = field(default_factory=lambda: OnOffProcess(kind="never"))
    battery_capacity_j: float = 40_000.0
    """About a phone's: 3,000 mAh at 3.7 V."""
    battery_level: float = 1.0
    """Initial charge, a fraction of the capacity."""
    power_w: float = 3.0
    """Draw while training (and what the energy report counts)."""
    charge_w: float = 10.0
    """Charger power while charging."""
    bandwidth_up_bps: float = 1_000_000.0
    bandwidth_down_bps: float = 5_000_000.0
    latency_s: float = 0.05
    """One way, added to every transfer."""
    dropout: float = 0.0
    """Probability that the device abandons a round it started (app killed, lost connection)."""

    def __post_init__(self) -> None:
        if not isinstance(self.availability, OnOffProcess):
            raise ProfileError(f"availability must be an OnOffProcess, got {self.availability!r}")
        if not isinstance(self.charging, OnOffProcess):
            raise ProfileError(f"charging must be an OnOffProcess, got {self.charging!r}")
        for name in ("seconds_per_sample", "battery_capacity_j", "bandwidth_up_bps", "bandwidth_down_bps"):
            value = getattr(self, name)
            _check(_number(value) and value > 0, name, value, "a positive number")
        for name in ("power_w", "charge_w", "latency_s"):
            value = getattr(self, name)
            _check(_number(value) and value >= 0, name, value, "a number >= 0")
        for name in ("battery_level", "dropout"):
            value = getattr(self, name)
            _check(_number(value) and 0 <= value <= 1, name, value, "a number in [0, 1]")
        _check(self.dropout < 1, "dropout", self.dropout, "below 1 (a device that always drops out never trains)")

    def compute_s(self, samples: int) -> float:
        return samples * self.seconds_per_sample

    def transfer_s(self, num_bytes: int, *, upload: bool) -> float:
        return self.latency_s + num_bytes / (self.bandwidth_up_bps if upload else self.bandwidth_down_bps)

    @classmethod
    def from_mapping(cls, values: Any, where: str = "device") -> DeviceProfile:
        if not isinstance(values, dict):
            raise ProfileError(f"{where} must be a table of profile fields, got {values!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ProfileError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        settings = dict(values)
        for name in ("availability", "charging"):
            if name in settings:
                settings[name] = OnOffProcess.from_mapping(settings[name], f"{where}: {name}")
        try:
            return cls(**settings)
        except ProfileError as error:
            raise ProfileError(f"{where}: {error}") from None


@dataclass(frozen=True)
class Fleet:
    """The devices of one experiment, in device-index order."""

    profiles: tuple[DeviceProfile, ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.profiles:
            raise ProfileError("a fleet needs at least one device")

    def __len__(self) -> int:
        return len(self.profiles)

    def resized(self, count: int) -> Fleet:
        """The first `count` devices, repeating the fleet cyclically when it has fewer."""
        if count < 1:
            raise ProfileError(f"devices must be >= 1, got {count}")
        return Fleet(tuple(self.profiles[i % len(self.profiles)] for i in range(count)), self.name)

    @classmethod
    def builtin(cls, name: str, devices: int, seed: int = 0, **params: Any) -> Fleet:
        """A built-in fleet of `devices` devices drawn from `seed`; `params` are
        the builder's keyword arguments (see `uniform`, `heavy_tailed`, `diurnal`)."""
        builders = {"uniform": uniform, "heavy_tailed": heavy_tailed, "diurnal": diurnal}
        if name not in builders:
            raise ProfileError(f"fleet must be one of {', '.join(BUILTIN_FLEETS)} or a file, got {name!r}")
        if not (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1):
            raise ProfileError(f"devices must be an integer >= 1, got {devices!r}")
        try:
            return builders[name](devices, seed, **params)
        except TypeError as error:  # an unknown keyword
            raise ProfileError(f"fleet {name!r}: {error}") from None

    @classmethod
    def from_file(cls, path: Path) -> Fleet:
        """Load a fleet from TOML or JSON: optional `defaults` (profile fields
        every device starts from) and a list `devices` of tables, each with
        profile fields and an optional `count` (that many identical devices)."""
        try:
            text = path.read_text()
        except OSError as error:
            raise ProfileError(f"{path}: cannot read the fleet file: {error.strerror}") from None
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
            raise ProfileError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {error}") from None
        if not isinstance(data, dict):
            raise ProfileError(f"{path}: expected a table with a 'devices' list")
        unknown = sorted(set(data) - {"defaults", "devices"})
        if unknown:
            raise ProfileError(f"{path}: unknown key(s) {', '.join(unknown)} (known: defaults, devices)")
        defaults = data.get("defaults", {})
        if not isinstance(defaults, dict):
            raise ProfileError(f"{path}: defaults must be a table of profile fields, got {defaults!r}")
        entries = data.get("devices")
        if not isinstance(entries, list) or not entries:
            raise ProfileError(f"{path}: 'devices' must be a non-empty list of device tables")
        profiles: list[DeviceProfile] = []
        for index, entry in enumerate(entries):
            where = f"{path}: device {index}"
            if not isinstance(entry, dict):
                raise ProfileError(f"{where} must be a table of profile fields, got {entry!r}")
            entry = dict(entry)
            count = entry.pop("count", 1)
            if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
                raise ProfileError(f"{where}: count must be an integer >= 1, got {count!r}")
            profile = DeviceProfile.from_mapping({**defaults, **entry}, where)
            profiles.extend([profile] * count)
        return cls(tuple(profiles), name=path.stem)

    def describe(self) -> dict[str, Any]:
        speeds = np.array([p.seconds_per_sample for p in self.profiles])
        return {
            "name": self.name,
            "devices": len(self),
            "seconds_per_sample": {
                "min": float(speeds.min()),
                "median": float(np.median(speeds)),
                "p90": float(np.quantile(speeds, 0.9)),
                "max": float(speeds.max()),
            },
        }


def _quantile_draws(devices: int, rng: np.random.Generator) -> np.ndarray:
    """Standard-normal quantiles at (i + 0.5) / n, shuffled: a sample whose
    empirical distribution is the normal one for any n (a random draw of ten
    devices could easily miss the tail the fleet is meant to have)."""
    from statistics import NormalDist

    normal = NormalDist()
    z = np.array([normal.inv_cdf((i + 0.5) / devices) for i in range(devices)])
    return rng.permutation(z)


def uniform(devices: int, seed: int = 0, *, seconds_per_sample: float = 0.01, dropout: float = 0.0, **profile: Any) -> Fleet:
    """Identical, always-online devices."""
    del seed  # nothing random: the same fleet for every seed
    base = DeviceProfile.from_mapping({"seconds_per_sample": seconds_per_sample, "dropout": dropout, **profile}, "uniform fleet")
    return Fleet((base,) * devices, name="uniform")


def heavy_tailed(
    devices: int,
    seed: int = 0,
    *,
    median_seconds_per_sample: float = 0.01,
    sigma: float = 1.9,
    max_slowdown: float = 50.0,
    dropout: float = 0.0,
    **profile: Any,
) -> Fleet:
    """Log-normal compute speeds: device i takes median * exp(sigma * z_i)
    seconds per sample, z_i the normal quantiles, capped at `max_slowdown`
    times the median (and as fast as 1 / max_slowdown). With sigma = 1.9 the
    90th percentile is exp(1.9 * 1.2816) = 11.4x the median: the slowest 10%
    are at least 10x slower than the median device, as in FedBuff's and
    Papaya's fleets. Always online; network, battery from `profile`."""
    _check(_number(sigma) and sigma > 0, "sigma", sigma, "a positive number")
    _check(_number(max_slowdown) and max_slowdown >= 1, "max_slowdown", max_slowdown, "a number >= 1")
    _check(_number(median_seconds_per_sample) and median_seconds_per_sample > 0, "median_seconds_per_sample", median_seconds_per_sample, "a positive number")
    rng = np.random.default_rng([seed, 0x5EED])
    factors = np.clip(np.exp(sigma * _quantile_draws(devices, rng)), 1 / max_slowdown, max_slowdown)
    base = DeviceProfile.from_mapping({"dropout": dropout, **profile}, "heavy_tailed fleet")
    return Fleet(tuple(replace(base, seconds_per_sample=float(median_seconds_per_sample * f)) for f in factors), name="heavy_tailed")


def diurnal(
    devices: int,
    seed: int = 0,
    *,
    day_s: float = DAY_S,
    online_hours: float = 8.0,
    charging_hours: float = 7.0,
    median_seconds_per_sample: float = 0.01,
    sigma: float = 0.7,
    dropout: float = 0.05,
    **profile: Any,
) -> Fleet:
    """Devices spread over time zones: each is online `online_hours` of every
    `day_s`-second day (phones idle on a charger in the evening and night),
    charging during `charging_hours` of that window, its day shifted by a
    seeded offset; log-normal speeds with spread `sigma`, battery levels
    uniform in [0.2, 1]."""
    hour = day_s / 24
    _check(_number(online_hours) and 0 < online_hours <= 24, "online_hours", online_hours, "in (0, 24]")
    _check(_number(charging_hours) and 0 < charging_hours <= 24, "charging_hours", charging_hours, "in (0, 24]")
    rng = np.random.default_rng([seed, 0xD1A1])
    factors = np.exp(sigma * _quantile_draws(devices, rng))
    offsets = rng.uniform(0, day_s, devices)
    levels = rng.uniform(0.2, 1.0, devices)
    base = DeviceProfile.from_mapping({"dropout": dropout, **profile}, "diurnal fleet")
    fleet = []
    for factor, offset, level in zip(factors, offsets, levels, strict=True):
        online = OnOffProcess(kind="diurnal", period_s=day_s, on_s=online_hours * hour, phase_s=float(offset))
        charging = OnOffProcess(kind="diurnal", period_s=day_s, on_s=charging_hours * hour, phase_s=float(offset + hour))
        fleet.append(
            replace(
                base,
                seconds_per_sample=float(median_seconds_per_sample * factor),
                availability=online,
                charging=charging,
                battery_level=float(level),
            )
        )
    return Fleet(tuple(fleet), name="diurnal")
