"""Server configuration: frozen dataclasses that validate themselves.

Built once, from `tributary server` flags or a TOML file (both go through
`ServerConfig.from_mapping`, so they accept the same keys), and passed down.
Every error names the bad key or value and what would be accepted.

TOML layout (job keys are flat, like the CLI flags):

    address = "127.0.0.1:50051"
    max_workers = 64

    [[jobs]]
    id = "default"
    initial_model = "model.safetensors"
    strategy = "fedbuff"        # fedasync | fedbuff | fedavg
    buffer_size = 10
    staleness = "polynomial"    # constant | polynomial | hinge
    staleness_a = 0.5
    max_staleness = 50
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

from proto import staleness as staleness_functions
from server.errors import ConfigError

STRATEGIES = ("fedasync", "fedbuff", "fedavg")
STALENESS_KINDS = ("constant", "polynomial", "hinge")
NORMALIZERS = ("count", "weight_sum")
MAX_HEARTBEAT_INTERVAL_S = 3600.0
"""Keeps next_heartbeat_ms (uint32) far from overflowing."""
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(name: str, value: float) -> None:
    if not (_is_number(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class StalenessConfig:
    """s(tau): constant 1; polynomial (1+tau)^-a; hinge 1 if tau<=b else 1/(a(tau-b)+1)."""

    kind: str = "polynomial"
    a: float = 0.5
    b: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in STALENESS_KINDS:
            raise ConfigError(f"staleness must be one of {', '.join(STALENESS_KINDS)}, got {self.kind!r}")
        if self.kind in ("polynomial", "hinge"):
            _positive("staleness_a", self.a)
        if self.kind == "hinge" and not (_is_number(self.b) and self.b >= 0):
            raise ConfigError(f"staleness_b must be >= 0, got {self.b!r}")

    def function(self) -> Callable[[int], float]:
        if self.kind == "constant":
            return staleness_functions.constant
        if self.kind == "polynomial":
            return partial(staleness_functions.polynomial, a=self.a)
        return partial(staleness_functions.hinge, a=self.a, b=self.b)

    def describe(self) -> str:
        if self.kind == "constant":
            return "constant"
        if self.kind == "polynomial":
            return f"polynomial(a={self.a:g})"
        return f"hinge(a={self.a:g}, b={self.b:g})"


@dataclass(frozen=True)
class StrategyConfig:
    """Which aggregation rule a job runs, with its parameters.

    fedasync: x <- x + alpha * s(tau) * delta on each arrival.
    fedbuff:  buffer `buffer_size` updates with w_i = s(tau_i) (* n_i when
              weight_by_samples), then x <- x + server_lr * sum(w_i delta_i) / N,
              N = buffer_size ("count", the FedBuff paper) or sum(w_i) ("weight_sum").
    fedavg:   synchronous rounds: `clients_per_round` distinct clients push a
              delta on the round's version; x <- x + server_lr * sum(n_i delta_i) / sum(n_i).
    """

    name: str = "fedbuff"
    alpha: float = 0.6
    buffer_size: int = 10
    server_lr: float = 1.0
    weight_by_samples: bool = False
    normalizer: str = "count"
    clients_per_round: int = 4

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.name!r}")
        if not (_is_number(self.alpha) and 0 < self.alpha <= 1):
            raise ConfigError(f"alpha must be in (0, 1], got {self.alpha!r}")
        _positive("server_lr", self.server_lr)
        for name in ("buffer_size", "clients_per_round"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.normalizer not in NORMALIZERS:
            raise ConfigError(f"normalizer must be one of {', '.join(NORMALIZERS)}, got {self.normalizer!r}")
        if self.name == "fedbuff" and self.weight_by_samples and self.normalizer == "count":
            raise ConfigError(
                "weight_by_samples with normalizer='count' scales the step by the sample count; "
                "use normalizer='weight_sum' with weight_by_samples"
            )

    @property
    def synchronous(self) -> bool:
        return self.name == "fedavg"


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation in SecAgg+ cohorts (see proto/secagg/protocol.py).

    A cohort of `cohort_size` members (fewer, down to `min_survivors`, when
    no more check in within `forming_timeout_s`) completes when at least
    `min_survivors` members upload and answer unmasking; each member pairs
    with `neighbours` others (None: about 2 log2 n). Members quantize
    [w * delta, w] into Z_2^ring_bits after clipping to +-clip_bound, so
    clip_bound must cover w = s(tau) * n_samples times a delta coordinate."""

    cohort_size: int = 8
    min_survivors: int | None = None
    """t. None: proto.secagg.protocol.default_min_survivors (a majority, and
    n - k + 1 so that the survivors stay connected)."""
    neighbours: int | None = None
    ring_bits: int = 32
    clip_bound: float = 1024.0
    forming_timeout_s: float = 10.0
    phase_timeout_s: float = 30.0
    upload_timeout_s: float = 300.0
    """How long members may train before the cohort uploads without the late ones."""

    def __post_init__(self) -> None:
        from proto.secagg.quantize import FixedPoint

        if not (isinstance(self.cohort_size, int) and not isinstance(self.cohort_size, bool) and self.cohort_size >= 3):
            raise ConfigError(f"cohort_size must be an integer >= 3 (smaller cohorts reveal inputs), got {self.cohort_size!r}")
        if self.min_survivors is not None and not (
            isinstance(self.min_survivors, int) and not isinstance(self.min_survivors, bool) and 2 <= self.min_survivors <= self.cohort_size
        ):
            raise ConfigError(f"min_survivors must be an integer in [2, cohort_size={self.cohort_size}], got {self.min_survivors!r}")
        if self.neighbours is not None and not (isinstance(self.neighbours, int) and 2 <= self.neighbours):
            raise ConfigError(f"neighbours must be an integer >= 2, got {self.neighbours!r}")
        for name in ("clip_bound", "forming_timeout_s", "phase_timeout_s", "upload_timeout_s"):
            _positive(name, getattr(self, name))
        try:
            FixedPoint.for_cohort(bits=self.ring_bits, bound=self.clip_bound, max_summands=self.cohort_size)
        except ValueError as error:
            raise ConfigError(f"ring_bits={self.ring_bits!r}, clip_bound={self.clip_bound!r}: {error}") from error
        majority = self.cohort_size // 2 + 1
        if self.min_survivors is not None and self.min_survivors < majority:
            raise ConfigError(
                f"min_survivors={self.min_survivors} is below a majority of the cohort ({majority}); "
                "fewer survivors than that would let the secrets of members be rebuilt by a minority"
            )

    @property
    def _neighbour_count(self) -> int:
        from proto.secagg.protocol import default_neighbour_count

        return min(self.cohort_size - 1, self.neighbours or default_neighbour_count(self.cohort_size))

    def survivors_needed_for(self, cohort_size: int) -> int:
        """t for a cohort of `cohort_size` members (smaller than configured when
        it formed on the forming timeout)."""
        from proto.secagg.protocol import default_min_survivors, default_neighbour_count

        if self.min_survivors is not None:
            return min(self.min_survivors, cohort_size)
        neighbours = min(cohort_size - 1, self.neighbours or default_neighbour_count(cohort_size))
        return default_min_survivors(cohort_size, neighbours)

    @property
    def survivors_needed(self) -> int:
        """t: explicit, or see proto.secagg.protocol.default_min_survivors."""
        return self.survivors_needed_for(self.cohort_size)


_SECAGG_KEYS = {f.name for f in fields(SecAggConfig)}


@dataclass(frozen=True)
class JobConfig:
    job_id: str = "default"
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    max_staleness: int | None = None
    """Updates more than this many versions stale are rejected; None: no bound."""
    max_update_bytes: int = 2 << 30
    """Largest update payload accepted (RESOURCE_EXHAUSTED above it)."""
    idempotency_window: int = 100_000
    """How many recent idempotency keys (and their acks) a job remembers."""
    initial_model: Path | None = None
    secure_aggregation: SecAggConfig | None = None
    heartbeat_interval_s: float = 10.0
    """How often clients are asked to send a heartbeat (the ack's next_heartbeat_ms)."""
    roster_expiry_s: float = 300.0
    """Clients not heard from for this long are dropped from the job's roster."""
    roster_max_clients: int = 100_000
    """Most clients a job's roster tracks; a new client beyond it is refused (RESOURCE_EXHAUSTED)."""

    def __post_init__(self) -> None:
        if self.secure_aggregation is not None and self.strategy.name != "fedbuff":
            raise ConfigError(
                f"secure aggregation runs with strategy 'fedbuff' (each cohort is one buffered aggregate); "
                f"{self.strategy.name!r} would need the server to read individual updates"
            )
        if not isinstance(self.job_id, str) or not _JOB_ID.match(self.job_id):
            raise ConfigError(
                f"job id {self.job_id!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
            )
        if self.max_staleness is not None and not (
            isinstance(self.max_staleness, int) and not isinstance(self.max_staleness, bool) and self.max_staleness >= 0
        ):
            raise ConfigError(f"max_staleness must be an integer >= 0, got {self.max_staleness!r}")
        for name in ("max_update_bytes", "idempotency_window", "roster_max_clients"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("heartbeat_interval_s", "roster_expiry_s"):
            _positive(name, getattr(self, name))
        if self.heartbeat_interval_s > MAX_HEARTBEAT_INTERVAL_S:
            raise ConfigError(
                f"heartbeat_interval_s must be at most {MAX_HEARTBEAT_INTERVAL_S:g} s, got {self.heartbeat_interval_s!r}"
            )
        if self.roster_expiry_s < 2 * self.heartbeat_interval_s:
            raise ConfigError(
                f"roster_expiry_s={self.roster_expiry_s!r} must be at least twice heartbeat_interval_s="
                f"{self.heartbeat_interval_s!r}, or a client that misses one heartbeat is forgotten"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> JobConfig:
        """Build from flat keys (TOML `[[jobs]]` table or CLI flags)."""
        strategy_keys = {f.name for f in fields(StrategyConfig)} - {"name"}
        values = dict(values)
        job: dict[str, Any] = {}
        strategy: dict[str, Any] = {}
        staleness: dict[str, Any] = {}
        secagg: dict[str, Any] = {}
        secure = bool(values.pop("secure_aggregation", False))
        for key, value in values.items():
            if value is None:
                continue
            if key == "id":
                job["job_id"] = value
            elif key == "strategy":
                strategy["name"] = value
            elif key in strategy_keys:
                strategy[key] = value
            elif key == "staleness":
                staleness["kind"] = value
            elif key in ("staleness_a", "staleness_b"):
                if not _is_number(value):
                    raise ConfigError(f"{key} must be a number, got {value!r}")
                staleness[key.removeprefix("staleness_")] = float(value)
            elif key in ("max_staleness", "max_update_bytes", "idempotency_window", "heartbeat_interval_s", "roster_expiry_s", "roster_max_clients"):
                job[key] = value
            elif key == "initial_model":
                job[key] = Path(value)
            elif key in _SECAGG_KEYS:
                secagg[key] = value
            else:
                raise ConfigError(f"unknown job setting {key!r}")
        if secagg and not secure:
            raise ConfigError(f"{', '.join(sorted(secagg))} only apply with secure_aggregation = true")
        if secure:
            job["secure_aggregation"] = SecAggConfig(**secagg)
        return cls(strategy=StrategyConfig(**strategy), staleness=StalenessConfig(**staleness), **job)


@dataclass(frozen=True)
class ServerConfig:
    address: str = "127.0.0.1:50051"
    """host:port to listen on; port 0 picks a free one (the bound port is reported)."""
    max_workers: int = 256
    """Threads serving RPCs; each open stream (push, pull, long-poll) holds one."""
    jobs: tuple[JobConfig, ...] = (JobConfig(),)

    def __post_init__(self) -> None:
        if not isinstance(self.address, str):
            raise ConfigError(f"address must be a \"host:port\" string, got {self.address!r}")
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"address must be host:port, got {self.address!r}")
        if not (isinstance(self.max_workers, int) and not isinstance(self.max_workers, bool) and self.max_workers >= 2):
            raise ConfigError(f"max_workers must be an integer >= 2, got {self.max_workers!r}")
        if not self.jobs:
            raise ConfigError("the server needs at least one job")
        for job in self.jobs:
            if job.secure_aggregation is not None and job.secure_aggregation.cohort_size >= self.max_workers:
                raise ConfigError(
                    f"job {job.job_id!r}: cohort_size={job.secure_aggregation.cohort_size} needs more than "
                    f"max_workers={self.max_workers} RPC threads (each member waiting on its cohort holds one); "
                    "raise max_workers"
                )
            if job.strategy.synchronous and job.strategy.clients_per_round >= self.max_workers:
                raise ConfigError(
                    f"job {job.job_id!r}: clients_per_round={job.strategy.clients_per_round} needs more than "
                    f"max_workers={self.max_workers} RPC threads (each client waiting for a round holds one); "
                    "raise max_workers"
                )
        ids = [job.job_id for job in self.jobs]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ConfigError(f"job ids must be unique; repeated: {', '.join(duplicates)}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ServerConfig:
        values = dict(values)
        jobs = values.pop("jobs", None)
        unknown = set(values) - {"address", "max_workers"}
        if unknown:
            raise ConfigError(f"unknown server setting(s): {', '.join(sorted(unknown))}")
        if jobs is None:
            jobs = [{}]
        if not isinstance(jobs, list):
            raise ConfigError("jobs must be a list of tables ([[jobs]] in TOML)")
        return cls(
            **{k: v for k, v in values.items() if v is not None},
            jobs=tuple(JobConfig.from_mapping(job) for job in jobs),
        )

    @classmethod
    def from_toml(cls, path: Path) -> ServerConfig:
        try:
            values = tomllib.loads(Path(path).read_text())
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from error
        base = Path(path).resolve().parent
        for job in values.get("jobs", []) if isinstance(values.get("jobs"), list) else []:
            if isinstance(job, dict) and "initial_model" in job:
                job["initial_model"] = base / job["initial_model"]
        return cls.from_mapping(values)
