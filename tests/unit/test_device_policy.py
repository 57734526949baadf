"""The SDK's DeviceState and EligibilityPolicy, and edge.energy."""

from __future__ import annotations

import math

import pytest

from client_sdk import DeviceState, EligibilityPolicy, Eligible, Ineligible
from edge.energy import CELLULAR_3G_2009, NO_RADIO, WIFI_2009, EnergyModel, RadioCost, estimate_update_energy

PHONE = DeviceState(battery_level=0.12, charging=False, idle=False, unmetered=False, profile="phone")


def test_the_default_policy_allows_anything() -> None:
    assert EligibilityPolicy().check(PHONE) == Eligible()
    assert bool(EligibilityPolicy().check(PHONE))


def test_a_refusal_names_every_rule_broken() -> None:
    policy = EligibilityPolicy(require_charging=True, require_idle=True, require_unmetered=True, min_battery=0.3)
    decision = policy.check(PHONE)
    assert isinstance(decision, Ineligible) and not decision
    assert decision.reason == (
        "not charging (require_charging); device in use (require_idle); on a metered network (require_unmetered); "
        "battery 0.12 below min_battery 0.30"
    )


def test_min_battery_is_waived_while_charging_and_without_a_battery() -> None:
    policy = EligibilityPolicy(min_battery=0.5, require_charging=True)
    assert policy.check(DeviceState(0.1, charging=True, idle=True, unmetered=True))
    assert policy.check(DeviceState(None, charging=False, idle=True, unmetered=True))  # mains powered
    assert not policy.check(DeviceState(0.9, charging=False, idle=True, unmetered=True))


@pytest.mark.parametrize("level", [1.5, -0.01, math.nan, math.inf, True, "0.5"])
def test_a_bad_battery_level_is_refused(level: object) -> None:
    with pytest.raises(ValueError, match="battery_level"):
        DeviceState(level, charging=False, idle=True, unmetered=True)  # type: ignore[arg-type]


def test_bad_states_and_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="charging must be True or False"):
        DeviceState(0.5, charging=1, idle=True, unmetered=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="profile"):
        DeviceState(0.5, charging=True, idle=True, unmetered=True, profile="p" * 129)
    with pytest.raises(ValueError, match="min_battery"):
        EligibilityPolicy(min_battery=1.2)
    with pytest.raises(ValueError, match="require_idle"):
        EligibilityPolicy(require_idle="yes")  # type: ignore[arg-type]


def test_energy_is_power_times_time_plus_the_radio() -> None:
    assert estimate_update_energy(3.0, 20.0) == 60.0
    radio = RadioCost(joules_per_byte=1e-6, joules_per_transfer=2.0)
    assert estimate_update_energy(3.0, 20.0, upload_bytes=1_000_000, radio=radio) == pytest.approx(60.0 + 1.0 + 2.0)
    assert radio.transfer(0) == 0.0  # no transfer, no tail
    model = EnergyModel(train_watts=3.0, radio=radio, download_bytes=1_000_000)
    assert model(20.0, 1_000_000) == pytest.approx(60.0 + 2 * 3.0)
    assert CELLULAR_3G_2009.joules_per_byte > WIFI_2009.joules_per_byte > NO_RADIO.joules_per_byte == 0.0


@pytest.mark.parametrize("watts, seconds", [(-1.0, 1.0), (1.0, -1.0), (math.nan, 1.0), (1.0, math.inf)])
def test_bad_energy_inputs_are_refused(watts: float, seconds: float) -> None:
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        estimate_update_energy(watts, seconds)


def test_the_host_state_matches_what_psutil_sees() -> None:
    psutil = pytest.importorskip("psutil")
    from edge.device_state import read_host_state

    state = read_host_state(unmetered=False, sample_s=0.01)
    battery = psutil.sensors_battery()
    if battery is None:
        assert state.battery_level is None and state.charging  # mains powered
    else:
        assert state.battery_level == pytest.approx(battery.percent / 100, abs=0.05)
    assert not state.unmetered and state.profile == "host"
    with pytest.raises(ValueError, match="idle_cpu_percent"):
        read_host_state(idle_cpu_percent=0)
