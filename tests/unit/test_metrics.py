"""server.metrics without gRPC: the rejection and cohort-abort categories, and
the series ServerMetrics renders from real jobs, rosters and cohort managers."""

from __future__ import annotations

import threading

import numpy as np
import prometheus_client
import pytest

from proto.secagg.protocol import ProtocolViolation
from proto.secagg.quantize import FixedPoint
from proto.tensors import MalformedPayload
from server.cohorts import CohortManager
from server.config import JobConfig, SecAggConfig, StrategyConfig
from server.core import AggregationCore, Job, Update, UpdateHeader
from server.errors import (
    IdempotencyConflict,
    InvalidUpdate,
    JobNotFound,
    LimitExceeded,
    NoTrainingSlot,
    NotAuthenticated,
    PermissionDenied,
    PreconditionFailed,
    RetryLater,
    RoundClosed,
    ShuttingDown,
    StaleUpdate,
    StreamDeadlineExceeded,
    UnknownVersion,
    UploadSuperseded,
)
from server.metrics import COHORT_ABORT_REASONS, REJECTION_REASONS, ServerMetrics, cohort_abort_reason, rejection_reason
from server.roster import ClientState
from server.secagg import CohortAborted, CohortCoordinator
from server.uploads import TruncatedPayload
from tests.prometheus_text import Samples, parse_samples, value


def scrape(metrics: ServerMetrics) -> Samples:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return parse_samples(body)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (StaleUpdate(5, 2), "too_stale"),
        (UnknownVersion("v9"), "unknown_version"),
        (NoTrainingSlot("no slot"), "no_slot"),
        (RoundClosed("closed"), "wrong_phase"),
        (PreconditionFailed("secure job"), "wrong_phase"),
        (ProtocolViolation("out of phase"), "wrong_phase"),
        (InvalidUpdate("NaN"), "invalid_update"),
        (IdempotencyConflict("key reused"), "invalid_update"),
        (MalformedPayload("short"), "invalid_update"),
        (TruncatedPayload("cut"), "invalid_update"),
        (JobNotFound("nope"), "unknown_job"),
        (RetryLater("slow down", 1.0), "rate_limited"),
        (LimitExceeded("big"), "too_large"),
        (StreamDeadlineExceeded("slow"), "deadline_exceeded"),
        (CohortAborted("gone"), "cohort_aborted"),
        (NotAuthenticated("who"), "unauthenticated"),
        (PermissionDenied("not you"), "permission_denied"),
        (ShuttingDown("bye"), "unavailable"),
        (UploadSuperseded("taken over"), "other"),
        (RuntimeError("our bug"), "other"),
    ],
)
def test_each_refusal_has_its_reason_category(error: BaseException, reason: str) -> None:
    assert rejection_reason(error) == reason
    assert reason in REJECTION_REASONS


def test_cohort_abort_reasons_are_categorised_from_the_real_wording() -> None:
    coordinator = CohortCoordinator(
        "c", [1, 2, 3], neighbours=2, min_survivors=2, fixed_point=FixedPoint(bits=32, scale=1.0, bound=1.0, max_summands=3), vector_length=3
    )
    with pytest.raises(CohortAborted):
        coordinator.close_advertising()  # nobody advertised
    assert coordinator.abort_reason is not None
    assert cohort_abort_reason(coordinator.abort_reason) == "too_few_members"
    assert cohort_abort_reason("the cohort's aggregate would overflow tensor 'w'; nothing was applied") == "aggregate_refused"
    assert cohort_abort_reason("internal error while closing unmasking: boom") == "other"
    assert {cohort_abort_reason(r) for r in ("every member vanished before the phase could close", "the server is shutting down")} == {
        "members_vanished",
        "shutting_down",
    }
    assert set(COHORT_ABORT_REASONS) >= {"too_few_members", "members_vanished", "shutting_down", "aggregate_refused", "other"}


def plain_job(job_id: str = "plain", buffer_size: int = 2) -> Job:
    config = JobConfig(job_id=job_id, strategy=StrategyConfig(name="fedbuff", buffer_size=buffer_size), heartbeat_interval_s=5.0)
    return Job(config, {"w": np.zeros(3, np.float32)})


def push(job: Job, key: str, base: int) -> None:
    header = UpdateHeader(job.job_id, f"client-{key}", key, base, 1, job.specs)
    assert job.admit(header) is None
    job.submit(Update(header, {"w": np.ones(3, np.float32)}))


def test_state_series_follow_the_job() -> None:
    job = plain_job()
    metrics = ServerMetrics(AggregationCore([job]))
    before = scrape(metrics)
    assert value(before, "tributary_model_version", job="plain") == 0
    assert value(before, "tributary_updates_accepted_total", job="plain") == 0
    assert value(before, "tributary_updates_rejected_total", job="plain", reason="too_stale") == 0  # series exist from the start
    assert ("tributary_model_accuracy", (("job", "plain"),)) not in before  # no evaluator yet

    push(job, "a", 0)
    push(job, "b", 0)  # the buffer of 2 fills: version 1
    push(job, "c", 0)  # one version stale
    job.roster.beat("client-a", ClientState.TRAINING, 1)
    job.roster.beat("client-b", ClientState.IDLE, 1)
    job.stats.evaluations.append((1, 0.0, {"accuracy": 0.75, "loss": 0.5}))
    after = scrape(metrics)
    assert value(after, "tributary_model_version", job="plain") == 1
    assert value(after, "tributary_model_versions_published_total", job="plain") == 1
    assert value(after, "tributary_updates_accepted_total", job="plain") == 3
    assert value(after, "tributary_update_staleness_versions_count", job="plain") == 3
    assert value(after, "tributary_update_staleness_versions_bucket", job="plain", le="0.0") == 2
    assert value(after, "tributary_update_staleness_versions_bucket", job="plain", le="1.0") == 3
    assert value(after, "tributary_update_staleness_versions_sum", job="plain") == 1
    assert value(after, "tributary_aggregation_duration_seconds_count", job="plain") == 1
    assert value(after, "tributary_connected_clients", job="plain") == 2
    assert value(after, "tributary_clients", job="plain", state="training") == 1
    assert value(after, "tributary_clients", job="plain", state="uploading") == 0
    assert value(after, "tributary_model_accuracy", job="plain") == 0.75


def test_servicer_notes_use_bounded_labels() -> None:
    job = plain_job()
    metrics = ServerMetrics(AggregationCore([job]))
    metrics.note_update_received("made-up-job")
    metrics.note_rejected("made-up-job", JobNotFound("no such job"))
    metrics.note_rejected("plain", StaleUpdate(9, 4))
    metrics.note_received_bytes("plain", 12)
    samples = scrape(metrics)
    assert value(samples, "tributary_updates_received_total", job="") == 1
    assert value(samples, "tributary_updates_rejected_total", job="", reason="unknown_job") == 1
    assert value(samples, "tributary_updates_rejected_total", job="plain", reason="too_stale") == 1
    assert value(samples, "tributary_received_bytes_total", job="plain") == 12
    assert not any("made-up-job" in dict(labels).values() for _, labels in samples)


def test_each_server_has_its_own_registry() -> None:
    first, second = plain_job("one"), plain_job("one")
    metrics_one, metrics_two = ServerMetrics(AggregationCore([first])), ServerMetrics(AggregationCore([second]))
    push(first, "a", 0)
    assert value(scrape(metrics_one), "tributary_updates_accepted_total", job="one") == 1
    assert value(scrape(metrics_two), "tributary_updates_accepted_total", job="one") == 0
    assert b"tributary_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cohort_series_follow_the_manager() -> None:
    clock = FakeClock()
    config = SecAggConfig(cohort_size=3, forming_timeout_s=60.0, phase_timeout_s=5.0, upload_timeout_s=5.0, clip_bound=64.0)
    job = Job(JobConfig(strategy=StrategyConfig(name="fedbuff"), secure_aggregation=config), {"w": np.zeros(4, np.float32)})
    manager = CohortManager(job, config, clock=clock)
    metrics = ServerMetrics(AggregationCore([job]), {job.job_id: manager})
    waiters = [threading.Thread(target=manager.join, args=(f"m{i}", 30.0)) for i in range(2)]
    for waiter in waiters:
        waiter.start()
    while manager.waiting_clients() < 2:
        threading.Event().wait(0.01)
    assert value(scrape(metrics), "tributary_cohort_waiting_clients", job="default") == 2
    assert manager.join("m2", 0.0) is not None  # the third forms the cohort
    for waiter in waiters:
        waiter.join(10)
    formed = scrape(metrics)
    assert value(formed, "tributary_cohort_waiting_clients", job="default") == 0
    assert value(formed, "tributary_cohorts", job="default", phase="advertise_keys") == 1
    assert value(formed, "tributary_cohorts", job="default", phase="unmasking") == 0

    clock.now += 4 * config.phase_timeout_s  # every member vanished: the next join prunes the cohort
    assert manager.join("late", 0.0) is None
    pruned = scrape(metrics)
    assert value(pruned, "tributary_cohorts", job="default", phase="advertise_keys") == 0
    assert value(pruned, "tributary_cohorts_aborted_total", job="default", reason="members_vanished") == 1
    assert value(pruned, "tributary_cohorts_completed_total", job="default") == 0
    manager.shut_down()
