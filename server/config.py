"""Server configuration: frozen dataclasses that validate themselves.

Built once, from `tributary server` flags or a TOML file (both go through
`ServerConfig.from_mapping`, so they accept the same keys), and passed down.
Every error names the bad key or value and what would be accepted.

TOML layout (job keys are flat, like the CLI flags):

    address = "127.0.0.1:50051"
    max_workers = 64
    insecure = true             # or a [tls] table: plaintext must be asked for

    [tls]
    cert = "certs/server.pem"   # paths are relative to the TOML file
    key = "certs/server.key"
    client_ca = "certs/ca.pem"  # optional: require client certificates (mTLS)
    state_dir = "state"         # relative to the file
    auth = true                 # enrolled clients only (needs state_dir)
    max_concurrent_streams = 48     # limits: see server/limits.py
    rate_limit_per_s = 2.0
    stream_timeout_s = 600

    [[jobs]]
    id = "default"
    initial_model = "model.safetensors"
    strategy = "fedbuff"        # fedasync | fedbuff | fedavg
    buffer_size = 10
    staleness = "polynomial"    # constant | polynomial | hinge
    staleness_a = 0.5
    max_staleness = 50
    max_concurrent_trainers = 100   # training slots (server/scheduling.py)
    prefer_charging = true
    evaluator = "edge.tasks:digits_evaluator"   # server-side evaluation (server/evaluation.py)
    evaluate_every = 1
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proto import staleness as staleness_functions
from server.errors import ConfigError

if TYPE_CHECKING:
    from proto.secagg.quantize import FixedPoint
    from server.certs import ServerTLSMaterial

STRATEGIES = ("fedasync", "fedbuff", "fedavg")
STALENESS_KINDS = ("constant", "polynomial", "hinge")
NORMALIZERS = ("count", "weight_sum")
MAX_HEARTBEAT_INTERVAL_S = 3600.0
"""Keeps next_heartbeat_ms (uint32) far from overflowing."""
MAX_KEEP_VERSIONS_FOR_RESUME = 100
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


SECURE_QUANTIZE_BITS = (4, 8)


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
    quantize_bits: int | None = None
    """Quantized cohorts (4 or 8): each member's w * delta values get 2^bits - 1
    levels over +-value_bound, its weight as many over +-clip_bound; the ring is
    then bits + ceil(log2 n) + 1 wide (ring_bits is not used) and masked inputs
    travel as uint8 or uint16. None: full ring_bits precision."""
    value_bound: float | None = None
    """Quantized cohorts: clip each w * delta value to +-this (None: clip_bound)."""

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
        if self.quantize_bits is not None:
            if isinstance(self.quantize_bits, bool) or self.quantize_bits not in SECURE_QUANTIZE_BITS:
                raise ConfigError(f"quantize_bits must be one of {', '.join(map(str, SECURE_QUANTIZE_BITS))}, got {self.quantize_bits!r}")
            if self.ring_bits != 32:
                raise ConfigError(
                    f"ring_bits={self.ring_bits!r} with quantize_bits={self.quantize_bits}: quantized cohorts size their "
                    "ring from quantize_bits and the cohort size; drop ring_bits"
                )
            if self.value_bound is not None:
                _positive("value_bound", self.value_bound)
        elif self.value_bound is not None:
            raise ConfigError(f"value_bound={self.value_bound!r} only applies with quantize_bits (quantized cohorts)")
        else:
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

    def fixed_points(self, members: int) -> tuple[FixedPoint, FixedPoint | None]:
        """(values, weight) fixed points of a cohort of `members`; the weight's
        is None when it shares the values' (unquantized cohorts)."""
        from proto.secagg.quantize import FixedPoint

        if self.quantize_bits is None:
            return FixedPoint.for_cohort(bits=self.ring_bits, bound=self.clip_bound, max_summands=members), None
        values = FixedPoint.for_values(value_bits=self.quantize_bits, bound=self.value_bound or self.clip_bound, max_summands=members)
        weight = FixedPoint.for_values(value_bits=self.quantize_bits, bound=self.clip_bound, max_summands=members)
        return values, weight

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
COMPRESSION_KINDS = ("quantize", "top_k")
"""Update encodings a plaintext job may take (accept_compression)."""
SERVER_KEYS = frozenset(
    {
        "address", "max_workers", "insecure", "state_dir", "grace_period_s", "auth", "admin_token_file",
        "max_concurrent_streams", "rate_limit_per_s", "rate_limit_burst", "stream_timeout_s", "stream_idle_timeout_s",
        "checkpoint_every", "keep_checkpoints", "keep_log_entries", "resume_budget_bytes", "resume_expiry_s",
        "http_address",
    }
)  # fmt: skip
"""Server-level keys besides the [tls] table (TOML top level; CLI flags that also apply with --config)."""


def _compression_list(value: object) -> tuple[str, ...]:
    """A TOML list, or the CLI's comma-separated string ("none": nothing)."""
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
        return () if items == ["none"] else tuple(items)
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ConfigError(f"accept_compression must be a list of {', '.join(COMPRESSION_KINDS)}, got {value!r}")


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
    max_concurrent_trainers: int | None = None
    """Training slots (server/scheduling.py): clients that may train at once; None: no slots,
    clients train and push whenever they like."""
    prefer_charging: bool = False
    """With slots: when they are scarce, charging devices get them first."""
    min_battery: float | None = None
    """With slots: turn away devices on battery below this charge (in [0, 1])."""
    slot_lease_s: float = 120.0
    """With slots: a slot lapses this long after it was granted or last renewed by a heartbeat."""
    accept_compression: tuple[str, ...] | None = None
    """Compressed pushes the job takes ("quantize", "top_k"); None: both in
    plaintext jobs. Secure-aggregation jobs take no plain pushes: their cohorts
    quantize with secure_aggregation.quantize_bits, and top-k never composes."""
    keep_versions_for_resume: int = 2
    """Published versions kept, besides the current one, for pulls cut off
    mid-stream to resume from (each is a whole model in memory)."""
    evaluator: str | None = None
    """"module:function" of a server-side evaluator (server/evaluation.py): called
    with a version's tensors, returns metrics such as {"accuracy": 0.93}; None: none."""
    evaluate_every: int = 1
    """With an evaluator: evaluate a version at least this many versions after the
    last one evaluated (the newest then; versions published meanwhile are skipped)."""

    def __post_init__(self) -> None:
        self._check_evaluator()
        if self.secure_aggregation is not None and self.strategy.name != "fedbuff":
            raise ConfigError(
                f"secure aggregation runs with strategy 'fedbuff' (each cohort is one buffered aggregate); "
                f"{self.strategy.name!r} would need the server to read individual updates"
            )
        if self.accept_compression is not None:
            unknown = [k for k in self.accept_compression if k not in COMPRESSION_KINDS]
            if unknown or not isinstance(self.accept_compression, tuple):
                raise ConfigError(
                    f"accept_compression must list some of {', '.join(COMPRESSION_KINDS)} (or none), got {self.accept_compression!r}"
                )
            if self.secure_aggregation is not None and "top_k" in self.accept_compression:
                raise ConfigError(
                    "accept_compression='top_k' cannot work with secure aggregation: masking makes every coordinate "
                    "non-zero and members' sparse supports differ, so nothing would be saved and the sum would break; "
                    "use quantize_bits for quantized cohorts"
                )
            if self.secure_aggregation is not None and self.accept_compression:
                raise ConfigError(
                    "accept_compression applies to plain pushes, which a secure-aggregation job never takes; "
                    "set quantize_bits for quantized cohorts instead"
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
        if not (_is_int(self.keep_versions_for_resume) and 0 <= self.keep_versions_for_resume <= MAX_KEEP_VERSIONS_FOR_RESUME):
            raise ConfigError(
                f"keep_versions_for_resume must be an integer from 0 to {MAX_KEEP_VERSIONS_FOR_RESUME} "
                f"(each kept version is a whole model in memory), got {self.keep_versions_for_resume!r}"
            )
        for name in ("heartbeat_interval_s", "roster_expiry_s"):
            _positive(name, getattr(self, name))
        if self.heartbeat_interval_s > MAX_HEARTBEAT_INTERVAL_S:
            raise ConfigError(
                f"heartbeat_interval_s must be at most {MAX_HEARTBEAT_INTERVAL_S:g} s, got {self.heartbeat_interval_s!r}"
            )
        self._check_slots()
        if self.roster_expiry_s < 2 * self.heartbeat_interval_s:
            raise ConfigError(
                f"roster_expiry_s={self.roster_expiry_s!r} must be at least twice heartbeat_interval_s="
                f"{self.heartbeat_interval_s!r}, or a client that misses one heartbeat is forgotten"
            )

    def _check_evaluator(self) -> None:
        if self.evaluator is not None:
            module, sep, function = self.evaluator.partition(":") if isinstance(self.evaluator, str) else ("", "", "")
            if not (sep and _DOTTED.match(module) and _DOTTED.match(function)):
                raise ConfigError(
                    f"job {self.job_id!r}: evaluator (--evaluator) must be \"module:function\" (e.g. \"edge.tasks:digits_evaluator\"), "
                    f"got {self.evaluator!r}"
                )
        if not (_is_int(self.evaluate_every) and self.evaluate_every >= 1):
            raise ConfigError(f"job {self.job_id!r}: evaluate_every (--evaluate-every) must be an integer >= 1 (versions), got {self.evaluate_every!r}")
        if self.evaluate_every != 1 and self.evaluator is None:
            raise ConfigError(f"job {self.job_id!r}: evaluate_every (--evaluate-every) only applies with an evaluator: set evaluator (--evaluator) too")

    def _check_slots(self) -> None:
        cap = self.max_concurrent_trainers
        if cap is None:
            for name, unset in (("prefer_charging", False), ("min_battery", None)):
                if getattr(self, name) != unset:
                    raise ConfigError(f"{name} only applies with training slots: set max_concurrent_trainers too")
            return
        if not (_is_int(cap) and cap >= 1):
            raise ConfigError(f"max_concurrent_trainers must be an integer >= 1, got {cap!r}")
        if not isinstance(self.prefer_charging, bool):
            raise ConfigError(f"prefer_charging must be true or false, got {self.prefer_charging!r}")
        if self.min_battery is not None and not (_is_number(self.min_battery) and 0 <= self.min_battery <= 1):
            raise ConfigError(f"min_battery must be a number in [0, 1], got {self.min_battery!r}")
        _positive("slot_lease_s", self.slot_lease_s)
        if self.slot_lease_s < 2 * self.heartbeat_interval_s:
            raise ConfigError(
                f"slot_lease_s={self.slot_lease_s!r} must be at least twice heartbeat_interval_s="
                f"{self.heartbeat_interval_s!r}, or a training client that misses one heartbeat loses its slot"
            )
        if self.secure_aggregation is not None and cap < self.secure_aggregation.cohort_size:
            raise ConfigError(
                f"max_concurrent_trainers={cap} is below cohort_size={self.secure_aggregation.cohort_size}: "
                "cohort members join holding a slot, so no cohort could form; raise max_concurrent_trainers"
            )
    @property
    def compression(self) -> frozenset[str]:
        """The encodings plain pushes to this job may use."""
        if self.secure_aggregation is not None:
            return frozenset()
        return frozenset(COMPRESSION_KINDS if self.accept_compression is None else self.accept_compression)

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
            elif key in (
                "max_staleness", "max_update_bytes", "idempotency_window", "heartbeat_interval_s", "roster_expiry_s", "roster_max_clients",
                "max_concurrent_trainers", "prefer_charging", "min_battery", "slot_lease_s", "keep_versions_for_resume",
                "evaluator", "evaluate_every",
            ):  # fmt: skip
                job[key] = value
            elif key == "initial_model":
                job[key] = Path(value)
            elif key == "accept_compression":
                job[key] = _compression_list(value)
            elif key in _SECAGG_KEYS:
                secagg[key] = value
            else:
                raise ConfigError(f"unknown job setting {key!r}")
        if secagg and not secure:
            raise ConfigError(f"{', '.join(sorted(secagg))} only apply with secure_aggregation = true")
        if secure:
            job["secure_aggregation"] = SecAggConfig(**secagg)
        if "slot_lease_s" in job and job.get("max_concurrent_trainers") is None:
            raise ConfigError("slot_lease_s only applies with training slots: set max_concurrent_trainers too")
        return cls(strategy=StrategyConfig(**strategy), staleness=StalenessConfig(**staleness), **job)


@dataclass(frozen=True)
class RetentionConfig:
    """What the state directory keeps (see server/store.py)."""

    checkpoint_every: int = 10
    """Write a checkpoint every this many versions (and at shutdown)."""
    keep_checkpoints: int = 3
    """Checkpoints kept per job; 0 keeps every one."""
    keep_log_entries: int = 1_000_000
    """Update metadata rows (key, client, versions) kept per job; acks of
    retried pushes are answered from them, so keep at least idempotency_window."""

    def __post_init__(self) -> None:
        for name, least in (("checkpoint_every", 1), ("keep_checkpoints", 0), ("keep_log_entries", 1)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
                raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")


_RETENTION_KEYS = {f.name for f in fields(RetentionConfig)}


@dataclass(frozen=True)
class TLSConfig:
    """The server's TLS files (PEM). With `client_ca_file`, clients must present a
    certificate signed by that CA (mutual TLS); without it, any client may connect.

    The files are read and checked when the config is built, so a missing file,
    a file that is not PEM, or a key that does not belong to the certificate
    stops the server before it listens, with the file named."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def __post_init__(self) -> None:
        for name in ("cert_file", "key_file", "client_ca_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                raise ConfigError(f"tls {name} must be a path, got {value!r}")
        self.read()

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def read(self) -> ServerTLSMaterial:
        """The files' contents, checked (ConfigError naming the file otherwise)."""
        from server.certs import CertificateError, read_server_files

        try:
            return read_server_files(self.cert_file, self.key_file, self.client_ca_file)
        except CertificateError as error:
            raise ConfigError(str(error)) from error

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TLSConfig:
        """From a TOML `[tls]` table or the --tls-* flags: cert, key, client_ca."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"tls must be a table with cert, key and client_ca ([tls] in TOML), got {values!r}")
        unknown = set(values) - set(_TLS_KEYS)
        if unknown:
            raise ConfigError(f"unknown tls setting(s): {', '.join(sorted(unknown))} (known: {', '.join(_TLS_KEYS)})")
        given = {key: value for key, value in values.items() if value is not None}
        missing = [key for key in ("cert", "key") if key not in given]
        if missing:
            raise ConfigError(
                f"TLS needs both a certificate and its key; tls.{missing[0]} is missing: "
                "give --tls-cert FILE and --tls-key FILE (cert and key in the TOML [tls] table)"
            )
        for key, value in given.items():
            if not isinstance(value, (str, Path)) or not str(value):
                raise ConfigError(f"tls.{key} must be a file path, got {value!r}")
        client_ca = given.get("client_ca")
        return cls(Path(given["cert"]), Path(given["key"]), Path(client_ca) if client_ca is not None else None)


_TLS_KEYS = ("cert", "key", "client_ca")
PLAINTEXT_HINT = (
    "give --tls-cert FILE --tls-key FILE (and --tls-client-ca FILE to require client certificates; "
    "TOML: a [tls] table with cert, key, client_ca), or --insecure (TOML: insecure = true) to serve "
    "plaintext on a network you trust; `tributary certs DIR` makes the files"
)


def _check_http_address(address: object) -> None:
    if not isinstance(address, str):
        raise ConfigError(f"http_address (--http-address) must be a \"host:port\" string, got {address!r}")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"http_address (--http-address) must be host:port (port 0 picks a free one), got {address!r}")


@dataclass(frozen=True)
class ServerConfig:
    address: str = "127.0.0.1:50051"
    """host:port to listen on; port 0 picks a free one (the bound port is reported)."""
    max_workers: int = 256
    """Threads serving RPCs; each open stream (push, pull, long-poll) holds one."""
    jobs: tuple[JobConfig, ...] = (JobConfig(),)
    state_dir: Path | None = None
    """Where jobs, the update log and checkpoints live (server/store.py);
    None keeps everything in memory and loses it when the process ends."""
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    grace_period_s: float = 10.0
    """On SIGTERM: how long in-flight RPCs may run before they are cancelled."""
    tls: TLSConfig | None = None
    """Serve TLS (mutual TLS with tls.client_ca_file); exactly one of tls and insecure is set."""
    insecure: bool = False
    """Serve plaintext: only when asked for, on a network that is trusted anyway."""

    auth: bool = False
    """Serve only enrolled clients, each with a bearer token, in the jobs it is
    enrolled in; adds the Admin service. Needs state_dir (the registry lives there)."""
    admin_token_file: Path | None = None
    """File holding the admin token; None: `<state_dir>/admin.token`, generated at first start."""
    max_concurrent_streams: int | None = None
    """Streams and long waits in flight at once (server/limits.py says which
    RPCs count); more are refused with RESOURCE_EXHAUSTED. None: see `stream_limit`."""
    rate_limit_per_s: float | None = None
    """Requests a second each client id may make to Push and JoinCohort; None: no limit."""
    rate_limit_burst: int | None = None
    """Requests a client may save up; None: one second's worth (at least 1)."""
    stream_timeout_s: float = 600.0
    """Longest a stream may stay open, from its first message."""
    stream_idle_timeout_s: float = 60.0
    """Longest a stream may go without a message before it is cut off."""
    resume_budget_bytes: int = 1 << 30
    """Bytes of interrupted pushes kept, across all jobs, for their clients to
    resume (server/uploads.py); the oldest are dropped first. 0: none are kept."""
    resume_expiry_s: float = 600.0
    """An interrupted push is dropped this long after its last byte arrived."""
    http_address: str | None = None
    """host:port of the HTTP endpoint (server/http.py: /metrics, the dashboard);
    port 0 picks a free one; None: no HTTP endpoint."""

    def __post_init__(self) -> None:
        if self.state_dir is not None and not isinstance(self.state_dir, Path):
            object.__setattr__(self, "state_dir", Path(self.state_dir))
        if not (_is_number(self.grace_period_s) and self.grace_period_s >= 0):
            raise ConfigError(f"grace_period_s must be a number >= 0, got {self.grace_period_s!r}")
        for job in self.jobs:
            if self.state_dir is not None and self.retention.keep_log_entries < job.idempotency_window:
                raise ConfigError(
                    f"keep_log_entries={self.retention.keep_log_entries} is below the idempotency_window="
                    f"{job.idempotency_window} of job {job.job_id!r}: retried pushes could be counted twice after a restart"
                )
        if not isinstance(self.auth, bool):
            raise ConfigError(f"auth must be true or false, got {self.auth!r}")
        for name in ("state_dir", "admin_token_file"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), Path):
                raise ConfigError(f"{name} must be a path, got {getattr(self, name)!r}")
        if self.auth and self.state_dir is None:
            raise ConfigError(
                "auth (--auth) needs state_dir (--state-dir): the enrolled clients are kept in <state_dir>/tributary.db"
            )
        if self.admin_token_file is not None and not self.auth:
            raise ConfigError("admin_token_file (--admin-token-file) only applies with auth (--auth)")
        if not isinstance(self.address, str):
            raise ConfigError(f"address must be a \"host:port\" string, got {self.address!r}")
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"address must be host:port, got {self.address!r}")
        if not (isinstance(self.max_workers, int) and not isinstance(self.max_workers, bool) and self.max_workers >= 2):
            raise ConfigError(f"max_workers must be an integer >= 2, got {self.max_workers!r}")
        self._check_limits()
        if self.http_address is not None:
            _check_http_address(self.http_address)
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
            if job.secure_aggregation is not None and job.secure_aggregation.cohort_size > self.stream_limit:
                raise ConfigError(
                    f"job {job.job_id!r}: cohort_size={job.secure_aggregation.cohort_size} members must wait in "
                    f"JoinCohort at once for a cohort to form, above max_concurrent_streams={self.stream_limit}; "
                    "raise max_concurrent_streams (or max_workers)"
                )
        ids = [job.job_id for job in self.jobs]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ConfigError(f"job ids must be unique; repeated: {', '.join(duplicates)}")
        if self.tls is not None and not isinstance(self.tls, TLSConfig):
            raise ConfigError(f"tls must be a TLSConfig, got {self.tls!r}")
        if not isinstance(self.insecure, bool):
            raise ConfigError(f"insecure must be true or false, got {self.insecure!r}")
        if self.tls is None and not self.insecure:
            raise ConfigError(f"the server serves TLS unless plaintext is asked for: {PLAINTEXT_HINT}")
        if self.tls is not None and self.insecure:
            raise ConfigError(
                "TLS files and insecure exclude each other: drop --insecure (insecure = true) to serve TLS, "
                "or the --tls-* flags ([tls] table) to serve plaintext"
            )

    def _check_limits(self) -> None:
        streams = self.max_concurrent_streams
        if streams is not None and not (_is_int(streams) and 1 <= streams < self.max_workers):
            raise ConfigError(
                f"max_concurrent_streams must be an integer from 1 to max_workers - 1 = {self.max_workers - 1} "
                f"(threads must stay free for quick calls and cohort steps), got {streams!r}; "
                "lower it or raise max_workers"
            )
        if self.rate_limit_per_s is not None:
            _positive("rate_limit_per_s", self.rate_limit_per_s)
        if self.rate_limit_burst is not None:
            if self.rate_limit_per_s is None:
                raise ConfigError("rate_limit_burst only applies with rate_limit_per_s")
            if not (_is_int(self.rate_limit_burst) and self.rate_limit_burst >= 1):
                raise ConfigError(f"rate_limit_burst must be an integer >= 1, got {self.rate_limit_burst!r}")
        _positive("stream_timeout_s", self.stream_timeout_s)
        _positive("stream_idle_timeout_s", self.stream_idle_timeout_s)
        if not (_is_int(self.resume_budget_bytes) and self.resume_budget_bytes >= 0):
            raise ConfigError(f"resume_budget_bytes must be an integer >= 0 (0 keeps no interrupted push), got {self.resume_budget_bytes!r}")
        _positive("resume_expiry_s", self.resume_expiry_s)

    @property
    def stream_limit(self) -> int:
        """max_concurrent_streams, or by default max_workers - 16 (half of them
        for small pools), leaving threads for quick calls and cohort steps."""
        if self.max_concurrent_streams is not None:
            return self.max_concurrent_streams
        return max(self.max_workers // 2, self.max_workers - 16)

    @property
    def rate_burst(self) -> int:
        """rate_limit_burst, or one second's worth of requests (at least 1)."""
        if self.rate_limit_burst is not None:
            return self.rate_limit_burst
        return max(1, math.ceil(self.rate_limit_per_s or 1.0))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ServerConfig:
        """Build from the TOML top level or the server flags: address, max_workers,
        insecure, tls (a mapping, see TLSConfig.from_mapping) and jobs."""
        values = dict(values)
        jobs = values.pop("jobs", None)
        tls = values.pop("tls", None)
        retention = {k: values.pop(k) for k in list(values) if k in _RETENTION_KEYS and values[k] is not None}
        unknown = set(values) - SERVER_KEYS
        if unknown:
            raise ConfigError(f"unknown server setting(s): {', '.join(sorted(unknown))}")
        for key in ("state_dir", "admin_token_file"):
            if isinstance(values.get(key), str):
                values[key] = Path(values[key])
        if jobs is None:
            jobs = [{}]
        if not isinstance(jobs, list):
            raise ConfigError("jobs must be a list of tables ([[jobs]] in TOML)")
        if values.get("state_dir") is not None:
            if not isinstance(values["state_dir"], (str, Path)) or not str(values["state_dir"]):
                raise ConfigError(f"state_dir must be a directory path, got {values['state_dir']!r}")
            values["state_dir"] = Path(values["state_dir"])
        built_jobs = tuple(JobConfig.from_mapping(job) for job in jobs)
        return cls(
            **{k: v for k, v in values.items() if v is not None},
            jobs=built_jobs,
            tls=TLSConfig.from_mapping(tls) if tls is not None else None,
            retention=RetentionConfig(**retention),
        )

    @classmethod
    def from_toml(cls, path: Path, overrides: Mapping[str, Any] | None = None) -> ServerConfig:
        """Read a TOML file (paths in it are relative to it); `overrides` replace
        its top-level keys (command-line flags, paths relative to the working directory)."""
        try:
            values = tomllib.loads(Path(path).read_text())
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from error
        base = Path(path).resolve().parent
        if isinstance(values.get("state_dir"), str):
            values["state_dir"] = base / values["state_dir"]
        for job in values.get("jobs", []) if isinstance(values.get("jobs"), list) else []:
            if isinstance(job, dict) and "initial_model" in job:
                job["initial_model"] = base / job["initial_model"]
        for key in ("admin_token_file",):
            if isinstance(values.get(key), str):
                values[key] = base / values[key]
        tls = values.get("tls")
        if isinstance(tls, dict):
            values["tls"] = {key: base / value if key in _TLS_KEYS and isinstance(value, str) else value for key, value in tls.items()}
        values.update(overrides or {})
        return cls.from_mapping(values)
