"""Federated evaluation: clients evaluate a version on their own held-out data.

A client pulls a version, evaluates it locally and reports
(version, num_examples, {metric: value}) with ReportEvaluation; the server
keeps, per version, the example-weighted mean of each metric over the clients
that reported it. It complements the server-side evaluator
(server/evaluation.py), which needs held-out data on the server: here the
data never leaves the clients, only their metrics do.

Rules (what the servicer maps to status codes):
- One report per client and version. A retry with the same idempotency key
  answers `duplicate` and counts once; a new report from the same client for
  the same version *replaces* its earlier one (the latest evaluation a client
  made of a version is its word on it; counting both would let one client
  weigh twice). A key reused for another report is an IdempotencyConflict.
- The version must have been published (<= the current one) and be among the
  newest KEPT_VERSIONS: older versions are no longer aggregated (memory stays
  bounded), FAILED_PRECONDITION.
- num_examples in [1, MAX_EXAMPLES]; 1 to MAX_METRICS names of at most
  MAX_METRIC_NAME characters from [A-Za-z0-9_.-]; finite values of magnitude
  at most MAX_METRIC_MAGNITUDE: INVALID_ARGUMENT otherwise.

The aggregate of a version is recorded in `JobStats.evaluations` next to the
server evaluator's metrics of that version, every name prefixed `federated_`
(federated_accuracy, federated_loss, ...) plus `federated_clients` and
`federated_examples`, so the dashboard, /metrics and run reports show both.
A metric that only some clients report is averaged over those clients.

Nothing here imports grpc or the job: `server.core.Job` holds one
`FederatedEvaluations` and calls it under its own evaluation lock.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from server.errors import IdempotencyConflict, InvalidUpdate, LimitExceeded, UnknownVersion

PREFIX = "federated_"
"""What federated metrics are called in JobStats.evaluations (and the evaluations table)."""
CLIENTS = PREFIX + "clients"
EXAMPLES = PREFIX + "examples"
MAX_METRICS = 32
MAX_METRIC_NAME = 64
MAX_METRIC_MAGNITUDE = 1e12
MAX_EXAMPLES = 10**9
KEPT_VERSIONS = 64
"""Reports are aggregated for the newest this many versions of a job (by number)."""
MAX_REPORTS_PER_VERSION = 100_000
"""Clients whose reports one version holds; more is RESOURCE_EXHAUSTED."""
_METRIC_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclass(frozen=True, slots=True)
class EvaluationReport:
    client_id: str
    version: int
    num_examples: int
    metrics: Mapping[str, float]
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class ReportOutcome:
    version: int
    reports_for_version: int
    duplicate: bool = False


def check_report(report: EvaluationReport) -> None:
    """InvalidUpdate saying what is wrong with a report's fields."""
    if not report.client_id:
        raise InvalidUpdate("an evaluation report names its client (client_id must not be empty)")
    if not report.idempotency_key:
        raise InvalidUpdate("an evaluation report carries an idempotency_key (unique per report, reused on retry)")
    if not 1 <= report.num_examples <= MAX_EXAMPLES:
        raise InvalidUpdate(f"num_examples is {report.num_examples}; it must be between 1 and {MAX_EXAMPLES} (the held-out examples evaluated)")
    if not report.metrics:
        raise InvalidUpdate("an evaluation report carries at least one metric (e.g. accuracy)")
    if len(report.metrics) > MAX_METRICS:
        raise InvalidUpdate(f"an evaluation report carries {len(report.metrics)} metrics; at most {MAX_METRICS} are accepted")
    for name, value in report.metrics.items():
        if len(name) > MAX_METRIC_NAME or not _METRIC_NAME.fullmatch(name):
            raise InvalidUpdate(
                f"metric name {name[:MAX_METRIC_NAME]!r} is not accepted: use 1 to {MAX_METRIC_NAME} characters from A-Z a-z 0-9 _ . -"
            )
        if PREFIX + name in (CLIENTS, EXAMPLES):  # the server's own counts of each version's reports
            raise InvalidUpdate(f"metric name {name!r} is reserved: the server reports how many clients and examples a version's evaluations cover")
        if not math.isfinite(value) or abs(value) > MAX_METRIC_MAGNITUDE:
            raise InvalidUpdate(f"metric {name}={value!r}: values must be finite numbers of magnitude at most {MAX_METRIC_MAGNITUDE:g}")


def _same(a: EvaluationReport, b: EvaluationReport) -> bool:
    return (a.client_id, a.version, a.num_examples, dict(a.metrics)) == (b.client_id, b.version, b.num_examples, dict(b.metrics))


@dataclass
class _Version:
    reports: dict[str, EvaluationReport] = field(default_factory=dict)
    """Client id -> its latest report of this version."""

    def summary(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        weights: dict[str, int] = {}
        for report in self.reports.values():
            for name, value in report.metrics.items():
                totals[name] = totals.get(name, 0.0) + value * report.num_examples
                weights[name] = weights.get(name, 0) + report.num_examples
        summary = {PREFIX + name: totals[name] / weights[name] for name in sorted(totals)}
        summary[CLIENTS] = float(len(self.reports))
        summary[EXAMPLES] = float(sum(report.num_examples for report in self.reports.values()))
        return summary


@dataclass(frozen=True)
class PendingReport:
    """A report checked against the aggregate, not yet taken in (see `FederatedEvaluations.prepare`)."""

    report: EvaluationReport
    outcome: ReportOutcome
    summary: Mapping[str, float]
    """The version's aggregate once this report is in."""


class FederatedEvaluations:
    """The reports of one job's newest versions (not thread-safe: the job locks)."""

    def __init__(self, kept_versions: int = KEPT_VERSIONS) -> None:
        self.kept_versions = kept_versions
        self._versions: dict[int, _Version] = {}
        self._keys: dict[str, EvaluationReport] = {}
        self.reports_taken = 0
        """Reports taken in (not duplicates) since the server started."""

    def prepare(self, report: EvaluationReport, current_version: int) -> PendingReport:
        """What taking `report` in would give, changing nothing; the duplicate
        answer for a retry; errors saying why it is refused."""
        seen = self._keys.get(report.idempotency_key)
        if seen is not None:
            if not _same(seen, report):
                raise IdempotencyConflict(
                    f"idempotency key {report.idempotency_key!r} was used for another evaluation report "
                    f"(client {seen.client_id!r}, version {seen.version}); use a new key per report"
                )
            held = self._versions.get(report.version)
            count = len(held.reports) if held is not None else 0
            return PendingReport(report, ReportOutcome(report.version, count, duplicate=True), {})
        if report.version > current_version:
            raise UnknownVersion(f"unknown version {report.version}: the job's current version is {current_version}; report on a version you pulled")
        oldest = current_version - self.kept_versions + 1
        if report.version < oldest:
            raise UnknownVersion(
                f"version {report.version} is too old to evaluate: the server aggregates reports for versions {max(0, oldest)} "
                f"to {current_version}; pull the current model and evaluate that"
            )
        held = self._versions.get(report.version, _Version())
        if report.client_id not in held.reports and len(held.reports) >= MAX_REPORTS_PER_VERSION:
            raise LimitExceeded(f"version {report.version} already holds {MAX_REPORTS_PER_VERSION} clients' reports")
        after = _Version({**held.reports, report.client_id: report})
        return PendingReport(report, ReportOutcome(report.version, len(after.reports)), after.summary())

    def commit(self, pending: PendingReport, current_version: int) -> None:
        """Take a prepared report in (once it is durable)."""
        if pending.outcome.duplicate:
            return
        report = pending.report
        self._versions.setdefault(report.version, _Version()).reports[report.client_id] = report
        self._keys[report.idempotency_key] = report
        self.reports_taken += 1
        self._forget_before(current_version - self.kept_versions + 1)

    def restore(self, reports: Iterable[EvaluationReport], current_version: int) -> None:
        """After recovery: the stored reports (in the order they were taken)."""
        self._versions.clear()
        self._keys.clear()
        for report in reports:
            self._versions.setdefault(report.version, _Version()).reports[report.client_id] = report
            self._keys[report.idempotency_key] = report
        self._forget_before(current_version - self.kept_versions + 1)

    def summary(self, version: int) -> dict[str, float] | None:
        held = self._versions.get(version)
        return held.summary() if held is not None else None

    def versions(self) -> list[int]:
        return sorted(self._versions)

    def _forget_before(self, oldest: int) -> None:
        for version in [v for v in self._versions if v < oldest]:
            del self._versions[version]
        for key in [k for k, r in self._keys.items() if r.version < oldest]:
            del self._keys[key]


__all__ = [
    "CLIENTS",
    "EXAMPLES",
    "KEPT_VERSIONS",
    "MAX_METRICS",
    "PREFIX",
    "EvaluationReport",
    "FederatedEvaluations",
    "PendingReport",
    "ReportOutcome",
    "check_report",
]
