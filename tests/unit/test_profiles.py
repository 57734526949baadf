"""Device profiles and fleets: validation, seeded schedules, the built-in fleets' shapes, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge.profiles import DeviceProfile, Fleet, OnOffProcess, ProfileError


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("seconds_per_sample", 0, "seconds_per_sample must be a positive number, got 0"),
        ("seconds_per_sample", float("nan"), "seconds_per_sample"),
        ("battery_level", 1.5, "battery_level must be a number in [0, 1], got 1.5"),
        ("dropout", 1.0, "dropout must be below 1"),
        ("latency_s", -1, "latency_s must be a number >= 0, got -1"),
        ("bandwidth_up_bps", True, "bandwidth_up_bps must be a positive number, got True"),
    ],
)
def test_a_bad_profile_field_is_named_with_its_value(field: str, value: object, needle: str) -> None:
    with pytest.raises(ProfileError) as caught:
        DeviceProfile(**{field: value})  # type: ignore[arg-type]
    assert needle in str(caught.value)


def test_a_bad_process_names_where_it_is() -> None:
    with pytest.raises(ProfileError, match=r"device 3: availability\.kind must be one of .*got 'sometimes'"):
        DeviceProfile.from_mapping({"availability": {"kind": "sometimes"}}, "device 3")
    with pytest.raises(ProfileError, match="on_s must be at most period_s"):
        OnOffProcess(kind="diurnal", period_s=10, on_s=20)


def test_alternating_schedule_is_the_seeds() -> None:
    process = OnOffProcess(kind="alternating", mean_on_s=100, mean_off_s=50)
    times = np.linspace(0, 5000, 400)
    first = [process.timeline(np.random.default_rng(7)).is_on(float(t)) for t in times]
    again = process.timeline(np.random.default_rng(7))
    assert first == [again.is_on(float(t)) for t in times]
    assert first != [process.timeline(np.random.default_rng(8)).is_on(float(t)) for t in times]
    share = np.mean([process.timeline(np.random.default_rng(s)).is_on(1e5) for s in range(400)])
    assert 0.55 < share < 0.8  # stationary share 2/3


def test_next_change_and_next_on_agree_with_is_on() -> None:
    for process in (OnOffProcess(kind="alternating", mean_on_s=30, mean_off_s=20), OnOffProcess(kind="diurnal", period_s=100, on_s=30, phase_s=10)):
        timeline = process.timeline(np.random.default_rng(1))
        t = 0.0
        for _ in range(50):
            state = timeline.is_on(t)
            change = timeline.next_change(t)
            assert change > t
            assert timeline.is_on((t + change) / 2) == state
            assert timeline.is_on(change + 1e-9) != state
            assert timeline.is_on(timeline.next_on(t))
            t = change + 1e-9
    always = OnOffProcess().timeline(np.random.default_rng(0))
    assert always.is_on(1e9) and always.next_change(5) == float("inf")


@pytest.mark.parametrize("devices", [10, 50, 1000])
def test_heavy_tailed_slowest_tenth_is_ten_times_slower_than_the_median(devices: int) -> None:
    fleet = Fleet.builtin("heavy_tailed", devices, seed=3)
    times = np.sort([p.seconds_per_sample for p in fleet.profiles])
    slowest_tenth = times[int(np.ceil(0.9 * devices)) :]
    assert len(slowest_tenth) >= 1
    assert slowest_tenth.min() >= 10 * np.median(times)


def test_fleets_are_the_seeds() -> None:
    assert Fleet.builtin("heavy_tailed", 20, seed=1) == Fleet.builtin("heavy_tailed", 20, seed=1)
    assert Fleet.builtin("heavy_tailed", 20, seed=1) != Fleet.builtin("heavy_tailed", 20, seed=2)
    diurnal = Fleet.builtin("diurnal", 30, seed=0, day_s=1000)
    assert diurnal == Fleet.builtin("diurnal", 30, seed=0, day_s=1000)
    assert {p.availability.kind for p in diurnal.profiles} == {"diurnal"}
    assert len({p.availability.phase_s for p in diurnal.profiles}) == 30
    assert len(set(Fleet.builtin("uniform", 5).profiles)) == 1


def test_builtin_errors() -> None:
    with pytest.raises(ProfileError, match="fleet must be one of uniform, heavy_tailed, diurnal"):
        Fleet.builtin("lumpy", 3)
    with pytest.raises(ProfileError, match=r"heavy_tailed fleet: unknown field\(s\) sigmaa"):
        Fleet.builtin("heavy_tailed", 3, sigmaa=2)
    with pytest.raises(ProfileError, match="sigma must be a positive number, got -1"):
        Fleet.builtin("heavy_tailed", 3, sigma=-1)
    with pytest.raises(ProfileError, match="devices must be an integer >= 1, got 0"):
        Fleet.builtin("uniform", 0)


def test_fleet_from_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "fleet.toml"
    toml.write_text(
        """
[defaults]
latency_s = 0.2
[[devices]]
count = 3
seconds_per_sample = 0.02
[[devices]]
seconds_per_sample = 0.5
dropout = 0.1
availability = { kind = "alternating", mean_on_s = 600, mean_off_s = 300 }
"""
    )
    fleet = Fleet.from_file(toml)
    assert len(fleet) == 4 and fleet.name == "fleet"
    assert [p.seconds_per_sample for p in fleet.profiles] == [0.02, 0.02, 0.02, 0.5]
    assert all(p.latency_s == 0.2 for p in fleet.profiles)
    assert fleet.profiles[3].availability == OnOffProcess(kind="alternating", mean_on_s=600, mean_off_s=300)
    assert len(fleet.resized(10)) == 10 and fleet.resized(2).profiles == fleet.profiles[:2]
    js = tmp_path / "fleet.json"
    js.write_text(json.dumps({"devices": [{"seconds_per_sample": 0.1, "charging": "always"}]}))
    assert Fleet.from_file(js).profiles[0].charging.kind == "always"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[[devices]]\nseconds_per_sample = 0.1\n[[devices]]\nseconds_per_sample = -2\n", "fleet.toml: device 1: seconds_per_sample must be a positive number, got -2"),
        ("[[devices]]\nspeed = 3\n", "fleet.toml: device 0: unknown field(s) speed"),
        ("[[devices]]\ncount = 0\n", "fleet.toml: device 0: count must be an integer >= 1, got 0"),
        ("devices = []\n", "fleet.toml: 'devices' must be a non-empty list"),
        ("[[devices]\n", "fleet.toml: not valid TOML"),
        ("gadgets = 1\n", "fleet.toml: unknown key(s) gadgets"),
    ],
)
def test_fleet_file_errors_name_file_device_and_field(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as caught:
        Fleet.from_file(path)
    assert needle in str(caught.value)
    with pytest.raises(ProfileError, match="cannot read the fleet file"):
        Fleet.from_file(tmp_path / "missing.toml")
