"""Misuse of the SDK's API is a ValueError that says how to fix the call, raised
before anything is sent."""

from __future__ import annotations

import numpy as np
import pytest

from client_sdk import Client, UpdateRejected
from server import JobConfig, StrategyConfig
from server.app import RunningServer
from tests.conftest import small_model


@pytest.fixture
def running(serve) -> RunningServer:  # type: ignore[no-untyped-def]
    return serve(JobConfig(strategy=StrategyConfig(name="fedasync")))


def delta() -> dict[str, np.ndarray]:
    return {name: np.zeros_like(t) for name, t in small_model().items()}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.push(-1, delta()), "base_version must be >= 0"),
        (lambda c: c.push(0, delta(), num_samples=-5), "num_samples must be >= 1"),
        (lambda c: c.pull(min_version=-1), "min_version must be >= 0"),
        (lambda c: c.pull(min_version=3, wait_s=1e9), "wait_s must be between 0 and 3600"),
    ],
)
def test_misuse_is_a_value_error(running: RunningServer, call, message: str) -> None:  # type: ignore[no-untyped-def]
    with Client(running.address, insecure=True) as client, pytest.raises(ValueError, match=message):
        call(client)
    assert running.core.job("default").stats.updates_accepted == 0


def test_reused_key_with_other_sample_count_is_refused(running: RunningServer) -> None:
    with Client(running.address, insecure=True) as client:
        client.push(0, delta(), num_samples=3, idempotency_key="k")
        with pytest.raises(UpdateRejected, match="already used for another update"):
            client.push(0, delta(), num_samples=4, idempotency_key="k")
    assert running.core.job("default").stats.updates_accepted == 1


def test_job_info_reports_limits(running: RunningServer) -> None:
    with Client(running.address, insecure=True) as client:
        info = client.job_info()
    assert info.max_update_bytes == 2 << 30
    assert info.strategy == "fedasync" and not info.synchronous
    assert [s.name for s in info.specs] == list(small_model())
