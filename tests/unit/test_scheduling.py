"""Training slots as pure logic, on a clock the test moves."""

from __future__ import annotations

import pytest

from server.errors import InvalidUpdate, PreconditionFailed
from server.scheduling import INELIGIBLE_RETRY_S, WAITING_TTL_S, DeviceReport, SlotPolicy, TrainingSlots

CHARGING = DeviceReport(battery_level=0.5, charging=True, idle=True, unmetered=True)
ON_BATTERY = DeviceReport(battery_level=0.5, charging=False, idle=True, unmetered=True)
LOW = DeviceReport(battery_level=0.1, charging=False, idle=True, unmetered=True)
MAINS = DeviceReport(battery_level=None, charging=False, idle=True, unmetered=True)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def slots(cap: int, *, lease_s: float = 10.0, **policy: object) -> tuple[TrainingSlots, Clock]:
    clock = Clock()
    return TrainingSlots(SlotPolicy(max_concurrent_trainers=cap, lease_s=lease_s, **policy), clock=clock), clock  # type: ignore[arg-type]


def test_the_cap_holds_and_a_release_frees_a_slot() -> None:
    scheduler, _ = slots(2)
    assert scheduler.acquire("a", ON_BATTERY, 0).granted and scheduler.acquire("b", ON_BATTERY, 0).granted
    refused = scheduler.acquire("c", ON_BATTERY, 0)
    assert not refused.granted and refused.retry_after_s > 0 and "max_concurrent_trainers" in refused.reason
    assert scheduler.active == 2
    scheduler.release("a", pushed=True)
    assert scheduler.acquire("c", ON_BATTERY, 0).granted
    assert set(scheduler.holders()) == {"b", "c"}


def test_asking_again_renews_and_keeps_the_version() -> None:
    scheduler, clock = slots(1)
    assert scheduler.acquire("a", ON_BATTERY, 3).version == 3
    clock.now += 8
    again = scheduler.acquire("a", ON_BATTERY, 5)
    assert again.granted and again.version == 3
    clock.now += 8  # 16 s after the first grant, 8 after the renewal
    assert scheduler.lease_left("a") == pytest.approx(2.0)


def test_an_expired_lease_frees_the_slot_and_a_heartbeat_renews_it() -> None:
    scheduler, clock = slots(1, lease_s=10.0)
    scheduler.acquire("a", ON_BATTERY, 0)
    clock.now += 9
    assert scheduler.renew("a") == 10.0
    clock.now += 9
    assert not scheduler.acquire("b", ON_BATTERY, 0).granted  # renewed: still held
    clock.now += 2
    assert scheduler.renew("a") == 0.0 and scheduler.expired == 1
    assert scheduler.acquire("b", ON_BATTERY, 0).granted
    with pytest.raises(PreconditionFailed, match="holds no training slot"):
        scheduler.require("a", "job")
    scheduler.require("b", "job")


def test_charging_devices_waiting_win_the_slots_that_free_up() -> None:
    scheduler, clock = slots(2, prefer_charging=True)
    scheduler.acquire("a", ON_BATTERY, 0)
    scheduler.acquire("b", ON_BATTERY, 0)
    assert not scheduler.acquire("charger", CHARGING, 0).granted  # now waiting
    scheduler.release("a", pushed=True)
    refused = scheduler.acquire("c", ON_BATTERY, 0)
    assert not refused.granted and "charging device" in refused.reason
    assert scheduler.acquire("charger", CHARGING, 0).granted
    scheduler.release("b", pushed=True)
    assert scheduler.acquire("c", ON_BATTERY, 0).granted  # nobody charging waits any more


def test_with_no_charging_device_waiting_anyone_takes_a_free_slot() -> None:
    scheduler, clock = slots(1, prefer_charging=True)
    scheduler.acquire("a", ON_BATTERY, 0)
    assert not scheduler.acquire("charger", CHARGING, 0).granted
    scheduler.release("a", pushed=True)
    clock.now += WAITING_TTL_S + 0.1  # the charger stopped asking
    assert scheduler.acquire("c", ON_BATTERY, 0).granted


def test_without_prefer_charging_the_first_to_ask_wins() -> None:
    scheduler, _ = slots(1)
    scheduler.acquire("a", ON_BATTERY, 0)
    assert not scheduler.acquire("charger", CHARGING, 0).granted
    scheduler.release("a", pushed=True)
    assert scheduler.acquire("c", ON_BATTERY, 0).granted


def test_min_battery_turns_away_low_devices_on_battery_only() -> None:
    scheduler, _ = slots(5, min_battery=0.3)
    refused = scheduler.acquire("low", LOW, 0)
    assert not refused.granted and refused.retry_after_s == INELIGIBLE_RETRY_S and "battery 0.10 below" in refused.reason
    assert scheduler.acquire("low-charging", DeviceReport(0.1, True, True, True), 0).granted
    assert scheduler.acquire("mains", MAINS, 0).granted


def test_a_fedavg_round_grants_exactly_its_size_until_it_closes() -> None:
    scheduler, clock = slots(10, round_size=2)
    assert scheduler.acquire("a", ON_BATTERY, 4).granted and scheduler.acquire("b", ON_BATTERY, 4).granted
    scheduler.release("a", pushed=True)  # pushed: still counts for round 4
    refused = scheduler.acquire("c", ON_BATTERY, 4)
    assert not refused.granted and "round 4 has its 2 clients" in refused.reason
    assert "already pushed in round 4" in scheduler.acquire("a", ON_BATTERY, 4).reason
    scheduler.release("b", pushed=False)  # refused for good: its place goes to another client
    assert scheduler.acquire("c", ON_BATTERY, 4).granted
    assert not scheduler.acquire("d", ON_BATTERY, 4).granted
    clock.now += 11  # c vanished: its lease frees the place in the same round
    assert scheduler.acquire("d", ON_BATTERY, 4).granted
    grant = scheduler.acquire("a", ON_BATTERY, 5)  # the round closed: a new one
    assert grant.granted and grant.version == 5


def test_a_cap_below_the_round_size_runs_the_round_in_waves() -> None:
    scheduler, _ = slots(1, round_size=3)
    assert scheduler.acquire("a", ON_BATTERY, 0).granted
    assert not scheduler.acquire("b", ON_BATTERY, 0).granted
    scheduler.release("a", pushed=True)
    assert scheduler.acquire("b", ON_BATTERY, 0).granted
    scheduler.release("b", pushed=True)
    assert scheduler.acquire("c", ON_BATTERY, 0).granted
    scheduler.release("c", pushed=True)
    assert not scheduler.acquire("d", ON_BATTERY, 0).granted  # the round has its 3


@pytest.mark.parametrize("level", [1.5, -0.1, float("nan"), float("inf")])
def test_a_battery_level_outside_0_1_is_refused(level: float) -> None:
    with pytest.raises(InvalidUpdate, match="battery_level must be in"):
        DeviceReport(level, False, True, True)


def test_a_long_profile_is_refused() -> None:
    with pytest.raises(InvalidUpdate, match="profile"):
        DeviceReport(None, False, True, True, profile="x" * 129)


# -- the job: energy per version, slots in admission -----------------------------------------


def _update(client_id: str, key: str, energy: float, base: int = 0) -> object:
    import numpy as np

    from proto.tensors import specs_of
    from server.core import Update, UpdateHeader
    from tests.conftest import small_model

    tensors = {name: np.full(t.shape, 0.01, t.dtype) for name, t in small_model().items()}
    return Update(UpdateHeader("default", client_id, key, base, 1, tuple(specs_of(tensors)), energy_joules=energy), tensors)


def test_a_round_records_the_energy_of_every_update_in_it() -> None:
    from server.config import JobConfig, StrategyConfig
    from server.core import Job
    from tests.conftest import small_model

    job = Job(JobConfig(strategy=StrategyConfig(name="fedavg", clients_per_round=2)), small_model())
    job.submit(_update("a", "k1", 1.0))  # type: ignore[arg-type]
    assert job.energy_joules_total == 1.0 and job.version_history(5)[0][2] == 0.0  # pending, not in a version yet
    job.submit(_update("b", "k2", 2.0))  # type: ignore[arg-type]
    assert [(v, e) for v, _, e in job.version_history(5)] == [(1, 3.0), (0, 0.0)]
    with pytest.raises(InvalidUpdate, match="energy_joules"):
        job.admit(_update("c", "k3", -1.0, base=1).header)  # type: ignore[attr-defined]
    assert job.energy_joules_total == 3.0


def test_a_job_with_slots_admits_only_holders_and_a_retry_without_one() -> None:
    from server.config import JobConfig, StrategyConfig
    from server.core import Job
    from tests.conftest import small_model

    job = Job(JobConfig(strategy=StrategyConfig(name="fedasync"), max_concurrent_trainers=1), small_model())
    update = _update("a", "k1", 0.5)
    with pytest.raises(PreconditionFailed, match="holds no training slot"):
        job.admit(update.header)  # type: ignore[attr-defined]
    assert job.acquire_slot("a", ON_BATTERY).granted
    assert job.admit(update.header) is None  # type: ignore[attr-defined]
    job.submit(update)  # type: ignore[arg-type]
    assert job.slots is not None and job.slots.active == 0  # released by the accepted push
    assert job.admit(update.header).duplicate  # type: ignore[attr-defined,union-attr]  # a retry: its first ack, no slot needed
