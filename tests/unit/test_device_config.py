"""Training-slot settings of a job: built from TOML keys or flags, checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import ConfigError, ServerConfig
from server.config import JobConfig


def test_slot_keys_build_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        'insecure = true\n[[jobs]]\nid = "j"\nmax_concurrent_trainers = 8\nprefer_charging = true\nmin_battery = 0.3\nslot_lease_s = 60\n'
    )
    job = ServerConfig.from_toml(path).jobs[0]
    assert (job.max_concurrent_trainers, job.prefer_charging, job.min_battery, job.slot_lease_s) == (8, True, 0.3, 60)


def test_no_slots_by_default() -> None:
    assert JobConfig().max_concurrent_trainers is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"prefer_charging": True}, "prefer_charging only applies with training slots"),
        ({"min_battery": 0.2}, "min_battery only applies with training slots"),
        ({"slot_lease_s": 30}, "slot_lease_s only applies with training slots"),
        ({"max_concurrent_trainers": 0}, "max_concurrent_trainers must be an integer >= 1, got 0"),
        ({"max_concurrent_trainers": 2.5}, "max_concurrent_trainers must be an integer >= 1"),
        ({"max_concurrent_trainers": 2, "min_battery": 1.5}, "min_battery must be a number in [0, 1], got 1.5"),
        ({"max_concurrent_trainers": 2, "prefer_charging": "yes"}, "prefer_charging must be true or false"),
        ({"max_concurrent_trainers": 2, "slot_lease_s": 15}, "slot_lease_s=15 must be at least twice heartbeat_interval_s=10.0"),
        ({"max_concurrent_trainers": 2, "secure_aggregation": True, "cohort_size": 4}, "max_concurrent_trainers=2 is below cohort_size=4"),
    ],
)
def test_bad_slot_settings_are_refused_by_name(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        JobConfig.from_mapping(values)
    assert message in str(caught.value)
