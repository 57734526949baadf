"""Prometheus metrics of a real server on loopback, scraped while SDK clients
push and pull: the values move with what the clients did."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable

import numpy as np
import pytest

from client_sdk import Client, JobNotFound, NotAcceptedNow, UpdateRejected
from client_sdk._secure import SecureRound
from server import JobConfig, StrategyConfig
from server.app import RunningServer
from server.config import SecAggConfig
from tests.prometheus_text import Samples, parse_samples, value
from tests.conftest import small_model

MODEL_BYTES = sum(array.nbytes for array in small_model().values())


def scrape(running: RunningServer) -> Samples:
    """One scrape of the server's /metrics over HTTP, as Prometheus does it:
    (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{running.http_address}/metrics", timeout=10) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        body = response.read()
    return parse_samples(body)


def delta(scale: float = 0.1) -> dict[str, np.ndarray]:
    return {name: np.full_like(array, scale) for name, array in small_model().items()}


def test_plain_federation_moves_the_metrics(serve: Callable[..., RunningServer]) -> None:
    running = serve(JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=2), max_staleness=1), http_address="127.0.0.1:0")
    job = running.core.job("default")
    start = scrape(running)
    assert value(start, "tributary_model_version", job="default") == 0
    assert value(start, "tributary_updates_accepted_total", job="default") == 0
    assert value(start, "tributary_updates_rejected_total", job="default", reason="too_stale") == 0

    with Client(running.address, insecure=True, client_id="alice") as alice, Client(running.address, insecure=True, client_id="bob") as bob:
        base = alice.pull().version
        alice.heartbeat("training")
        bob.heartbeat("uploading")
        alice.push(base, delta(), num_samples=5, energy_joules=2.5)
        bob.push(base, delta(), num_samples=5, energy_joules=1.5)  # the buffer of 2 fills: version 1
        first = scrape(running)
        assert value(first, "tributary_model_version", job="default") == job.snapshot().version == 1
        assert value(first, "tributary_model_versions_published_total", job="default") == 1
        assert value(first, "tributary_updates_received_total", job="default") == 2
        assert value(first, "tributary_updates_accepted_total", job="default") == 2
        assert value(first, "tributary_update_staleness_versions_count", job="default") == 2
        assert value(first, "tributary_update_staleness_versions_bucket", job="default", le="0.0") == 2
        # observation counts (how many pushes and aggregations were timed), not durations
        assert value(first, "tributary_push_duration_seconds_count", job="default") == 2
        assert value(first, "tributary_aggregation_duration_seconds_count", job="default") == 1
        assert value(first, "tributary_received_bytes_total", job="default") >= 2 * MODEL_BYTES
        assert value(first, "tributary_sent_bytes_total", job="default") >= MODEL_BYTES
        assert value(first, "tributary_energy_reported_joules_total", job="default") == 4.0
        assert value(first, "tributary_connected_clients", job="default") == 2
        assert value(first, "tributary_clients", job="default", state="training") == 1
        assert value(first, "tributary_clients", job="default", state="uploading") == 1
        assert value(first, "tributary_clients", job="default", state="idle") == 0

        fresh = bob.pull().version
        alice.push(fresh, delta(), idempotency_key="a-2")
        alice.push(fresh, delta(), idempotency_key="a-2")  # a retry: a duplicate, not a second update
        bob.push(fresh, delta())  # version 2: base 0 is now 2 versions stale, above max_staleness=1
        with pytest.raises(NotAcceptedNow):
            alice.push(base, delta())
        with pytest.raises(UpdateRejected):
            bob.push(fresh, {name: np.full_like(array, np.nan) for name, array in delta().items()})
        second = scrape(running)

    with Client(running.address, job="no-such-job", insecure=True, client_id="carol") as carol:
        with pytest.raises(JobNotFound):
            carol.push(0, delta())
    third = scrape(running)

    assert value(second, "tributary_model_version", job="default") == job.snapshot().version == 2
    assert value(second, "tributary_updates_accepted_total", job="default") == 4
    assert value(second, "tributary_updates_duplicate_total", job="default") == 1
    assert value(second, "tributary_update_staleness_versions_count", job="default") == 4
    assert value(second, "tributary_updates_rejected_total", job="default", reason="too_stale") == 1
    assert value(second, "tributary_updates_rejected_total", job="default", reason="invalid_update") == 1
    assert value(second, "tributary_updates_received_total", job="default") == 7
    # payloads read: the 4 accepted and the NaN one (a duplicate or a stale push is refused on its header, unread)
    assert value(second, "tributary_received_bytes_total", job="default") >= 5 * MODEL_BYTES
    assert value(second, "tributary_sent_bytes_total", job="default") >= 2 * MODEL_BYTES
    assert value(second, "tributary_aggregation_duration_seconds_count", job="default") == 2
    # a job the server does not run is labelled "", never with the name the client made up
    assert value(third, "tributary_updates_rejected_total", job="", reason="unknown_job") == 1
    assert not any("no-such-job" in dict(labels).values() for _, labels in third)
    for name, labels in start:  # counters never go back between scrapes
        if name.endswith("_total"):
            assert start[(name, labels)] <= second[(name, labels)] <= third[(name, labels)]


SIZE = 2_000
SECURE_MODEL = {"w": np.zeros(SIZE - 2, np.float32), "b": np.zeros(2, np.float32)}


def test_secure_aggregation_cohorts_show_in_the_metrics(serve: Callable[..., RunningServer]) -> None:
    secagg = SecAggConfig(cohort_size=5, phase_timeout_s=3.0, upload_timeout_s=3.0, forming_timeout_s=1.0, clip_bound=64.0)
    running = serve(JobConfig(strategy=StrategyConfig(name="fedbuff"), secure_aggregation=secagg), models={"default": SECURE_MODEL}, http_address="127.0.0.1:0")
    before = scrape(running)
    assert value(before, "tributary_cohorts_completed_total", job="default") == 0
    assert value(before, "tributary_cohorts", job="default", phase="masked_input") == 0
    errors: list[BaseException] = []

    def member(index: int) -> None:
        update = np.random.default_rng(index).uniform(-1, 1, SIZE).astype(np.float32)
        try:
            with Client(running.address, insecure=True, client_id=f"m{index}") as client:
                cohort = SecureRound(client)
                cohort.start()
                cohort.submit(0, update, 10 + index, energy_joules=1.0)
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=member, args=(index,)) for index in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    after = scrape(running)
    assert value(after, "tributary_cohorts_completed_total", job="default") == 1
    assert value(after, "tributary_model_version", job="default") == running.core.job("default").snapshot().version == 1
    assert value(after, "tributary_updates_accepted_total", job="default") == 5
    assert value(after, "tributary_updates_received_total", job="default") == 5  # masked uploads
    assert value(after, "tributary_received_bytes_total", job="default") >= 5 * SIZE  # at least one byte a value
    assert value(after, "tributary_energy_reported_joules_total", job="default") == 5.0
    assert value(after, "tributary_aggregation_duration_seconds_count", job="default") == 1
    assert sum(value(after, "tributary_cohorts_aborted_total", job="default", reason=r) for r in ("too_few_members", "members_vanished", "shutting_down", "aggregate_refused", "other")) == 0
    assert all(value(after, "tributary_cohorts", job="default", phase=p) == 0 for p in ("advertise_keys", "share_keys", "masked_input", "unmasking"))
