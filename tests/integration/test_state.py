"""The state directory over real gRPC: restarts resume exactly, retention holds,
a torn checkpoint falls back to an older one, other settings are refused, and
shutdown releases waiting clients and saves the state."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client_sdk import Client, RetryPolicy
from client_sdk._errors import CohortAborted
from client_sdk._secure import SecureRound
from server import ConfigError, JobConfig, ServerConfig, StrategyConfig
from server.app import RunningServer, running_server
from server.config import RetentionConfig, SecAggConfig
from server.core import Job, Update, UpdateHeader
from server.store import DATABASE_NAME
from proto.tensors import specs_of
from tests.conftest import small_model

FEDBUFF = JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=3))
FAST = RetryPolicy(max_attempts=2, initial_backoff_s=0.05)


def config(state: Path, *jobs: JobConfig, **retention: int) -> ServerConfig:
    return ServerConfig(
        address="127.0.0.1:0", jobs=jobs or (FEDBUFF,), state_dir=state, insecure=True, retention=RetentionConfig(**retention)
    )


def delta_for(index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    return {name: (0.1 * rng.standard_normal(a.shape)).astype(np.float32) for name, a in small_model().items()}


def push(running: RunningServer, index: int, base: int | None = None) -> tuple[int, bool]:
    with Client(running.address, client_id=f"c{index % 3}", retry=FAST, insecure=True) as client:
        version = client.pull().version if base is None else base
        ack = client.push(version, delta_for(index), num_samples=1 + index, idempotency_key=f"k{index}")
        return ack.version_after, ack.duplicate


def test_a_restart_resumes_the_model_the_buffer_and_the_acks(tmp_path: Path) -> None:
    reference = Job(FEDBUFF, small_model())
    for index in range(8):
        version = reference.snapshot().version
        header = UpdateHeader("default", f"c{index % 3}", f"k{index}", version, 1 + index, tuple(specs_of(delta_for(index))))
        reference.submit(Update(header, delta_for(index)))

    with running_server(config(tmp_path), {"default": small_model()}, grace_s=0.5) as running:
        for index in range(5):
            push(running, index)
        assert running.core.job("default").snapshot().version == 1
    # A second start ignores the initial model it is given: the state wins.
    with running_server(config(tmp_path), {"default": small_model(seed=99)}, grace_s=0.5) as running:
        job = running.core.job("default")
        assert running.recovered == ("default",)
        assert (job.snapshot().version, job.pending_updates, job.stats.updates_accepted) == (1, 2, 5)
        assert push(running, 4, base=1) == (1, True)  # a retry after the restart gets its first ack
        for index in range(5, 8):
            push(running, index)
        served = job.snapshot()
    assert served.version == reference.snapshot().version == 2
    for name, array in reference.snapshot().tensors.items():
        np.testing.assert_array_equal(served.tensors[name], array)


def test_retention_keeps_the_newest_checkpoints_and_drops_covered_payloads(tmp_path: Path) -> None:
    single = JobConfig(strategy=StrategyConfig(name="fedasync"))
    with running_server(config(tmp_path, single, checkpoint_every=1, keep_checkpoints=2), {"default": small_model()}, grace_s=0.5) as running:
        for index in range(6):
            push(running, index)
        deadline = time.monotonic() + 10
        while len(list((tmp_path / "checkpoints" / "default").iterdir())) > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    files = sorted(p.name for p in (tmp_path / "checkpoints" / "default").iterdir())
    assert files == ["v000000000005.safetensors", "v000000000006.safetensors"]
    db = sqlite3.connect(tmp_path / DATABASE_NAME)
    assert db.execute("SELECT COUNT(*) FROM update_log").fetchone() == (6,)  # metadata stays (acks, reports)
    with_payload = [seq for (seq,) in db.execute("SELECT DISTINCT seq FROM update_payloads")]
    assert with_payload == [6]  # only what the oldest kept checkpoint (v5) does not cover
    assert [v for (v,) in db.execute("SELECT version FROM versions ORDER BY version")] == list(range(7))
    db.close()


def test_a_torn_newest_checkpoint_falls_back_to_an_older_one_and_replays(tmp_path: Path) -> None:
    single = JobConfig(strategy=StrategyConfig(name="fedasync"))
    with running_server(config(tmp_path, single, checkpoint_every=2, keep_checkpoints=3), {"default": small_model()}, grace_s=0.5) as running:
        for index in range(5):
            push(running, index)
        expected = running.core.job("default").snapshot()
    newest = sorted((tmp_path / "checkpoints" / "default").iterdir())[-1]
    newest.write_bytes(newest.read_bytes()[:-7])  # as if the disk lost the end of it
    with running_server(config(tmp_path, single, checkpoint_every=2, keep_checkpoints=3), {"default": small_model()}, grace_s=0.5) as running:
        recovered = running.core.job("default").snapshot()
    assert recovered.version == expected.version == 5
    for name in expected.tensors:
        np.testing.assert_array_equal(recovered.tensors[name], expected.tensors[name])


def test_other_aggregation_settings_on_the_same_state_are_refused(tmp_path: Path) -> None:
    with running_server(config(tmp_path), {"default": small_model()}, grace_s=0.5) as running:
        push(running, 0)
    other = JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=5))
    with pytest.raises(ConfigError, match=r"job 'default' .* was created with other settings \(strategy: stored .*buffer_size.*3"):
        with running_server(config(tmp_path, other), {"default": small_model()}):
            pass
    # Nothing was changed by the refused start: the first settings still resume.
    with running_server(config(tmp_path), {"default": small_model()}, grace_s=0.5) as running:
        assert running.core.job("default").pending_updates == 1


def test_a_state_dir_that_is_not_a_database_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / DATABASE_NAME).write_bytes(os.urandom(4096))
    with pytest.raises(ConfigError, match=f"{DATABASE_NAME} cannot be used"):
        with running_server(config(tmp_path), {"default": small_model()}):
            pass


def test_a_failed_durable_write_is_unavailable_and_changes_nothing(tmp_path: Path) -> None:
    with running_server(config(tmp_path), {"default": small_model()}, grace_s=0.5) as running:
        push(running, 0)
        blocker = sqlite3.connect(tmp_path / DATABASE_NAME, timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the database
        try:
            store = running.core.job("default")._journal
            assert store is not None
            store._db.execute("PRAGMA busy_timeout = 100")  # type: ignore[attr-defined]
            with Client(running.address, retry=FAST, insecure=True) as client, pytest.raises(Exception) as caught:
                client.push(0, delta_for(1), idempotency_key="blocked")
            assert getattr(caught.value, "code", None) == grpc.StatusCode.UNAVAILABLE
            assert "could not store this durably" in str(caught.value)
            assert running.core.job("default").pending_updates == 1
        finally:
            blocker.rollback()
            blocker.close()
        assert push(running, 1)[0] == 0  # and the same update goes through once the disk is back
        assert running.core.job("default").pending_updates == 2


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status)


def test_shutdown_releases_waiting_members_turns_unhealthy_and_saves_state(tmp_path: Path) -> None:
    secure = JobConfig(
        strategy=StrategyConfig(name="fedbuff"),
        secure_aggregation=SecAggConfig(cohort_size=3, forming_timeout_s=60.0, phase_timeout_s=60.0, upload_timeout_s=60.0),
    )
    outcomes: list[BaseException] = []
    with running_server(config(tmp_path, secure), {"default": small_model()}, grace_s=30.0) as running:
        assert _health(running.address) == health_pb2.HealthCheckResponse.SERVING

        def member(index: int) -> None:
            with Client(running.address, client_id=f"m{index}", retry=FAST, insecure=True) as client:
                cohort = SecureRound(client, join_timeout_s=120)
                cohort.start()
                try:
                    cohort.submit(0, np.zeros(16, np.float32), 1)
                except Exception as error:  # what the test inspects
                    outcomes.append(error)

        members = [threading.Thread(target=member, args=(i,)) for i in range(2)]  # a cohort of 3 never forms
        for thread in members:
            thread.start()
        time.sleep(0.5)
        started = time.monotonic()
    # The block exited: shutdown ran. Waiting members did not hold it for the grace period.
    took = time.monotonic() - started
    for thread in members:
        thread.join(30)
    assert took < 30, took
    assert len(outcomes) == 2 and all(isinstance(e, CohortAborted) for e in outcomes), outcomes
    assert (tmp_path / DATABASE_NAME).exists()


def test_a_second_server_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    with running_server(config(tmp_path), {"default": small_model()}, grace_s=0.5) as running:
        push(running, 0)
        with pytest.raises(ConfigError, match=r"is in use by tributary server pid \d+; one server per state directory"):
            with running_server(config(tmp_path), {"default": small_model()}):
                pass
        push(running, 1)  # the first one goes on, untouched
    with running_server(config(tmp_path), {"default": small_model()}, grace_s=0.5) as running:  # and the lock is free again
        assert running.core.job("default").pending_updates == 2


def test_a_retry_beyond_the_memory_window_gets_its_first_ack_from_the_log(tmp_path: Path) -> None:
    small_window = JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=3), idempotency_window=2)
    with running_server(config(tmp_path, small_window), {"default": small_model()}, grace_s=0.5) as running:
        first = push(running, 0, base=0)
        for index in range(1, 6):
            push(running, index, base=0)
        assert push(running, 0, base=0) == (first[0], True)  # k0 left the 2-key window long ago
        assert running.core.job("default").stats.updates_accepted == 6
    with running_server(config(tmp_path, small_window), {"default": small_model()}, grace_s=0.5) as running:
        assert push(running, 1, base=0)[1] and push(running, 5, base=0)[1]
        assert running.core.job("default").stats.updates_accepted == 6


def test_keeping_every_checkpoint_still_drops_old_payloads(tmp_path: Path) -> None:
    single = JobConfig(strategy=StrategyConfig(name="fedasync"))
    with running_server(config(tmp_path, single, checkpoint_every=1, keep_checkpoints=0), {"default": small_model()}, grace_s=0.5) as running:
        for index in range(8):
            push(running, index)
            # the checkpoint thread writes only the newest version it finds, so a
            # loaded machine could skip one: wait for each (pytest's timeout bounds it)
            while not (tmp_path / "checkpoints" / "default" / f"v{index + 1:012d}.safetensors").exists():
                time.sleep(0.05)
    assert len(list((tmp_path / "checkpoints" / "default").iterdir())) == 9  # v0 to v8: all kept
    db = sqlite3.connect(tmp_path / DATABASE_NAME)
    with_payload = [seq for (seq,) in db.execute("SELECT DISTINCT seq FROM update_payloads ORDER BY seq")]
    db.close()
    assert with_payload == [7, 8]  # enough to replay from any of the 3 newest checkpoints (v6, v7, v8)
