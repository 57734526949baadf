"""The roster of clients a job heard from: states, expiry, the size cap, counts;
and the job's heartbeat on top of it. A hand-driven clock makes time explicit."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from server import ConfigError, JobConfig, StrategyConfig
from server.core import Job
from server.errors import InvalidUpdate, LimitExceeded, UnknownVersion
from server.roster import MAX_CLIENT_ID_LENGTH, ClientState, Roster

IDLE, TRAINING, UPLOADING = ClientState.IDLE, ClientState.TRAINING, ClientState.UPLOADING


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_roster(max_clients: int = 10, expiry_s: float = 60.0) -> tuple[Roster, Clock]:
    clock = Clock()
    return Roster(max_clients=max_clients, expiry_s=expiry_s, clock=clock), clock


def test_a_heartbeat_records_state_version_and_times() -> None:
    roster, clock = make_roster()
    roster.beat("a", IDLE, 0)
    clock.now += 5
    entry = roster.beat("a", TRAINING, 3)
    assert entry == roster.get("a")
    assert (entry.state, entry.base_version, entry.heartbeats) == (TRAINING, 3, 2)
    assert (entry.first_seen, entry.last_seen) == (1000.0, 1005.0)
    assert roster.get("b") is None


def test_connected_clients_counts_those_heard_from_within_the_window() -> None:
    roster, clock = make_roster()
    roster.beat("old", IDLE, 0)
    clock.now += 20
    roster.beat("mid", TRAINING, 0)
    clock.now += 20
    roster.beat("new", UPLOADING, 0)
    assert roster.connected_clients(clock.now, 5) == 1
    assert roster.connected_clients(clock.now, 20) == 2
    assert roster.connected_clients(clock.now, 40) == 3
    assert roster.by_state(clock.now, 30) == {IDLE: 0, TRAINING: 1, UPLOADING: 1}
    clock.now += 1
    roster.beat("old", TRAINING, 0)  # heard from again: counts as recent once more
    assert roster.connected_clients(clock.now, 5) == 2
    assert roster.by_state(clock.now, 5) == {IDLE: 0, TRAINING: 1, UPLOADING: 1}
    assert [c.client_id for c in roster.clients()] == ["mid", "new", "old"]


def test_clients_not_heard_from_for_the_expiry_are_forgotten() -> None:
    roster, clock = make_roster(expiry_s=60)
    roster.beat("a", IDLE, 0)
    clock.now += 30
    roster.beat("b", IDLE, 0)
    clock.now += 30  # a: exactly 60 s, still kept
    assert roster.evict_expired() == 0 and len(roster) == 2
    clock.now += 0.5
    assert roster.evict_expired() == 1
    assert roster.get("a") is None and roster.get("b") is not None
    clock.now += 100
    roster.beat("c", IDLE, 0)  # a heartbeat sweeps the expired ones too
    assert [c.client_id for c in roster.clients()] == ["c"]
    assert roster.evicted == 2


def test_a_full_roster_refuses_new_clients_but_keeps_known_ones() -> None:
    roster, clock = make_roster(max_clients=2, expiry_s=60)
    roster.beat("a", IDLE, 0)
    roster.beat("b", IDLE, 0)
    with pytest.raises(LimitExceeded, match="already tracks 2 clients .* roster_max_clients"):
        roster.beat("c", IDLE, 0)
    assert roster.get("c") is None and len(roster) == 2 and roster.refused == 1
    clock.now += 10
    assert roster.beat("a", TRAINING, 1).heartbeats == 2  # known clients keep beating
    clock.now += 55  # b expired, a not yet: room for one
    roster.beat("c", IDLE, 0)
    assert {c.client_id for c in roster.clients()} == {"a", "c"}


@pytest.mark.parametrize(
    ("client_id", "message"),
    [("", "client_id is empty"), ("x" * (MAX_CLIENT_ID_LENGTH + 1), f"at most {MAX_CLIENT_ID_LENGTH}")],
)
def test_bad_client_ids_are_refused_and_change_nothing(client_id: str, message: str) -> None:
    roster, _ = make_roster()
    with pytest.raises(InvalidUpdate, match=message):
        roster.beat(client_id, IDLE, 0)
    assert len(roster) == 0


def test_longest_client_id_is_accepted() -> None:
    roster, _ = make_roster()
    roster.beat("x" * MAX_CLIENT_ID_LENGTH, IDLE, 0)
    assert len(roster) == 1


def test_roster_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="max_clients"):
        Roster(max_clients=0, expiry_s=1)
    with pytest.raises(ValueError, match="expiry_s"):
        Roster(max_clients=1, expiry_s=0)


# -- the job's heartbeat ------------------------------------------------------------


def make_job(**settings: Any) -> Job:
    config = JobConfig(strategy=StrategyConfig(name="fedasync"), **settings)
    return Job(config, {"w": np.zeros(3, np.float32)})


def test_job_heartbeat_answers_version_and_interval_and_fills_the_roster() -> None:
    job = make_job(heartbeat_interval_s=2.5)
    outcome = job.heartbeat("a", TRAINING, 0)
    assert (outcome.version, outcome.next_heartbeat_s) == (0, 2.5)
    assert outcome.server_time_ms > 1_600_000_000_000
    assert job.roster.get("a") is not None and job.roster.get("a").state is TRAINING  # type: ignore[union-attr]
    assert job.roster.connected_clients(job.roster.clock(), 1) == 1


def test_job_heartbeat_with_an_unpublished_version_is_refused() -> None:
    job = make_job()
    with pytest.raises(UnknownVersion, match="base version 4 was never published .*latest is 0"):
        job.heartbeat("a", IDLE, 4)
    assert len(job.roster) == 0


def test_roster_settings_reach_the_job() -> None:
    job = make_job(roster_max_clients=7, roster_expiry_s=30.0)
    assert (job.roster.max_clients, job.roster.expiry_s) == (7, 30.0)


def test_roster_settings_from_mapping() -> None:
    job = JobConfig.from_mapping({"heartbeat_interval_s": 1, "roster_expiry_s": 5.5, "roster_max_clients": 3})
    assert (job.heartbeat_interval_s, job.roster_expiry_s, job.roster_max_clients) == (1, 5.5, 3)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"heartbeat_interval_s": 0}, "heartbeat_interval_s must be a positive number, got 0"),
        ({"heartbeat_interval_s": "10"}, "heartbeat_interval_s must be a positive number"),
        ({"heartbeat_interval_s": 4000}, "heartbeat_interval_s must be at most 3600"),
        ({"roster_expiry_s": -1}, "roster_expiry_s must be a positive number"),
        ({"heartbeat_interval_s": 10, "roster_expiry_s": 15}, "roster_expiry_s=15 must be at least twice heartbeat_interval_s=10"),
        ({"roster_max_clients": 0}, "roster_max_clients must be an integer >= 1, got 0"),
        ({"roster_max_clients": 2.5}, "roster_max_clients must be an integer >= 1"),
    ],
)
def test_bad_roster_settings_are_named(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_mapping(values)
