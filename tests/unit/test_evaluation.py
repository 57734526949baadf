"""Server-side evaluation: loading the plug-in (errors name the job and value),
the background loop (newest version only, failures logged and counted, pushes
never wait), and evaluations in the state directory (schema 2 -> 3, restored)."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.config import JobConfig, ServerConfig, StrategyConfig
from server.core import Job, Update, UpdateHeader
from server.errors import ConfigError
from server.evaluation import EvaluationLoop, checked_metrics, load_evaluator
from server.store import DATABASE_NAME, StateStore
from tests.unit.test_job import ONES, initial_model

NOT_CALLABLE = 42


def mean_evaluator(tensors: Mapping[str, np.ndarray]) -> dict[str, float]:
    """A stand-in metric that moves with the model: the mean of `w`."""
    return {"accuracy": float(np.mean(tensors["w"])), "loss": 1.0}


def text_evaluator(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {"accuracy": "high"}


def failing_evaluator(tensors: Mapping[str, np.ndarray]) -> dict[str, float]:
    raise RuntimeError("the test set is gone")


def job(**settings: Any) -> Job:
    return Job(JobConfig(job_id="evaljob", strategy=StrategyConfig(name="fedasync", alpha=0.5), **settings), initial_model())


def push(target: Job, key: str, base: int | None = None) -> int:
    version = target.snapshot().version if base is None else base
    header = UpdateHeader(job_id=target.job_id, client_id="c1", idempotency_key=key, base_version=version, num_samples=1, specs=target.specs)
    assert target.admit(header) is None
    return target.submit(Update(header, ONES)).version_after


def wait_until(predicate: Any, timeout_s: float = 20.0) -> None:
    event = threading.Event()
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return
        event.wait(0.02)
    raise AssertionError("condition not met in time")


# -- configuration and loading ------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"evaluator": "no_colon"}, "evaluator (--evaluator) must be \"module:function\""),
        ({"evaluator": "pkg.mod:"}, "got 'pkg.mod:'"),
        ({"evaluator": "bad module:f"}, "got 'bad module:f'"),
        ({"evaluator": "m:f", "evaluate_every": 0}, "evaluate_every (--evaluate-every) must be an integer >= 1"),
        ({"evaluator": "m:f", "evaluate_every": True}, "evaluate_every (--evaluate-every) must be an integer >= 1"),
        ({"evaluate_every": 3}, "evaluate_every (--evaluate-every) only applies with an evaluator"),
    ],
)
def test_bad_evaluator_settings_name_the_job_and_value(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="job 'evaljob'") as error:
        JobConfig(job_id="evaljob", **settings)
    assert message in str(error.value)


def test_toml_keys_build_the_evaluator_settings() -> None:
    config = ServerConfig.from_mapping({"insecure": True, "jobs": [{"id": "j", "evaluator": "a.b:c", "evaluate_every": 4}]})
    assert (config.jobs[0].evaluator, config.jobs[0].evaluate_every) == ("a.b:c", 4)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tributary_no_such_module:f", "cannot import module 'tributary_no_such_module': ModuleNotFoundError"),
        ("tests.unit.test_evaluation:missing", "module 'tests.unit.test_evaluation' has no 'missing'"),
        ("tests.unit.test_evaluation:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a function"),
    ],
)
def test_loading_errors_name_the_job_and_value(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_evaluator(spec, "evaljob")
    assert f"job 'evaljob': evaluator {spec!r}" in str(error.value)
    assert message in str(error.value)


def test_a_loaded_evaluator_is_the_function() -> None:
    assert load_evaluator("tests.unit.test_evaluation:mean_evaluator", "j") is mean_evaluator


@pytest.mark.parametrize(
    ("evaluator", "message"),
    [
        (text_evaluator, "accuracy='high'; metrics must be finite numbers"),
        (lambda tensors: 0.9, "returned a float, not a mapping"),
        (lambda tensors: {"loss": float("nan")}, "metrics must be finite numbers"),
        (failing_evaluator, "RuntimeError: the test set is gone"),
        (lambda tensors: {"federated_accuracy": 0.9}, "the federated_ prefix is reserved"),
    ],
)
def test_the_trial_run_at_start_refuses_a_bad_evaluator(evaluator: Any, message: str) -> None:
    target = job()
    with pytest.raises(ConfigError, match="job 'evaljob': evaluator 'x:y' failed on version 0") as error:
        EvaluationLoop(target, evaluator, "x:y").check()
    assert message in str(error.value)
    assert list(target.stats.evaluations) == []


def test_numpy_numbers_are_metrics() -> None:
    assert checked_metrics({"accuracy": np.float32(0.5), "n": np.int64(3)}) == {"accuracy": 0.5, "n": 3.0}


# -- the loop ------------------------------------------------------------------------


def test_a_slow_evaluator_skips_to_the_newest_version_and_pushes_never_wait() -> None:
    target = job()
    gate = threading.Event()
    entered = threading.Event()

    def slow(tensors: Mapping[str, np.ndarray]) -> dict[str, float]:
        if float(np.mean(tensors["w"])) != 2.5:  # any version but the initial one waits for the gate
            entered.set()
            assert gate.wait(20)
        return mean_evaluator(tensors)

    loop = EvaluationLoop(target, slow, "slow")
    loop.check()
    loop.start()
    try:
        assert push(target, "k1") == 1
        assert entered.wait(20)  # evaluating version 1, stuck
        for i in range(2, 6):
            assert push(target, f"k{i}") == i  # pushes go through meanwhile
        gate.set()
        wait_until(lambda: loop.last_version == 5)
    finally:
        loop.stop()
    assert [v for v, _, _ in target.stats.evaluations] == [0, 1, 5]
    version, evaluated_at, metrics = target.stats.evaluations[-1]
    assert metrics == mean_evaluator(target.snapshot().tensors) and evaluated_at > 0
    assert loop.failures == 0 and loop.evaluated == 3


def test_a_failing_evaluation_is_logged_counted_and_the_next_version_evaluated(caplog: pytest.LogCaptureFixture) -> None:
    target = job()
    calls: list[int] = []

    def flaky(tensors: Mapping[str, np.ndarray]) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("flaky disk")
        return mean_evaluator(tensors)

    loop = EvaluationLoop(target, flaky, "flaky:eval")
    loop.check()
    loop.start()
    try:
        with caplog.at_level(logging.ERROR, logger="tributary.server"):
            push(target, "k1")
            wait_until(lambda: loop.failures == 1)
            push(target, "k2")
            wait_until(lambda: loop.last_version == 2 and loop.evaluated == 2)
    finally:
        loop.stop()
    assert [v for v, _, _ in target.stats.evaluations] == [0, 2]
    assert "job 'evaljob': evaluator flaky:eval failed on version 1 (1 failure(s) so far; the server keeps serving): ValueError: flaky disk" in caplog.text


def test_evaluate_every_waits_for_that_many_versions() -> None:
    target = job(evaluator="tests.unit.test_evaluation:mean_evaluator", evaluate_every=3)
    loop = EvaluationLoop(target, mean_evaluator, every=3)
    loop.check()
    for i in range(1, 3):
        push(target, f"k{i}")
    loop.start()
    try:
        push(target, "k3")
        wait_until(lambda: loop.last_version == 3)
        push(target, "k4")
        assert target.wait_for_version(10, 0.3).version == 4
    finally:
        loop.stop()
    assert [v for v, _, _ in target.stats.evaluations] == [0, 3]


# -- the state directory --------------------------------------------------------------


def test_evaluations_survive_a_restart_and_a_restarted_loop_goes_on_from_them(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    first = job()
    store.open_job(first)
    loop = EvaluationLoop(first, mean_evaluator)
    loop.check()
    push(first, "k1")
    loop.evaluate(1, first.snapshot().tensors)
    store.close()

    store = StateStore(tmp_path)
    again = job()
    assert store.open_job(again)
    try:
        assert [(v, m) for v, _, m in again.stats.evaluations] == [(v, m) for v, _, m in first.stats.evaluations]
        restarted = EvaluationLoop(again, failing_evaluator)
        assert restarted.last_version == 1
        restarted.check()  # version 1 was evaluated before the restart: not again
    finally:
        store.close()


def test_a_schema_2_directory_is_migrated_to_3(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    first = job()
    store.open_job(first)
    push(first, "k1")
    store.close()
    db = sqlite3.connect(tmp_path / DATABASE_NAME)  # make it what a schema-2 server wrote
    db.execute("DROP TABLE evaluations")
    db.execute("ALTER TABLE update_log DROP COLUMN wire_bytes")
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
    db.commit()
    db.close()

    store = StateStore(tmp_path)
    again = job()
    store.open_job(again)
    try:
        assert again.snapshot().version == 1 and list(again.stats.evaluations) == []
        push(again, "k2")
        again.record_evaluation(2, 123.0, {"accuracy": 0.5})
    finally:
        store.close()
    db = sqlite3.connect(tmp_path / DATABASE_NAME)
    try:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("4",)
        wire = db.execute("SELECT idempotency_key, wire_bytes FROM update_log ORDER BY seq").fetchall()
        assert wire == [("k1", None), ("k2", sum(a.nbytes for a in ONES.values()))]  # unknown before the migration
        (metrics,) = db.execute("SELECT metrics FROM evaluations WHERE version = 2").fetchone()
        assert json.loads(metrics) == {"accuracy": 0.5}
    finally:
        db.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    StateStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / DATABASE_NAME)
    db.execute("UPDATE meta SET value = '5' WHERE key = 'schema'")
    db.commit()
    db.close()
    from server.errors import StateError

    with pytest.raises(StateError, match="has schema 5; this server reads 4"):
        StateStore(tmp_path)


# -- the server command's defaults ----------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [(None, "edge.tasks:digits_evaluator"), ("none", None), ("pkg.mod:fn", "pkg.mod:fn")],
)
def test_task_digits_evaluates_by_default_unless_told_otherwise(given: str | None, expected: str | None) -> None:
    from tributary._server_cmd import _JOB_FLAGS, build_config

    options: dict[str, Any] = {flag: None for flag in _JOB_FLAGS}
    options |= {"config_path": None, "task": "digits", "seed": 0, "insecure": True, "evaluator": given}
    config, _ = build_config(options)
    assert config.jobs[0].evaluator == expected


def test_the_digits_evaluator_scores_the_digits_model_on_its_held_out_split() -> None:
    from edge.tasks import initial_weights

    evaluator = load_evaluator("edge.tasks:digits_evaluator", "digits")
    metrics = checked_metrics(evaluator(initial_weights(0)))
    assert set(metrics) == {"accuracy", "loss"}
    assert 0.0 <= metrics["accuracy"] <= 0.3  # an untrained CNN: about chance on 10 classes
    assert metrics["loss"] > 1.5  # about ln(10)
