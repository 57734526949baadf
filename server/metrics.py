"""Prometheus metrics of one running server. No gRPC here.

`ServerMetrics` owns its own `CollectorRegistry` (never prometheus_client's
global REGISTRY), so several servers in one process, as in the tests, each
report their own numbers. `exposition()` renders it in the text format; the
HTTP endpoint (server/http.py) serves that at /metrics.

Two kinds of series:

  counted as it happens   the servicer reports what only it sees (updates
                          received, refusals by reason, payload bytes, Push
                          latency) through the `note_*` methods; each job
                          reports how long each new version took to compute
                          and publish through `Job.aggregation_observer`.
  read at scrape time     `_StateCollector` reads what the server keeps anyway
                          (JobStats counters, the live version, energy, the
                          roster, training slots, cohort phases) when Prometheus
                          scrapes, so heartbeats and pushes update no gauges.

Labels are bounded: `job` is one of the server's jobs ("" for a request that
named none of them), `reason` one of REJECTION_REASONS or
COHORT_ABORT_REASONS, `state` and `phase` enums. Client ids are never labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from proto.secagg.protocol import Phase, ProtocolViolation
from proto.tensors import MalformedPayload
from server.cohorts import CohortManager
from server.core import AggregationCore, Job, JobStats
from server.errors import (
    JobNotFound,
    LimitExceeded,
    NoTrainingSlot,
    NotAuthenticated,
    PermissionDenied,
    PreconditionFailed,
    RetryLater,
    RoundClosed,
    StaleUpdate,
    StreamDeadlineExceeded,
    Unavailable,
    UnknownVersion,
    InvalidUpdate,
)
from server.roster import ClientState
from server.secagg import CohortAborted

REJECTION_REASONS = (
    "too_stale",
    "unknown_version",
    "invalid_update",
    "unknown_job",
    "wrong_phase",
    "no_slot",
    "too_large",
    "rate_limited",
    "deadline_exceeded",
    "cohort_aborted",
    "unauthenticated",
    "permission_denied",
    "unavailable",
    "other",
)
"""The `reason` label of tributary_updates_rejected_total."""

_REASON_BY_ERROR: tuple[tuple[type[BaseException], str], ...] = (
    # subclasses before their bases
    (StaleUpdate, "too_stale"),
    (UnknownVersion, "unknown_version"),
    (NoTrainingSlot, "no_slot"),
    (RoundClosed, "wrong_phase"),
    (ProtocolViolation, "wrong_phase"),
    (PreconditionFailed, "wrong_phase"),
    (MalformedPayload, "invalid_update"),  # a cut stream (TruncatedPayload) too: it is resumed or sent again
    (InvalidUpdate, "invalid_update"),
    (JobNotFound, "unknown_job"),
    (RetryLater, "rate_limited"),
    (LimitExceeded, "too_large"),
    (StreamDeadlineExceeded, "deadline_exceeded"),
    (CohortAborted, "cohort_aborted"),
    (NotAuthenticated, "unauthenticated"),
    (PermissionDenied, "permission_denied"),
    (Unavailable, "unavailable"),
)

COHORT_ABORT_REASONS = ("too_few_members", "members_vanished", "shutting_down", "aggregate_refused", "other")
"""The `reason` label of tributary_cohorts_aborted_total."""

STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Upper bounds (versions) of the staleness histogram's buckets; +Inf follows."""
PUSH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
AGGREGATION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONNECTED_HEARTBEATS = 2
"""A client counts as connected while heard from within this many heartbeat
intervals (heartbeat_interval_s): one missed heartbeat does not drop it."""
LIVE_PHASES = tuple(phase for phase in Phase if phase not in (Phase.CHECK_IN, Phase.COMPLETED, Phase.ABORTED))


def rejection_reason(error: BaseException) -> str:
    """The `reason` category of a refused update (one of REJECTION_REASONS)."""
    for error_type, reason in _REASON_BY_ERROR:
        if isinstance(error, error_type):
            return reason
    return "other"


def cohort_abort_reason(reason: str) -> str:
    """The category (one of COHORT_ABORT_REASONS) of a cohort's abort reason,
    as CohortManager and CohortCoordinator word it."""
    if reason.startswith("only "):  # "only 2 members uploaded their input; the cohort needs 3", shares short
        return "too_few_members"
    if reason.startswith("every member vanished"):
        return "members_vanished"
    if "shutting down" in reason:
        return "shutting_down"
    if "aggregate would overflow" in reason or "weights sum to zero" in reason:
        return "aggregate_refused"
    return "other"


class ServerMetrics:
    """The metrics of one server: its jobs (`core`) and their secure-aggregation
    cohorts (`cohorts`, by job id). Sets each job's `aggregation_observer`."""

    def __init__(self, core: AggregationCore, cohorts: Mapping[str, CohortManager] | None = None) -> None:
        self.registry = CollectorRegistry()
        self._job_ids = frozenset(core.jobs)
        jobs = ["job"]
        self._received = Counter(
            "tributary_updates_received", "Updates whose header arrived: Push streams and masked uploads.", jobs, registry=self.registry
        )
        self._rejected = Counter(
            "tributary_updates_rejected",
            "Updates refused, by reason category (nothing of them was applied).",
            ["job", "reason"],
            registry=self.registry,
        )
        self._received_bytes = Counter(
            "tributary_received_bytes", "Update payload bytes received (pushes and masked uploads, as on the wire).", jobs, registry=self.registry
        )
        self._sent_bytes = Counter("tributary_sent_bytes", "Model payload bytes sent by Pull.", jobs, registry=self.registry)
        self._federated_evaluations = Counter(
            "tributary_federated_evaluations", "Client evaluation reports taken in (federated evaluation; retries not counted).", jobs, registry=self.registry
        )
        self._push_seconds = Histogram(
            "tributary_push_duration_seconds", "Time from a Push stream's start to its answer.", jobs, registry=self.registry, buckets=PUSH_BUCKETS_S
        )
        self._aggregation_seconds = Histogram(
            "tributary_aggregation_duration_seconds",
            "Time to compute a new model version from the aggregate and publish it.",
            jobs,
            registry=self.registry,
            buckets=AGGREGATION_BUCKETS_S,
        )
        for job_id in sorted(self._job_ids):  # every series from the start: rate() needs the zeros
            self._received.labels(job_id)
            self._received_bytes.labels(job_id)
            self._sent_bytes.labels(job_id)
            self._federated_evaluations.labels(job_id)
            self._push_seconds.labels(job_id)
            for reason in REJECTION_REASONS:
                self._rejected.labels(job_id, reason)
            core.job(job_id).aggregation_observer = self._aggregation_seconds.labels(job_id).observe
        self.registry.register(_StateCollector(core, cohorts or {}))

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape, in Prometheus' text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def job_label(self, job_id: str) -> str:
        """`job_id` if the server runs it, else "" (a label never takes what a client made up)."""
        return job_id if job_id in self._job_ids else ""

    # -- what the servicer reports ---------------------------------------------------

    def note_update_received(self, job_id: str) -> None:
        self._received.labels(self.job_label(job_id)).inc()

    def note_rejected(self, job_id: str, error: BaseException) -> None:
        self._rejected.labels(self.job_label(job_id), rejection_reason(error)).inc()

    def note_federated_evaluation(self, job_id: str) -> None:
        """A client's evaluation report was taken in (server/federated.py)."""
        self._federated_evaluations.labels(self.job_label(job_id)).inc()

    def note_received_bytes(self, job_id: str, count: int) -> None:
        if count:
            self._received_bytes.labels(self.job_label(job_id)).inc(count)

    def note_sent_bytes(self, job_id: str, count: int) -> None:
        if count:
            self._sent_bytes.labels(self.job_label(job_id)).inc(count)

    def observe_push(self, job_id: str, seconds: float) -> None:
        self._push_seconds.labels(self.job_label(job_id)).observe(seconds)


@dataclass(frozen=True)
class _StatsView:
    """The JobStats numbers a scrape needs, copied under the job's lock."""

    accepted: int
    duplicates: int
    staleness: dict[int, int]
    cohorts_applied: int
    cohorts_aborted: dict[str, int]
    accuracy: float | None
    federated_accuracy: float | None

    @classmethod
    def of(cls, stats: JobStats) -> _StatsView:
        accuracy = _latest(stats, "accuracy")
        return cls(
            stats.updates_accepted,
            stats.duplicates,
            dict(stats.staleness),
            stats.cohorts_applied,
            dict(stats.cohorts_aborted),
            accuracy,
            _latest(stats, "federated_accuracy"),
        )


def _latest(stats: JobStats, metric: str) -> float | None:
    """`metric` of the newest evaluated version that has it (evaluations are in version order)."""
    for _, _, metrics in reversed(stats.evaluations):
        if metric in metrics:
            return metrics[metric]
    return None


class _StateCollector(Collector):
    """Series read from the server's state at scrape time."""

    def __init__(self, core: AggregationCore, cohorts: Mapping[str, CohortManager]) -> None:
        self._jobs = sorted(core.jobs.values(), key=lambda job: job.job_id)
        self._cohorts = cohorts
        self._start_versions = {job.job_id: job.snapshot().version for job in self._jobs}

    def collect(self) -> Iterable[Metric]:
        jobs = ["job"]
        version = GaugeMetricFamily("tributary_model_version", "The job's latest published model version.", labels=jobs)
        published = CounterMetricFamily(
            "tributary_model_versions_published", "Model versions published since the server started.", labels=jobs
        )
        accepted = CounterMetricFamily(
            "tributary_updates_accepted", "Updates applied (each member of an applied cohort counts one).", labels=jobs
        )
        duplicates = CounterMetricFamily(
            "tributary_updates_duplicate", "Retried pushes of an update already accepted (answered with the first ack).", labels=jobs
        )
        staleness = HistogramMetricFamily(
            "tributary_update_staleness_versions",
            "Versions published between an accepted plain update's base version and its arrival.",
            labels=jobs,
        )
        energy = CounterMetricFamily("tributary_energy_reported_joules", "Energy clients reported for accepted updates.", labels=jobs)
        accuracy = GaugeMetricFamily(
            "tributary_model_accuracy", "Accuracy (0 to 1) of the latest evaluated model version (jobs with an evaluator).", labels=jobs
        )
        federated_accuracy = GaugeMetricFamily(
            "tributary_model_federated_accuracy",
            "Example-weighted mean accuracy (0 to 1) clients reported for the newest version they evaluated (federated evaluation).",
            labels=jobs,
        )
        connected = GaugeMetricFamily(
            "tributary_connected_clients",
            f"Clients heard from (heartbeat) within {CONNECTED_HEARTBEATS} heartbeat intervals.",
            labels=jobs,
        )
        clients = GaugeMetricFamily(
            "tributary_clients", "Connected clients by the state their latest heartbeat reported.", labels=["job", "state"]
        )
        slots = GaugeMetricFamily(
            "tributary_training_slots_held", "Training slots held (jobs with max_concurrent_trainers).", labels=jobs
        )
        cohorts = GaugeMetricFamily(
            "tributary_cohorts", "Secure-aggregation cohorts in progress, by phase.", labels=["job", "phase"]
        )
        waiting = GaugeMetricFamily(
            "tributary_cohort_waiting_clients", "Clients waiting for a secure-aggregation cohort to form.", labels=jobs
        )
        completed = CounterMetricFamily(
            "tributary_cohorts_completed", "Secure-aggregation cohorts whose aggregate was applied.", labels=jobs
        )
        aborted = CounterMetricFamily(
            "tributary_cohorts_aborted", "Secure-aggregation cohorts aborted, by reason category.", labels=["job", "reason"]
        )
        for job in self._jobs:
            job_id = job.job_id
            stats = job.read_stats(_StatsView.of)
            current = job.snapshot().version
            version.add_metric([job_id], current)
            published.add_metric([job_id], current - self._start_versions[job_id])
            accepted.add_metric([job_id], stats.accepted)
            duplicates.add_metric([job_id], stats.duplicates)
            buckets, total = _staleness_buckets(stats.staleness)
            staleness.add_metric([job_id], buckets, total)
            energy.add_metric([job_id], job.energy_joules_total)
            if stats.accuracy is not None:
                accuracy.add_metric([job_id], stats.accuracy)
            if stats.federated_accuracy is not None:
                federated_accuracy.add_metric([job_id], stats.federated_accuracy)
            self._add_presence(job, connected, clients, slots)
            manager = self._cohorts.get(job_id)
            if manager is not None:
                by_phase = dict.fromkeys((phase.value for phase in LIVE_PHASES), 0)
                for phase in manager.cohort_phases().values():
                    if phase in by_phase:
                        by_phase[phase] += 1
                for phase, count in by_phase.items():
                    cohorts.add_metric([job_id, phase], count)
                waiting.add_metric([job_id], manager.waiting_clients())
                completed.add_metric([job_id], stats.cohorts_applied)
                by_reason = dict.fromkeys(COHORT_ABORT_REASONS, 0)
                for reason, count in stats.cohorts_aborted.items():
                    by_reason[cohort_abort_reason(reason)] += count
                for reason, count in by_reason.items():
                    aborted.add_metric([job_id, reason], count)
        return [version, published, accepted, duplicates, staleness, energy, accuracy, federated_accuracy, connected, clients, slots, cohorts, waiting, completed, aborted]

    @staticmethod
    def _add_presence(job: Job, connected: GaugeMetricFamily, clients: GaugeMetricFamily, slots: GaugeMetricFamily) -> None:
        window = CONNECTED_HEARTBEATS * job.config.heartbeat_interval_s
        by_state = job.roster.by_state(job.roster.clock(), window)
        connected.add_metric([job.job_id], sum(by_state.values()))
        for state in ClientState:
            clients.add_metric([job.job_id, state.value], by_state[state])
        if job.slots is not None:
            slots.add_metric([job.job_id], job.slots.active)


def _staleness_buckets(counts: Mapping[int, int]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) buckets, +Inf last, and the sum of staleness."""
    buckets: list[tuple[str, float]] = []
    for bound in STALENESS_BUCKETS:  # `le` written "1.0", as prometheus_client writes it
        buckets.append((str(float(bound)), sum(count for staleness, count in counts.items() if staleness <= bound)))
    buckets.append(("+Inf", sum(counts.values())))
    return buckets, float(sum(staleness * count for staleness, count in counts.items()))


__all__ = ["COHORT_ABORT_REASONS", "REJECTION_REASONS", "ServerMetrics", "cohort_abort_reason", "rejection_reason"]
