"""Federated evaluation's aggregate and rules (server/federated.py), and how a
job merges it with the server evaluator's metrics of the same version."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from server.config import JobConfig
from server.core import Job
from server.store import StateStore
from server.errors import IdempotencyConflict, InvalidUpdate, UnknownVersion
from server.federated import KEPT_VERSIONS, MAX_METRICS, EvaluationReport, FederatedEvaluations, check_report
from tests.conftest import small_model


def report(client: str = "a", version: int = 0, n: int = 10, key: str | None = None, **metrics: float) -> EvaluationReport:
    return EvaluationReport(client, version, n, metrics or {"accuracy": 0.5}, key or f"{client}-{version}-{n}-{sorted(metrics.items())}")


def take(fed: FederatedEvaluations, r: EvaluationReport, current: int = 5) -> int:
    pending = fed.prepare(r, current)
    fed.commit(pending, current)
    return pending.outcome.reports_for_version


def test_weighted_mean_clients_and_examples() -> None:
    fed = FederatedEvaluations()
    assert take(fed, report("a", 3, 10, accuracy=0.5, loss=1.0)) == 1
    assert take(fed, report("b", 3, 30, accuracy=0.9)) == 2
    summary = fed.summary(3)
    assert summary is not None
    assert summary["federated_accuracy"] == pytest.approx((0.5 * 10 + 0.9 * 30) / 40)
    assert summary["federated_loss"] == pytest.approx(1.0)  # only a reported it
    assert (summary["federated_clients"], summary["federated_examples"]) == (2.0, 40.0)


def test_a_retry_counts_once_and_a_new_report_replaces() -> None:
    fed = FederatedEvaluations()
    first = report("a", 2, 10, key="k1", accuracy=0.2)
    take(fed, first)
    retry = fed.prepare(first, 5)
    assert retry.outcome.duplicate and retry.outcome.reports_for_version == 1
    fed.commit(retry, 5)
    assert fed.reports_taken == 1
    take(fed, report("a", 2, 30, key="k2", accuracy=0.8))
    assert fed.summary(2) == {"federated_accuracy": pytest.approx(0.8), "federated_clients": 1.0, "federated_examples": 30.0}
    with pytest.raises(IdempotencyConflict, match="k1"):
        fed.prepare(report("a", 2, 11, key="k1", accuracy=0.2), 5)


def test_versions_unknown_or_too_old_are_refused_and_memory_stays_bounded() -> None:
    fed = FederatedEvaluations(kept_versions=3)
    with pytest.raises(UnknownVersion, match="unknown version 6"):
        fed.prepare(report(version=6), 5)
    with pytest.raises(UnknownVersion, match="too old"):
        fed.prepare(report(version=2), 5)
    for version in (3, 4, 5):
        take(fed, report(version=version))
    take(fed, report("b", 7), current=7)
    assert fed.versions() == [5, 7]
    assert KEPT_VERSIONS >= 16


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (EvaluationReport("", 0, 1, {"accuracy": 1.0}, "k"), "client_id"),
        (EvaluationReport("a", 0, 1, {"accuracy": 1.0}, ""), "idempotency_key"),
        (EvaluationReport("a", 0, 0, {"accuracy": 1.0}, "k"), "num_examples is 0"),
        (EvaluationReport("a", 0, 10**12, {"accuracy": 1.0}, "k"), "num_examples"),
        (EvaluationReport("a", 0, 1, {}, "k"), "at least one metric"),
        (EvaluationReport("a", 0, 1, {f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}, "k"), "at most 32"),
        (EvaluationReport("a", 0, 1, {"accuracy": math.nan}, "k"), "finite"),
        (EvaluationReport("a", 0, 1, {"accuracy": math.inf}, "k"), "finite"),
        (EvaluationReport("a", 0, 1, {"accuracy": 1e300}, "k"), "magnitude"),
        (EvaluationReport("a", 0, 1, {"bad name": 1.0}, "k"), "metric name"),
        (EvaluationReport("a", 0, 1, {"": 1.0}, "k"), "metric name"),
        (EvaluationReport("a", 0, 1, {"clients": 3.0}, "k"), "'clients' is reserved"),
        (EvaluationReport("a", 0, 1, {"examples": 3.0}, "k"), "'examples' is reserved"),
    ],
)
def test_bad_reports_say_what_is_wrong(bad: EvaluationReport, message: str) -> None:
    with pytest.raises(InvalidUpdate, match=message):
        check_report(bad)


def test_job_merges_federated_and_server_metrics_per_version() -> None:
    job = Job(JobConfig(), small_model())
    job.record_evaluation(0, 100.0, {"accuracy": 0.3})
    job.report_evaluation(report("a", 0, 4, accuracy=0.7))
    assert list(job.stats.evaluations) == [
        (0, 100.0, {"accuracy": 0.3, "federated_accuracy": 0.7, "federated_clients": 1.0, "federated_examples": 4.0})
    ]
    job.record_evaluation(0, 101.0, {"accuracy": 0.4})  # the server's metrics replaced, the federated ones kept
    assert job.stats.evaluations[0][2] == {"accuracy": 0.4, "federated_accuracy": 0.7, "federated_clients": 1.0, "federated_examples": 4.0}
    assert job.last_server_evaluation() == 0
    with pytest.raises(InvalidUpdate):
        job.report_evaluation(report("b", 0, 0))
    assert job.federated_reports_taken == 1


def test_a_key_the_state_directory_holds_from_a_forgotten_version_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    """Keys of versions no longer kept in memory stay in the state directory: a new
    report under one is an IdempotencyConflict (INVALID_ARGUMENT), not an error the
    client would retry forever."""
    store = StateStore(tmp_path)
    job = Job(JobConfig(), small_model())
    store.open_job(job)
    try:
        job.report_evaluation(report("a", 0, 4, key="reused", accuracy=0.5))
        before = list(job.stats.evaluations)
        with pytest.raises(IdempotencyConflict, match="'reused' was used for an earlier report"):
            store.record_federated_report(job.job_id, report("a", 0, 9, key="reused", accuracy=0.9), 1.0, {"federated_accuracy": 0.9})
        assert list(job.stats.evaluations) == before and job.federated_summary(0) == {"federated_accuracy": 0.5, "federated_clients": 1.0, "federated_examples": 4.0}
    finally:
        store.close()
