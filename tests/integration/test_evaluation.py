"""Server-side evaluation with a real server and SDK clients: every version
the clients publish is evaluated (off the push path), the metrics land in the
state directory and come back after a restart; a bad evaluator stops the
start with an error naming the job and value."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

from client_sdk import Client, RetryPolicy
from server import JobConfig, ServerConfig, StrategyConfig
from server.app import RunningServer, running_server
from server.errors import ConfigError
from server.store import DATABASE_NAME
from tests.conftest import small_model

EVALUATOR = "tests.integration.test_evaluation:weight_mean"
FAST = RetryPolicy(max_attempts=2, initial_backoff_s=0.05)


def weight_mean(tensors: Mapping[str, np.ndarray]) -> dict[str, float]:
    """A metric that moves with every update: the mean of the weight matrix."""
    return {"accuracy": float(np.mean(tensors["layer.weight"])), "loss": float(np.mean(np.abs(tensors["layer.bias"])))}


def returns_text(tensors: Mapping[str, np.ndarray]) -> str:
    return "fine"


def delta() -> dict[str, np.ndarray]:
    return {name: np.full(t.shape, 0.1, dtype=t.dtype) for name, t in small_model().items()}


def config(state_dir: Path, evaluator: str = EVALUATOR) -> ServerConfig:
    job = JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=1), evaluator=evaluator)
    return ServerConfig(address="127.0.0.1:0", jobs=(job,), state_dir=state_dir, insecure=True)


@contextlib.contextmanager
def client(running: RunningServer, client_id: str) -> Iterator[Client]:
    with Client(running.address, "default", client_id=client_id, insecure=True, retry=FAST) as c:
        yield c


def wait_for_evaluation(running: RunningServer, version: int) -> None:
    loop = running.evaluations["default"]
    pause = threading.Event()
    for _ in range(1000):
        if loop.last_version is not None and loop.last_version >= version:
            return
        pause.wait(0.02)
    raise AssertionError(f"version {version} was not evaluated; last: {loop.last_version}")


def test_each_version_is_evaluated_stored_and_restored_after_a_restart(tmp_path: Path) -> None:
    with running_server(config(tmp_path), {"default": small_model()}, grace_s=0.5) as running:
        job = running.core.job("default")
        with client(running, "a") as a, client(running, "b") as b:
            for i, pusher in enumerate([a, b, a, b], start=1):
                assert pusher.push(i - 1, delta()).version_after == i
                wait_for_evaluation(running, i)  # one version at a time: none is skipped
            assert [v for v, _, _ in job.stats.evaluations] == [0, 1, 2, 3, 4]
            for version, _, metrics in job.stats.evaluations:
                assert metrics["accuracy"] == pytest.approx(float(np.mean(small_model()["layer.weight"])) + 0.1 * version, abs=1e-5)
        evaluated = list(job.stats.evaluations)
        assert running.evaluations["default"].failures == 0

    db = sqlite3.connect(tmp_path / DATABASE_NAME)
    rows = db.execute("SELECT version, metrics FROM evaluations WHERE job_id = 'default' ORDER BY version").fetchall()
    db.close()
    assert [(v, json.loads(m)) for v, m in rows] == [(v, m) for v, _, m in evaluated]

    with running_server(config(tmp_path), {"default": small_model()}, grace_s=0.5) as running:
        job = running.core.job("default")
        assert running.recovered == ("default",)
        assert list(job.stats.evaluations) == evaluated  # restored, and version 4 not evaluated again
        with client(running, "a") as a:
            a.push(4, delta())
            wait_for_evaluation(running, 5)
        assert [v for v, _, _ in job.stats.evaluations] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("evaluator", "message"),
    [
        ("tributary_missing_module:evaluate", "job 'default': evaluator 'tributary_missing_module:evaluate': cannot import module"),
        ("tests.integration.test_evaluation:nothing", "has no 'nothing'"),
        ("tests.integration.test_evaluation:EVALUATOR", "'EVALUATOR' is a str, not a function"),
        ("tests.integration.test_evaluation:returns_text", "failed on version 0: BadMetrics: returned a str"),
    ],
)
def test_a_bad_evaluator_stops_the_start_and_frees_the_state_directory(tmp_path: Path, evaluator: str, message: str) -> None:
    with pytest.raises(ConfigError, match="job 'default': evaluator") as error:
        with running_server(config(tmp_path, evaluator), {"default": small_model()}, grace_s=0.5):
            pass
    assert message in str(error.value)
    with running_server(config(tmp_path), {"default": small_model()}, grace_s=0.5) as running:  # the directory is usable again
        assert running.evaluations["default"].last_version == 0
