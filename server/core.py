"""Jobs, immutable model snapshots and update admission. No gRPC here.

A `Job` holds the current `ModelSnapshot` and a strategy. Pushing is two steps
so that bad updates are refused before their payload is read:

  admit(header)   checks the header against the model and the job's rules
                  (names, shapes, dtypes, size, version, staleness, idempotency)
  submit(update)  checks the values (NaN/Inf) outside the lock, then under the
                  lock re-checks what may have moved while the payload streamed
                  in (version, staleness, the idempotency key), hands the update
                  to the strategy and, if the strategy returns a new model,
                  publishes it as the next snapshot.

Snapshots are never modified after they are built: a puller holds a reference
to one and streams it while new versions are published beside it, so a pull
never waits for, nor sees, a half-applied aggregate.

With a state directory, a `Journal` (server/store.py) makes each accepted
update durable before it is applied and acknowledged, and `replay_update` /
`replay_cohort` rebuild a job from that log after a crash by running the very
code path the updates first took, so the rebuilt model is bit-identical.

Heartbeats go to the job's `Roster` (server/roster.py), which has its own lock,
so a busy roster never waits on aggregation nor the other way round. Training
slots (server/scheduling.py, jobs with max_concurrent_trainers) are the same.

Energy: each update carries the client's estimate of what it cost (joules).
The energy of the updates that go into version v is recorded with v (in the
versions table of the state directory, so it survives restarts); updates
waiting in a buffer or an open round count as pending until their version.

Lock order: Job._lock, then the journal's own lock; the journal never calls
back into the job. Job._lock and Roster._lock are never held together;
TrainingSlots._lock is a leaf (taken with or without Job._lock).
"""

from __future__ import annotations

import collections
import logging
import math
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

from proto.compression import RAW, Encoding, encoded_size
from proto.logcontext import log_context
from proto.tensors import CHUNK_BYTES, TensorSpec, iter_chunks, specs_of
from server import faults
from server.config import JobConfig, ServerConfig
from server.errors import (
    StateError,
    IdempotencyConflict,
    PreconditionFailed,
    InvalidUpdate,
    JobNotFound,
    LimitExceeded,
    StaleUpdate,
    UnknownVersion,
)
from server.federated import PREFIX as FEDERATED_PREFIX
from server.federated import EvaluationReport, FederatedEvaluations, ReportOutcome, check_report
from server.roster import ClientState, Roster
from server.scheduling import DeviceReport, SlotDecision, SlotPolicy, TrainingSlots
from server.strategies import Strategy, all_finite, build_strategy

T = TypeVar("T")
logger = logging.getLogger("tributary.server")

_FLOAT_KINDS = "f"
VERSION_LOG_LENGTH = 10_000
LOG_VERSIONS_EVERY_S = 10.0
"""Published versions are logged at INFO at most this often per job (each one at DEBUG)."""
RECENT_REJECTIONS = 200
"""Refused pushes JobStats.recent_rejections keeps."""
MAX_REJECTION_TEXT = 300
MAX_SHOWN_CLIENT_ID = 128
"""Characters of a refused push's client id JobStats.recent_rejections keeps (the longest id accepted)."""
MAX_NUM_SAMPLES = 1 << 32
"""Bounds sample weights, so float64 aggregation buffers cannot overflow."""
MAX_ENERGY_JOULES = 1e12
"""Far above any one update (a phone battery holds ~5e4 J), so sums stay finite and meaningful."""


def check_energy(energy_joules: float) -> None:
    """Refuse an energy report that is not a finite number of joules >= 0."""
    if not (math.isfinite(energy_joules) and 0.0 <= energy_joules <= MAX_ENERGY_JOULES):
        raise InvalidUpdate(
            f"energy_joules must be a finite number of joules from 0 to {MAX_ENERGY_JOULES:g}, got {energy_joules!r}; "
            "nothing was applied"
        )


class ModelSnapshot:
    """One published version. It takes ownership of the arrays it is given
    (the strategies hand over freshly computed ones, so publishing copies
    nothing) and marks them read-only."""

    def __init__(self, version: int, specs: Sequence[TensorSpec], tensors: Mapping[str, np.ndarray]) -> None:
        self.version = version
        self.specs = tuple(specs)
        self.created_at = time.time()
        owned: dict[str, np.ndarray] = {}
        for spec in self.specs:
            array = np.asarray(tensors[spec.name], dtype=spec.dtype, order="C")
            _freeze(array)
            owned[spec.name] = array.view()  # a view of a read-only base cannot be made writeable again
        self.tensors: Mapping[str, np.ndarray] = types.MappingProxyType(owned)

    @property
    def payload_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs)

    @classmethod
    def copy_of(cls, version: int, specs: Sequence[TensorSpec], tensors: Mapping[str, np.ndarray]) -> ModelSnapshot:
        """A snapshot of arrays the caller keeps (and might change later)."""
        return cls(version, specs, {name: np.array(array, copy=True) for name, array in tensors.items()})

    def chunks(self, chunk_bytes: int = CHUNK_BYTES, start: int = 0) -> Iterator[bytes]:
        """The payload in chunks, from byte `start` (a resumed pull)."""
        return iter_chunks(self.tensors.values(), chunk_bytes, start)


def _freeze(array: np.ndarray) -> None:
    """Read-only down to the array that owns the memory, so no view of it
    (ours or anyone's) can be switched back to writeable."""
    chain = [array]
    while isinstance(chain[-1].base, np.ndarray):
        chain.append(chain[-1].base)
    for link in reversed(chain):
        link.flags.writeable = False


@dataclass(frozen=True)
class UpdateHeader:
    job_id: str
    client_id: str
    idempotency_key: str
    base_version: int
    num_samples: int
    specs: tuple[TensorSpec, ...]
    energy_joules: float = 0.0
    """The client's estimate of what the update cost it (training and transfer)."""
    encoding: Encoding = RAW
    """How the payload travels; `specs` describe the decoded delta."""

    @property
    def payload_bytes(self) -> int:
        """The bytes on the wire (encoded size when compressed)."""
        return encoded_size(self.specs, self.encoding)

    @property
    def wire_specs(self) -> tuple[TensorSpec, ...]:
        """What the payload's bytes are on the wire: the tensors themselves, or
        one opaque byte string when compressed (decoded once it is whole)."""
        if self.encoding.is_raw:
            return self.specs
        return (TensorSpec("encoded", np.dtype("|u1"), (self.payload_bytes,)),)


@dataclass(frozen=True)
class Update:
    header: UpdateHeader
    delta: Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)  # slots: the idempotency window keeps one per remembered key
class PushOutcome:
    version_at_arrival: int
    staleness: int
    staleness_weight: float
    version_after: int
    duplicate: bool = False


@dataclass
class JobStats:
    updates_accepted: int = 0
    duplicates: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    staleness: collections.Counter[int] = field(default_factory=collections.Counter)
    updates_per_client: collections.Counter[str] = field(default_factory=collections.Counter)
    cohorts_applied: int = 0
    cohorts_aborted: collections.Counter[str] = field(default_factory=collections.Counter)
    versions: collections.deque[tuple[int, float]] = field(default_factory=lambda: collections.deque(maxlen=VERSION_LOG_LENGTH))
    """(version, unix time published) of the latest versions, the initial one included."""
    version_energy: collections.deque[tuple[int, float]] = field(default_factory=lambda: collections.deque(maxlen=VERSION_LOG_LENGTH))
    """(version, joules reported for the updates that went into it), like `versions`."""
    evaluations: collections.deque[tuple[int, float, dict[str, float]]] = field(default_factory=lambda: collections.deque(maxlen=VERSION_LOG_LENGTH))
    """(version, unix time evaluated, metrics such as {"accuracy": 0.93, "loss": 0.2}) from the server's evaluator,
    in version order; federated evaluation (server/federated.py) adds its aggregate under `federated_` names."""
    recent_rejections: collections.deque[tuple[float, str, str]] = field(default_factory=lambda: collections.deque(maxlen=RECENT_REJECTIONS))
    """(unix time, client id or "", reason) of the latest refused pushes, for the dashboard."""
    recent_accepts: collections.deque[tuple[float, int]] = field(default_factory=lambda: collections.deque(maxlen=VERSION_LOG_LENGTH))
    """(start of a one-second bucket in unix time, updates accepted in it: 1 per push, a
    cohort's contributors) for the latest seconds that had any, for the dashboard's update
    rate (not restored by recovery: a rate is live). One entry per second, not per update,
    so a busy job's last minutes fit and the dashboard reads only the few hundred it shows."""

    def note_accepted(self, count: int, now: float | None = None) -> None:
        """Count `count` updates accepted at `now` (unix time; default: the current time)."""
        second = float(math.floor(time.time() if now is None else now))
        accepts = self.recent_accepts
        if accepts and accepts[-1][0] == second:
            accepts[-1] = (second, accepts[-1][1] + count)
        else:
            accepts.append((second, count))


class Journal(Protocol):
    """Durable record of what a job accepted (server.store.StateStore)."""

    def record_update(
        self, job_id: str, header: UpdateHeader, outcome: PushOutcome, delta: Mapping[str, np.ndarray], *, version_energy_joules: float = 0.0
    ) -> int:
        """Store the update and its ack durably; returns its sequence number.
        `version_energy_joules`: when the update publishes a version, the
        energy of every update that went into it."""

    def record_cohort(
        self, job_id: str, cohort_id: str, weighted_sum: np.ndarray, weight_sum: float, contributors: int, version: int, *, energy_joules: float = 0.0
    ) -> int:
        """Store a securely aggregated cohort durably; returns its sequence number."""

    def forget(self, seq: int) -> None:
        """Drop an entry whose update the strategy then refused."""

    def published(self, job_id: str, snapshot: ModelSnapshot, seq: int) -> None:
        """A new version exists (cheap: may queue a checkpoint)."""

    def recall(self, job_id: str, idempotency_key: str) -> tuple[UpdateHeader, PushOutcome] | None:
        """The logged update and ack under this key, if the log still holds it
        (for a retry whose key the in-memory window has already let go)."""

    def cohort_version(self, job_id: str, cohort_id: str) -> int | None:
        """The version a logged cohort was applied in; None if it never was."""

    def record_evaluation(self, job_id: str, version: int, evaluated_at: float, metrics: Mapping[str, float]) -> None:
        """Store the metrics of a version (the server evaluator's and the federated aggregate, merged)."""

    def record_federated_report(self, job_id: str, report: EvaluationReport, evaluated_at: float, metrics: Mapping[str, float]) -> None:
        """Store a client's evaluation report and the version's merged metrics, in one transaction."""


@dataclass(frozen=True)
class HeartbeatOutcome:
    version: int
    """The job's current version."""
    server_time_ms: int
    next_heartbeat_s: float
    slot_lease_s: float = 0.0
    """What is left of the client's training-slot lease (0: it holds none)."""


@dataclass(frozen=True, slots=True)
class _Remembered:
    """What a key was used for: enough to tell a retry from a different update
    that reuses the key (the payload itself is not hashed, to keep pushes cheap)."""

    client_id: str
    base_version: int
    num_samples: int
    outcome: PushOutcome


class Job:
    def __init__(self, config: JobConfig, initial: Mapping[str, np.ndarray]) -> None:
        if not initial:
            raise ValueError(f"job {config.job_id!r}: the initial model has no tensors")
        for name, array in initial.items():
            if array.dtype.kind not in _FLOAT_KINDS:
                raise ValueError(
                    f"job {config.job_id!r}: initial model tensor {name!r} is {array.dtype.name}; only "
                    "floating-point tensors are aggregated (keep integer buffers on the client)"
                )
            if not np.isfinite(array).all():
                raise ValueError(f"job {config.job_id!r}: initial model tensor {name!r} holds NaN or Inf")
        self.config = config
        self.specs = tuple(specs_of(initial))
        model_bytes = sum(spec.nbytes for spec in self.specs)
        if model_bytes > config.max_update_bytes:
            raise ValueError(
                f"job {config.job_id!r}: the model is {model_bytes} bytes, above max_update_bytes="
                f"{config.max_update_bytes}, so no update could ever be accepted; raise max_update_bytes"
            )
        self._spec_by_name = {s.name: s for s in self.specs}
        self._staleness_fn: Callable[[int], float] = config.staleness.function()
        self._strategy: Strategy = build_strategy(config.strategy)
        self._lock = threading.Lock()
        self._version_changed = threading.Condition(self._lock)
        self._current = ModelSnapshot.copy_of(0, self.specs, initial)
        self._versions_logged_at = -math.inf
        self._versions_logged = 0
        self._previous: tuple[ModelSnapshot, ...] = ()
        """The latest versions before the current one, newest first, for resumed
        pulls; replaced whole (never changed in place), like `_current`."""
        self._acks: collections.OrderedDict[str, _Remembered] = collections.OrderedDict()
        self._journal: Journal | None = None
        self._window_overflowed = False
        """Whether keys ever left `_acks` (the log may then hold ones it lacks)."""
        self._closing = False
        self.aggregation_observer: Callable[[float], None] | None = None
        """Given the seconds each new version took to compute and publish (server/metrics.py sets it)."""
        self._federated = FederatedEvaluations()
        self._evaluation_lock = threading.Lock()
        """Orders evaluation records (server evaluator and client reports) in memory and
        in the journal alike; taken before `_lock`, never held by pushes."""
        self.stats = JobStats()
        self.stats.versions.append((0, self._current.created_at))
        self.stats.version_energy.append((0, 0.0))
        self._energy_published = 0.0
        """Joules of the updates in published versions."""
        self._energy_pending = 0.0
        """Joules of accepted updates not yet in a version (a buffer, an open round)."""
        self.roster = Roster(max_clients=config.roster_max_clients, expiry_s=config.roster_expiry_s)
        self.slots: TrainingSlots | None = None
        if config.max_concurrent_trainers is not None:
            self.slots = TrainingSlots(
                SlotPolicy(
                    max_concurrent_trainers=config.max_concurrent_trainers,
                    lease_s=config.slot_lease_s,
                    prefer_charging=config.prefer_charging,
                    min_battery=config.min_battery,
                    round_size=config.strategy.clients_per_round if config.strategy.synchronous else None,
                ),
                job_id=config.job_id,
            )

    def attach_journal(self, journal: Journal) -> None:
        """Log every accepted update to `journal` from now on (before serving)."""
        self._journal = journal

    # -- recovery (before serving) ---------------------------------------------------

    def restore(self, version: int, tensors: Mapping[str, np.ndarray], published_at: float) -> None:
        """Start again from a checkpoint: `version` with an empty buffer."""
        if specs_of(tensors) != list(self.specs):
            raise StateError(f"job {self.job_id!r}: the checkpoint of version {version} does not match the model's tensors")
        with self._lock:
            self._current = ModelSnapshot.copy_of(version, self.specs, tensors)
            self._previous = ()
            self._strategy = build_strategy(self.config.strategy)
            self.stats.versions.clear()
            self.stats.versions.append((version, published_at))
            self._energy_pending = 0.0  # the buffer is empty; replaying the log refills it

    def restore_energy(self, published_total: float, recent: Iterable[tuple[int, float]]) -> None:
        """After replay: the energy of every published version, and of the latest ones (oldest first)."""
        with self._lock:
            self._energy_published = published_total
            self.stats.version_energy.clear()
            self.stats.version_energy.extend(recent)

    def replay_update(self, header: UpdateHeader, logged: PushOutcome, delta: Mapping[str, np.ndarray], seq: int) -> None:
        """Apply a logged update again, exactly as `submit` first did."""
        with self._lock:
            if logged.version_at_arrival != self._current.version:
                raise StateError(
                    f"job {self.job_id!r}: logged update {seq} arrived at version {logged.version_at_arrival}, "
                    f"but replay reached version {self._current.version}; the state directory is inconsistent"
                )
            outcome = self._outcome_for(header.base_version)
            self._take(header, outcome, delta, seq, replaying=True)
            self._remember(header, outcome)

    def replay_cohort(self, weighted_sum: np.ndarray, weight_sum: float, contributors: int, seq: int, energy_joules: float = 0.0) -> None:
        with self._lock:
            self._publish(self._cohort_params(weighted_sum, weight_sum), seq, replaying=True, energy=self._energy_pending + energy_joules)
            self.stats.updates_accepted += contributors
            self.stats.note_accepted(contributors)
            self.stats.cohorts_applied += 1

    def remember_acks(self, acks: Iterable[tuple[UpdateHeader, PushOutcome]], *, more_in_log: bool) -> None:
        """Load logged acks (oldest first), so retries after a restart get their
        first ack; `more_in_log`: the log holds older ones than these."""
        with self._lock:
            self._window_overflowed |= more_in_log
            for header, outcome in acks:
                self._remember(header, outcome)
                # replay may have remembered it already: the log's order is the window's
                self._acks.move_to_end(header.idempotency_key)

    @property
    def job_id(self) -> str:
        return self.config.job_id

    @property
    def synchronous(self) -> bool:
        return self._strategy.synchronous

    def snapshot(self) -> ModelSnapshot:
        # No lock: replacing the reference is atomic and snapshots never change,
        # so a pull never waits for an aggregation in progress.
        return self._current

    def snapshot_at(self, version: int) -> ModelSnapshot:
        """Version `version`, if it is the current one or among the
        `keep_versions_for_resume` before it (a pull cut off mid-stream resumes
        on the version it started); PreconditionFailed naming it otherwise."""
        current, previous = self._current, self._previous  # no lock: see snapshot()
        for snapshot in (current, *previous):
            if snapshot.version == version:
                return snapshot
        if version > current.version:
            raise UnknownVersion(
                f"version {version} was never published by job {self.job_id!r} (latest is {current.version}); "
                "pull the current model"
            )
        kept = [s.version for s in (current, *previous)]
        raise PreconditionFailed(
            f"version {version} of job {self.job_id!r} is no longer held for resuming (this server keeps "
            f"versions {min(kept)}-{max(kept)}, keep_versions_for_resume={self.config.keep_versions_for_resume}); "
            "pull the current model from the start"
        )

    def acknowledged(self, client_id: str, idempotency_key: str) -> bool:
        """Whether `client_id`'s update under this key was accepted already."""
        with self._lock:
            remembered = self._acks.get(idempotency_key)
            if remembered is None and self._journal is not None and self._window_overflowed:
                logged = self._journal.recall(self.job_id, idempotency_key)
                return logged is not None and logged[0].client_id == client_id
            return remembered is not None and remembered.client_id == client_id

    def wait_for_version(self, min_version: int, timeout_s: float) -> ModelSnapshot:
        """The current snapshot once its version is >= min_version, or the
        current one when `timeout_s` passes first."""
        with self._version_changed:
            self._version_changed.wait_for(lambda: self._current.version >= min_version or self._closing, timeout=timeout_s)
            return self._current

    @property
    def closing(self) -> bool:
        """Shutting down: version waits answer at once."""
        return self._closing

    def release_waiters(self) -> None:
        """Shutting down: long polls answer now, with the current version."""
        with self._version_changed:
            self._closing = True
            self._version_changed.notify_all()

    def logged_cohort_version(self, cohort_id: str) -> int | None:
        """The version a cohort was applied in, from the durable log (None
        without a state directory, or if it never was applied)."""
        return self._journal.cohort_version(self.job_id, cohort_id) if self._journal is not None else None

    def record_evaluation(self, version: int, evaluated_at: float, metrics: Mapping[str, float]) -> None:
        """Keep the evaluator's metrics of `version` (in the state directory too),
        beside any federated metrics of that version. Called by the evaluation
        thread; the job's lock is held only to change the list, so evaluations
        never hold up pushes."""
        with self._evaluation_lock:
            merged = self._put_evaluation(version, evaluated_at, metrics, federated=False)
            if self._journal is not None:
                self._journal.record_evaluation(self.job_id, version, merged[1], merged[2])

    def report_evaluation(self, report: EvaluationReport) -> ReportOutcome:
        """Take a client's evaluation of a version (server/federated.py has the
        rules); durable before it is answered when the job has a journal."""
        check_report(report)
        with self._evaluation_lock:
            current = self._current.version
            pending = self._federated.prepare(report, current)
            if pending.outcome.duplicate:
                return pending.outcome
            now = time.time()
            if self._journal is not None:
                at, merged = self._merged_evaluation(report.version, now, pending.summary, federated=True)
                self._journal.record_federated_report(self.job_id, report, at, merged)
            self._federated.commit(pending, current)
            self._put_evaluation(report.version, now, pending.summary, federated=True)
            return pending.outcome

    @property
    def federated_reports_taken(self) -> int:
        """Client evaluation reports taken in (duplicates not counted) since the server started."""
        return self._federated.reports_taken

    def federated_summary(self, version: int) -> dict[str, float] | None:
        """The federated aggregate of `version` (None: no report held for it)."""
        with self._evaluation_lock:
            return self._federated.summary(version)

    def _merged_evaluation(self, version: int, at: float, metrics: Mapping[str, float], *, federated: bool) -> tuple[float, dict[str, float]]:
        """(time, metrics) of `version`'s entry with `metrics` in place of those
        of their source (federated or the server's), the other source's kept."""
        with self._lock:
            for entry_version, entry_at, entry_metrics in reversed(self.stats.evaluations):
                if entry_version == version:
                    kept = {k: v for k, v in entry_metrics.items() if k.startswith(FEDERATED_PREFIX) != federated}
                    return entry_at, {**kept, **metrics}
                if entry_version < version:
                    break
        return at, dict(metrics)

    def _put_evaluation(self, version: int, at: float, metrics: Mapping[str, float], *, federated: bool) -> tuple[int, float, dict[str, float]]:
        """Merge `metrics` into `version`'s entry (kept in version order); the entry."""
        entry_at, merged = self._merged_evaluation(version, at, metrics, federated=federated)
        entry = (version, entry_at, merged)
        with self._lock:
            evaluations = self.stats.evaluations
            index = len(evaluations)
            while index > 0 and evaluations[index - 1][0] >= version:
                index -= 1
            if index < len(evaluations) and evaluations[index][0] == version:
                evaluations[index] = entry
            elif index == len(evaluations):
                evaluations.append(entry)
            elif index > 0 or len(evaluations) < (evaluations.maxlen or 0):
                if len(evaluations) == evaluations.maxlen:
                    evaluations.popleft()
                    index -= 1
                evaluations.insert(index, entry)
            # else: older than every entry of a full list; the state directory still has it
        return entry

    def restore_evaluations(self, recent: Iterable[tuple[int, float, dict[str, float]]]) -> None:
        """After recovery: the latest evaluations, oldest first."""
        with self._lock:
            self.stats.evaluations.clear()
            self.stats.evaluations.extend(sorted(recent, key=lambda entry: entry[0]))

    def restore_federated_reports(self, reports: Iterable[EvaluationReport]) -> None:
        """After recovery: the stored client evaluation reports, in the order they were taken."""
        with self._evaluation_lock:
            self._federated.restore(reports, self._current.version)

    def last_server_evaluation(self) -> int | None:
        """The newest version the server's own evaluator recorded (federated-only entries skipped)."""
        with self._lock:
            for version, _, metrics in reversed(self.stats.evaluations):
                if any(not name.startswith(FEDERATED_PREFIX) for name in metrics):
                    return version
        return None

    def note_cohort_abort(self, reason: str) -> None:
        with self._lock:
            self.stats.cohorts_aborted[reason.split(";")[0][:80]] += 1

    def note_rejection(self, reason: str, client_id: str = "", message: str = "") -> None:
        """Count a refused push under `reason` (its kind) and keep it, with
        `message` (what the client was told), among the recent ones."""
        with self._lock:
            self.stats.rejected[reason] += 1
            shown = f"{reason}: {message}" if message else reason
            # an id refused for its length is still shown, cut to what an id may be
            self.stats.recent_rejections.append((time.time(), client_id[:MAX_SHOWN_CLIENT_ID], shown[:MAX_REJECTION_TEXT]))

    def read_stats(self, reader: Callable[[JobStats], T]) -> T:
        """`reader(self.stats)` under the job's lock: a consistent view for
        readers outside the RPC path (the dashboard, a metrics scrape); keep
        `reader` quick."""
        with self._lock:
            return reader(self.stats)

    def _observe_aggregation(self, started: float) -> None:
        if self.aggregation_observer is not None:
            self.aggregation_observer(time.perf_counter() - started)

    @property
    def energy_joules_total(self) -> float:
        """Joules reported for every accepted update: published and pending."""
        with self._lock:
            return self._energy_published + self._energy_pending

    def version_history(self, limit: int) -> list[tuple[int, float, float]]:
        """(version, unix time published, joules) of the newest `limit` versions, newest first."""
        with self._lock:
            energy = dict(self.stats.version_energy)
            recent = list(self.stats.versions)[-limit:]
        return [(version, published, energy.get(version, 0.0)) for version, published in reversed(recent)]

    # -- training slots --------------------------------------------------------

    def acquire_slot(self, client_id: str, device: DeviceReport) -> SlotDecision:
        """A slot to train on the current version, or why not. A job without
        slots grants every request and tracks nothing (lease 0)."""
        if not client_id:
            raise InvalidUpdate("client_id is empty; a client must name itself to ask for a training slot")
        version = self._current.version  # no lock: see snapshot()
        if self.slots is None:
            return SlotDecision(True, version, reason="this job has no training slots: train whenever the device allows")
        decision = self.slots.acquire(client_id, device, version)
        if logger.isEnabledFor(logging.DEBUG):  # per request: build no context for a line nobody keeps
            logger.debug(
                "training slot %s%s", "granted" if decision.granted else "refused: ", "" if decision.granted else decision.reason,
                extra=log_context(job=self.job_id, client=client_id, version=decision.version),
            )  # fmt: skip
        return decision

    def release_slot(self, client_id: str, *, pushed: bool) -> None:
        if self.slots is not None:
            self.slots.release(client_id, pushed=pushed)

    def require_slot(self, client_id: str) -> None:
        """Refuse a client without a slot, when the job has slots."""
        if self.slots is not None:
            self.slots.require(client_id, self.job_id)

    # -- presence --------------------------------------------------------------

    def heartbeat(self, client_id: str, state: ClientState, base_version: int, device: DeviceReport | None = None) -> HeartbeatOutcome:
        """Note that `client_id` is there, doing `state` on `base_version`;
        a TRAINING or UPLOADING heartbeat renews the client's training slot."""
        version = self._current.version  # no lock: see snapshot()
        if base_version > version:
            raise UnknownVersion(
                f"base version {base_version} was never published by job {self.job_id!r} "
                f"(latest is {version}); pull the current model"
            )
        self.roster.beat(client_id, state, base_version, device)
        lease = 0.0
        if self.slots is not None:
            working = state in (ClientState.TRAINING, ClientState.UPLOADING)
            lease = self.slots.renew(client_id) if working else self.slots.lease_left(client_id)
        return HeartbeatOutcome(version, time.time_ns() // 1_000_000, self.config.heartbeat_interval_s, lease)

    # -- pushing ---------------------------------------------------------------

    def admit(self, header: UpdateHeader) -> PushOutcome | None:
        """Refuse a bad header before its payload is read. Returns the stored
        ack when the idempotency key was seen before (the update is not read
        again); None when the payload should be received."""
        if self.config.secure_aggregation is not None and header.encoding.sparse:
            raise InvalidUpdate(
                f"job {self.job_id!r} runs secure aggregation, which top-k sparsification cannot join: masks make every "
                "coordinate non-zero and members keep different coordinates; quantization is what composes"
            )
        if self.config.secure_aggregation is not None:
            raise PreconditionFailed(
                f"job {self.job_id!r} runs secure aggregation: updates go through cohorts "
                "(JoinCohort), never as plain pushes"
            )
        self._check_header_fields(header)
        self._check_encoding(header.encoding)
        if header.payload_bytes > self.config.max_update_bytes:
            raise LimitExceeded(
                f"update of {header.payload_bytes} bytes exceeds this job's max_update_bytes="
                f"{self.config.max_update_bytes}"
            )
        self._check_layout(header.specs)
        with self._lock:
            remembered = self._recall(header)
            if remembered is not None:
                return remembered
            self._check_version(header)
        # after the idempotency check: a retry of an accepted push needs no slot
        self.require_slot(header.client_id)
        return None

    def submit(self, update: Update) -> PushOutcome:
        header = update.header
        for name, tensor in update.delta.items():
            if not all_finite(tensor):
                raise InvalidUpdate(f"tensor {name!r} of the update holds NaN or Inf values; nothing was applied")
        with self._lock:
            remembered = self._recall(header)
            if remembered is not None:
                return remembered
            self._check_version(header)
            outcome = self._outcome_for(header.base_version)
            seq = 0
            if self._journal is not None:
                publishes = outcome.version_after > outcome.version_at_arrival
                version_energy = self._energy_pending + header.energy_joules if publishes else 0.0
                seq = self._journal.record_update(self.job_id, header, outcome, update.delta, version_energy_joules=version_energy)
                faults.point("push.logged")
            try:
                self._take(header, outcome, update.delta, seq)
            except Exception:
                if self._journal is not None:
                    self._journal.forget(seq)
                raise
            self._remember(header, outcome)
        self.release_slot(header.client_id, pushed=True)
        if logger.isEnabledFor(logging.DEBUG):  # every push: build no context for a line nobody keeps
            logger.debug(
                "update accepted: base version %d, staleness %d (weight %.3g), %d samples",
                header.base_version, outcome.staleness, outcome.staleness_weight, header.num_samples,
                extra=log_context(job=self.job_id, client=header.client_id, version=outcome.version_after),
            )  # fmt: skip
        return outcome

    def _outcome_for(self, base_version: int) -> PushOutcome:
        """The ack of an update taken now; call with the lock held."""
        version = self._current.version
        staleness = version - base_version
        return PushOutcome(version, staleness, self._staleness_fn(staleness), version + int(self._strategy.publishes_on_next))

    def _take(self, header: UpdateHeader, outcome: PushOutcome, delta: Mapping[str, np.ndarray], seq: int, *, replaying: bool = False) -> None:
        """Hand an admitted update to the strategy; call with the lock held."""
        started = time.perf_counter()
        new_params = self._strategy.take(
            self._current.tensors,
            delta,
            staleness_weight=outcome.staleness_weight,
            num_samples=header.num_samples,
            client_id=header.client_id,
        )
        if new_params is not None:
            if not replaying:
                faults.point("aggregate.mid")
            self._publish(new_params, seq, replaying=replaying, energy=self._energy_pending + header.energy_joules)
            if not replaying:
                self._observe_aggregation(started)
        else:
            self._energy_pending += header.energy_joules
        self.stats.updates_accepted += 1
        if not replaying:
            self.stats.note_accepted(1)
        self.stats.staleness[outcome.staleness] += 1
        self.stats.updates_per_client[header.client_id] += 1

    def apply_cohort(self, weighted_sum: np.ndarray, weight_sum: float, contributors: int, cohort_id: str = "", energy_joules: float = 0.0) -> int:
        """Apply a securely aggregated cohort as one buffered aggregate:
        x <- x + server_lr * sum(w_i delta_i) / sum(w_i). `weighted_sum` is the
        flat float64 vector of all tensors in model order. Returns the version."""
        if weight_sum <= 0:
            raise InvalidUpdate("the cohort's weights sum to zero: every member was too stale; nothing was applied")
        with self._lock:
            started = time.perf_counter()
            new_params = self._cohort_params(weighted_sum, weight_sum)
            seq = 0
            energy = self._energy_pending + energy_joules
            if self._journal is not None:
                seq = self._journal.record_cohort(
                    self.job_id, cohort_id, weighted_sum, weight_sum, contributors, self._current.version + 1, energy_joules=energy
                )
                faults.point("secagg.logged")
            self._publish(new_params, seq, energy=energy)
            self._observe_aggregation(started)
            self.stats.updates_accepted += contributors
            self.stats.cohorts_applied += 1
            logger.info(
                "cohort applied: %d members' sum", contributors,
                extra=log_context(job=self.job_id, version=self._current.version, cohort=cohort_id or None),
            )  # fmt: skip
            return self._current.version

    def _cohort_params(self, weighted_sum: np.ndarray, weight_sum: float) -> dict[str, np.ndarray]:
        scale = self.config.strategy.server_lr / weight_sum
        new_params = {}
        offset = 0
        for spec in self.specs:
            count = spec.nbytes // spec.dtype.itemsize
            part = weighted_sum[offset : offset + count].reshape(spec.shape)
            offset += count
            x = self._current.tensors[spec.name]
            new_params[spec.name] = (x.astype(np.float64) + scale * part).astype(x.dtype)
            if not all_finite(new_params[spec.name]):
                raise InvalidUpdate(f"the cohort's aggregate would overflow tensor {spec.name!r}; nothing was applied")
        return new_params

    @property
    def vector_length(self) -> int:
        """Model parameters in all tensors (what a secure-aggregation member masks, before its weight)."""
        return sum(spec.nbytes // spec.dtype.itemsize for spec in self.specs)

    @property
    def pending_updates(self) -> int:
        with self._lock:
            return self._strategy.pending

    def _check_header_fields(self, header: UpdateHeader) -> None:
        if not header.client_id:
            raise InvalidUpdate("client_id is empty; every push names the client that made it")
        if not header.idempotency_key:
            raise InvalidUpdate("idempotency_key is empty; give each update a unique key and reuse it on retries")
        if not 1 <= header.num_samples <= MAX_NUM_SAMPLES:
            raise InvalidUpdate(
                f"num_samples must be between 1 and {MAX_NUM_SAMPLES} (the number of examples the update "
                f"was trained on), got {header.num_samples}"
            )
        check_energy(header.energy_joules)

    def _check_encoding(self, encoding: Encoding) -> None:
        accepted = self.config.compression
        asked = [kind for kind, used in (("quantize", encoding.quantize_bits > 0), ("top_k", encoding.sparse)) if used]
        refused = [kind for kind in asked if kind not in accepted]
        if refused:
            raise InvalidUpdate(
                f"job {self.job_id!r} does not take {' or '.join(refused)} compressed updates "
                f"(it takes: {', '.join(sorted(accepted)) or 'uncompressed only'}); send it uncompressed"
            )

    def _check_layout(self, specs: Sequence[TensorSpec]) -> None:
        names = [s.name for s in specs]
        unknown = [n for n in names if n not in self._spec_by_name]
        if unknown:
            raise InvalidUpdate(f"unknown tensor name(s) {unknown}; this job's model has {list(self._spec_by_name)}")
        missing = [n for n in self._spec_by_name if n not in names]
        if missing:
            raise InvalidUpdate(f"update lacks tensor(s) {missing}; send a delta for every tensor of the model")
        if names != [s.name for s in self.specs]:
            raise InvalidUpdate("tensors are out of order; send them in the model's order (as pulled)")
        for spec in specs:
            expected = self._spec_by_name[spec.name]
            if spec.shape != expected.shape:
                raise InvalidUpdate(
                    f"tensor {spec.name!r} has shape {list(spec.shape)}, the model's is {list(expected.shape)}"
                )
            if spec.dtype != expected.dtype:
                raise InvalidUpdate(
                    f"tensor {spec.name!r} has dtype {spec.dtype.name}, the model's is {expected.dtype.name}"
                )

    def _check_version(self, header: UpdateHeader) -> tuple[int, int]:
        """(current version, staleness) or raise; call with the lock held."""
        version = self._current.version
        if header.base_version > version:
            raise UnknownVersion(
                f"base version {header.base_version} was never published by job {self.job_id!r} "
                f"(latest is {version}); compute the delta against a pulled model"
            )
        staleness = version - header.base_version
        limit = self.config.max_staleness
        if limit is not None and staleness > limit:
            raise StaleUpdate(staleness, limit)
        self._strategy.admit(header.client_id, header.base_version, version)
        return version, staleness

    def _recall(self, header: UpdateHeader) -> PushOutcome | None:
        remembered = self._acks.get(header.idempotency_key)
        if remembered is None and self._journal is not None and self._window_overflowed:
            # Only once keys have left the window can a key be logged but not
            # remembered: until then a miss is a new update, without a query.
            logged = self._journal.recall(self.job_id, header.idempotency_key)
            if logged is not None:
                self._remember(*logged)
                remembered = self._acks[header.idempotency_key]
        if remembered is None:
            return None
        if (remembered.client_id, remembered.base_version, remembered.num_samples) != (
            header.client_id,
            header.base_version,
            header.num_samples,
        ):
            raise IdempotencyConflict(
                f"idempotency key {header.idempotency_key!r} was already used for another update; "
                "use a fresh key for each new update"
            )
        self._acks.move_to_end(header.idempotency_key)
        self.stats.duplicates += 1
        first = remembered.outcome
        return PushOutcome(first.version_at_arrival, first.staleness, first.staleness_weight, first.version_after, duplicate=True)

    def _remember(self, header: UpdateHeader, outcome: PushOutcome) -> None:
        # interned: a client's id is then stored once, not once per remembered push
        self._acks[header.idempotency_key] = _Remembered(sys.intern(header.client_id), header.base_version, header.num_samples, outcome)
        while len(self._acks) > self.config.idempotency_window:
            self._acks.popitem(last=False)
            self._window_overflowed = True

    def _publish(self, params: Mapping[str, np.ndarray], seq: int, *, replaying: bool = False, energy: float = 0.0) -> None:
        """Publish the next version; `energy`: the joules of every update in it."""
        self._previous = (self._current, *self._previous)[: self.config.keep_versions_for_resume]
        self._current = ModelSnapshot(self._current.version + 1, self.specs, params)
        self.stats.versions.append((self._current.version, self._current.created_at))
        self.stats.version_energy.append((self._current.version, energy))
        self._energy_published += energy
        self._energy_pending = 0.0
        self._version_changed.notify_all()
        if self._journal is not None and not replaying:
            self._journal.published(self.job_id, self._current, seq)
        # fedasync publishes a version per update, hundreds a second: every version
        # is a DEBUG event, and INFO says where the job is at most every LOG_VERSIONS_EVERY_S
        now = time.monotonic()
        summary = not replaying and now - self._versions_logged_at >= LOG_VERSIONS_EVERY_S
        if summary or logger.isEnabledFor(logging.DEBUG):  # under the job lock, per version
            logger.log(
                logging.INFO if summary else logging.DEBUG,
                "%s version %d%s", "replayed" if replaying else "published", self._current.version,
                f" ({self._current.version - self._versions_logged} since the last such line)" if summary and self._versions_logged else "",
                extra=log_context(job=self.job_id, version=self._current.version),
            )  # fmt: skip
        if summary:
            self._versions_logged_at, self._versions_logged = now, self._current.version


class AggregationCore:
    """The jobs a server runs, by id."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self._jobs = {job.job_id: job for job in jobs}

    @classmethod
    def from_config(cls, config: ServerConfig, initial_models: Mapping[str, Mapping[str, np.ndarray]]) -> AggregationCore:
        missing = [job.job_id for job in config.jobs if job.job_id not in initial_models]
        if missing:
            raise ValueError(f"no initial model for job(s) {', '.join(missing)}")
        return cls([Job(job, initial_models[job.job_id]) for job in config.jobs])

    def job(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise JobNotFound(
                f"no job {job_id!r} on this server; it runs: {', '.join(sorted(self._jobs))}"
            ) from None

    @property
    def jobs(self) -> Mapping[str, Job]:
        return self._jobs
