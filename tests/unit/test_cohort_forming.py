"""server.cohorts.CohortManager forming cohorts, on a fake clock: when a
smaller cohort may form (forming_timeout_s) is decided by the clock alone.

Joins with wait_s=0 check once and return at once; a client that must stay
waiting meanwhile joins from a thread and polls (every 0.25 s of real time)
until the fake clock passes its deadline or a cohort takes it."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from server.cohorts import REJOIN_GRACE_S, CohortManager, JoinedCohort
from server.config import JobConfig, SecAggConfig, StrategyConfig
from server.core import Job

FORMING_S = 3.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def manager(clock: FakeClock) -> Iterator[CohortManager]:
    # cohort_size 3: two members (a majority) may form once the oldest waiter has waited FORMING_S
    config = SecAggConfig(cohort_size=3, forming_timeout_s=FORMING_S, phase_timeout_s=60.0, upload_timeout_s=60.0, clip_bound=64.0)
    job = Job(JobConfig(strategy=StrategyConfig(name="fedbuff"), secure_aggregation=config), {"w": np.zeros(4, np.float32)})
    manager = CohortManager(job, config, clock=clock)
    yield manager
    manager.shut_down()


class Waiter:
    """A client waiting in a thread until the fake clock passes `wait_s`."""

    def __init__(self, manager: CohortManager, client_id: str, wait_s: float) -> None:
        self.result: JoinedCohort | None | BaseException = None
        self._thread = threading.Thread(target=self._run, args=(manager, client_id, wait_s))
        self._manager = manager
        self._client_id = client_id
        self._thread.start()
        while client_id not in manager._waiting and self._thread.is_alive():  # it is in line before the test goes on
            self._thread.join(0.005)

    def _run(self, manager: CohortManager, client_id: str, wait_s: float) -> None:
        try:
            self.result = manager.join(client_id, wait_s)
        except BaseException as error:  # handed to the test
            self.result = error

    def finish(self) -> JoinedCohort | None | BaseException:
        self._thread.join(10)
        assert not self._thread.is_alive(), f"{self._client_id} still waits"
        return self.result


def test_the_forming_timeout_counts_from_the_oldest_client_still_waiting(manager: CohortManager, clock: FakeClock) -> None:
    """Regression (found by tests/fuzz): when the first waiter left, the timer
    kept its arrival, so a smaller cohort formed as soon as a second client came,
    before the remaining waiter had waited forming_timeout_s."""
    first = Waiter(manager, "first", wait_s=2.0)  # in line from 0 to 2
    clock.now += 1.5
    second = Waiter(manager, "second", wait_s=100.0)  # in line from 1.5
    clock.now += 1.0
    assert first.finish() is None  # it left at 2.5, before anyone had waited FORMING_S
    clock.now = 1000.0 + 3.2  # 3.2 after "first" came, 1.7 after "second"
    assert manager.join("third", 0) is None, "a cohort formed before 'second' had waited forming_timeout_s"
    clock.now = 1000.0 + 1.5 + FORMING_S  # now "second" has waited forming_timeout_s
    placed = manager.join("third", 0)
    assert placed is not None and len(placed.plan.members) == 2
    outcome = second.finish()
    assert isinstance(outcome, JoinedCohort) and outcome.plan.cohort_id == placed.plan.cohort_id


def test_clients_polling_in_short_rounds_keep_their_place(manager: CohortManager, clock: FakeClock) -> None:
    """A client whose long-poll ends and that asks again at once keeps its first
    arrival time, so polls shorter than forming_timeout_s do not restart it."""
    assert manager.join("poller", 0) is None  # in line from 0, and polls every second
    clock.now += 0.5
    patient = Waiter(manager, "patient", wait_s=100.0)  # in line from 0.5
    for _ in range(2):
        clock.now = float(int(clock.now) + 1)
        assert manager.join("poller", 0) is None  # at 1 and 2: nobody has waited FORMING_S yet
    clock.now = 1000.0 + FORMING_S  # "poller" has been in line for FORMING_S, "patient" for less
    placed = manager.join("poller", 0)
    assert placed is not None and len(placed.plan.members) == 2
    outcome = patient.finish()
    assert isinstance(outcome, JoinedCohort) and outcome.plan.cohort_id == placed.plan.cohort_id


def test_a_client_back_after_the_grace_is_a_new_arrival(manager: CohortManager, clock: FakeClock) -> None:
    assert manager.join("late", 0) is None  # in line at 0, then gone
    clock.now += REJOIN_GRACE_S + 1.0
    patient = Waiter(manager, "patient", wait_s=100.0)
    assert manager.join("late", 0) is None, "'late' kept an arrival time from before the grace"
    clock.now += FORMING_S
    placed = manager.join("late", 0)  # within the grace this time: in line since its last arrival
    assert placed is not None and len(placed.plan.members) == 2
    assert isinstance(patient.finish(), JoinedCohort)
