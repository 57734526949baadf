"""One experiment, described by one TOML file (see README.md, "Simulation").

    name = "digits-fedbuff"
    seed = 0                 # partition, fleet, device schedules, model init
    devices = 50

    [server]                 # the job: the keys of a [[jobs]] table in server.toml
    strategy = "fedbuff"
    buffer_size = 10

    [data]                   # digits (Dirichlet label skew) or synthetic (FedProx)
    name = "digits"
    dirichlet_alpha = 0.5

    [model]                  # logistic or mlp
    kind = "logistic"

    [training]               # local SGD on each device
    epochs = 1
    batch_size = 16
    lr = 0.1

    [fleet]                  # a built-in fleet and its parameters, or file = "fleet.toml"
    builtin = "heavy_tailed"

    [eligibility]            # when a device may train
    min_battery = 0.2

    [run]
    duration_s = 3600        # emulated seconds
    time_scale = 0.01        # real seconds per emulated second
    target_accuracy = 0.9

Every section is a frozen dataclass that checks itself; an error names the
section, the key and the value. The [server] table is checked by the server's
own JobConfig when the simulation starts (edge does not import server code).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from edge.datasets import DATASETS, MODELS
from edge.profiles import BUILTIN_FLEETS, Fleet, ProfileError

T = TypeVar("T")


class SimulationConfigError(ValueError):
    """A bad experiment description; the message names the key and the value."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(condition: bool, key: str, value: object, requirement: str) -> None:
    if not condition:
        raise SimulationConfigError(f"{key} must be {requirement}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    dirichlet_alpha: float = 0.5
    """digits: label skew (smaller: each device sees fewer classes)."""
    min_size: int = 10
    """digits: fewest examples a device gets."""
    alpha: float = 1.0
    """synthetic: how much the devices' models differ."""
    beta: float = 1.0
    """synthetic: how much the devices' inputs differ."""
    iid: bool = False
    """synthetic: the paper's Synthetic-IID instead."""
    max_samples: int = 1000
    """synthetic: cap on a device's power-law sample count."""

    def __post_init__(self) -> None:
        _require(self.name in DATASETS, "[data] name", self.name, f"one of {', '.join(DATASETS)}")
        _require(_is_number(self.dirichlet_alpha) and self.dirichlet_alpha > 0, "[data] dirichlet_alpha", self.dirichlet_alpha, "> 0")
        _require(_is_int(self.min_size) and self.min_size >= 1, "[data] min_size", self.min_size, "an integer >= 1")
        for key in ("alpha", "beta"):
            value = getattr(self, key)
            _require(_is_number(value) and value >= 0, f"[data] {key}", value, ">= 0")
        _require(isinstance(self.iid, bool), "[data] iid", self.iid, "true or false")
        _require(_is_int(self.max_samples) and self.max_samples >= 60, "[data] max_samples", self.max_samples, "an integer >= 60")


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "logistic"
    hidden: int = 32

    def __post_init__(self) -> None:
        _require(self.kind in MODELS, "[model] kind", self.kind, f"one of {', '.join(MODELS)}")
        _require(_is_int(self.hidden) and self.hidden >= 1, "[model] hidden", self.hidden, "an integer >= 1")


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.1
    momentum: float = 0.0

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            _require(_is_int(value) and value >= 1, f"[training] {key}", value, "an integer >= 1")
        _require(_is_number(self.lr) and self.lr > 0, "[training] lr", self.lr, "a positive number")
        _require(_is_number(self.momentum) and 0 <= self.momentum < 1, "[training] momentum", self.momentum, "in [0, 1)")


@dataclass(frozen=True)
class FleetConfig:
    builtin: str | None = "heavy_tailed"
    file: Path | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    """The built-in fleet's keyword arguments (e.g. sigma, median_seconds_per_sample)."""

    def __post_init__(self) -> None:
        if (self.builtin is None) == (self.file is None):
            raise SimulationConfigError(f"[fleet] needs exactly one of builtin (one of {', '.join(BUILTIN_FLEETS)}) and file")
        if self.builtin is not None:
            _require(self.builtin in BUILTIN_FLEETS, "[fleet] builtin", self.builtin, f"one of {', '.join(BUILTIN_FLEETS)}")
        elif self.params:
            raise SimulationConfigError(f"[fleet] keys {', '.join(sorted(self.params))} apply to a built-in fleet, not to a file")

    def build(self, devices: int, seed: int) -> Fleet:
        """The fleet, with `devices` devices (a file's fleet is repeated or cut to size)."""
        try:
            if self.file is not None:
                return Fleet.from_file(self.file).resized(devices)
            assert self.builtin is not None
            return Fleet.builtin(self.builtin, devices, seed, **self.params)
        except ProfileError as error:
            raise SimulationConfigError(f"[fleet] {error}") from None


@dataclass(frozen=True)
class EligibilityConfig:
    """When a device may start a round: the fields of the SDK's
    `EligibilityPolicy`, which each emulated device checks."""

    min_battery: float = 0.0
    """Not below this battery level, unless charging."""
    require_charging: bool = False
    require_idle: bool = False
    """Emulated devices are always idle: this never refuses one."""
    require_unmetered: bool = False
    """Emulated devices are always on an unmetered network: this never refuses one."""

    def __post_init__(self) -> None:
        _require(_is_number(self.min_battery) and 0 <= self.min_battery <= 1, "[eligibility] min_battery", self.min_battery, "in [0, 1]")
        for key in ("require_charging", "require_idle", "require_unmetered"):
            value = getattr(self, key)
            _require(isinstance(value, bool), f"[eligibility] {key}", value, "true or false")


@dataclass(frozen=True)
class RunConfig:
    duration_s: float = 3600.0
    """Emulated seconds the fleet runs."""
    time_scale: float = 0.01
    """Real seconds per emulated second."""
    target_accuracy: float | None = None
    """Report when test accuracy first reaches this."""
    processes: int = 2
    """Worker processes (local backend) or Ray actors the devices are spread over."""
    max_in_flight: int = 16
    """Pulls, trainings and pushes each worker runs at once (the rest queue)."""
    eval_interval_s: float = 0.05
    """Fewest real seconds between two evaluations of the global model."""

    def __post_init__(self) -> None:
        for key in ("duration_s", "time_scale", "eval_interval_s"):
            value = getattr(self, key)
            _require(_is_number(value) and value > 0, f"[run] {key}", value, "a positive number")
        if self.target_accuracy is not None:
            _require(_is_number(self.target_accuracy) and 0 < self.target_accuracy <= 1, "[run] target_accuracy", self.target_accuracy, "in (0, 1]")
        for key in ("processes", "max_in_flight"):
            value = getattr(self, key)
            _require(_is_int(value) and value >= 1, f"[run] {key}", value, "an integer >= 1")

    @property
    def real_duration_s(self) -> float:
        return self.duration_s * self.time_scale


@dataclass(frozen=True)
class Experiment:
    name: str = "simulation"
    seed: int = 0
    devices: int = 50
    server: Mapping[str, Any] = field(default_factory=lambda: {"strategy": "fedbuff"})
    """The job's settings, checked by the server's JobConfig."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and bool(self.name), "name", self.name, "a non-empty string")
        _require(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _require(_is_int(self.devices) and self.devices >= 1, "devices", self.devices, "an integer >= 1")
        if "id" in self.server:
            raise SimulationConfigError("[server] id is set by the simulator; leave it out")
        if "initial_model" in self.server:
            raise SimulationConfigError("[server] initial_model is made from [model] and seed; leave it out")

    @property
    def secure_aggregation(self) -> bool:
        return bool(self.server.get("secure_aggregation", False))

    @property
    def strategy(self) -> str:
        return str(self.server.get("strategy", "fedbuff"))

    def with_overrides(self, *, devices: int | None = None, seed: int | None = None) -> Experiment:
        from dataclasses import replace

        return replace(self, devices=self.devices if devices is None else devices, seed=self.seed if seed is None else seed)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base_dir: Path | None = None) -> Experiment:
        """Build from the TOML's tables; `base_dir` resolves [fleet] file."""
        values = dict(values)
        sections: dict[str, type[Any]] = {
            "data": DataConfig,
            "model": ModelConfig,
            "training": TrainingConfig,
            "eligibility": EligibilityConfig,
            "run": RunConfig,
        }
        top = {"name", "seed", "devices", "server", "fleet", *sections}
        unknown = sorted(set(values) - top)
        if unknown:
            raise SimulationConfigError(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(top))})")
        built: dict[str, Any] = {}
        for key in ("name", "seed", "devices"):
            if key in values:
                built[key] = values[key]
        if "server" in values:
            built["server"] = _table(values["server"], "server")
        for key, section in sections.items():
            if key in values:
                built[key] = _section(section, _table(values[key], key), key)
        if "fleet" in values:
            fleet = dict(_table(values["fleet"], "fleet"))
            builtin, file = fleet.pop("builtin", None), fleet.pop("file", None)
            if file is not None:
                if not isinstance(file, str):
                    raise SimulationConfigError(f"[fleet] file must be a path, got {file!r}")
                path = Path(file)
                if base_dir is not None and not path.is_absolute():
                    path = base_dir / path
                if not path.exists():
                    raise SimulationConfigError(f"[fleet] file {str(path)!r} does not exist")
                built["fleet"] = FleetConfig(builtin=None, file=path, params=fleet)
            else:
                built["fleet"] = FleetConfig(builtin=builtin if builtin is not None else "heavy_tailed", params=fleet)
        return cls(**built)

    @classmethod
    def from_toml(cls, path: Path) -> Experiment:
        try:
            values = tomllib.loads(path.read_text())
        except OSError as error:
            raise SimulationConfigError(f"cannot read {path}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise SimulationConfigError(f"{path} is not valid TOML: {error}") from None
        return cls.from_mapping(values, base_dir=path.parent)

    def to_mapping(self) -> dict[str, Any]:
        """The experiment as TOML-like tables (for results.json)."""
        out: dict[str, Any] = {"name": self.name, "seed": self.seed, "devices": self.devices, "server": dict(self.server)}
        for key in ("data", "model", "training", "eligibility", "run"):
            section = getattr(self, key)
            out[key] = {f.name: getattr(section, f.name) for f in fields(section)}
        fleet = self.fleet
        out["fleet"] = {"file": str(fleet.file)} if fleet.file is not None else {"builtin": fleet.builtin, **fleet.params}
        return out


def _table(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SimulationConfigError(f"[{key}] must be a table, got {value!r}")
    return value


def _section(cls: type[T], values: Mapping[str, Any], key: str) -> T:
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise SimulationConfigError(f"unknown key(s) in [{key}]: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**values)
