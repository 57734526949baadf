"""The fleet emulator against a real server on loopback: devices in spawned
worker processes (or Ray actors), the server in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge.simulate import Experiment, LocalBackend, RayBackend, SimulationResult
from tributary._simulate_cmd import run_experiment


def experiment(**tables: Any) -> Experiment:
    values: dict[str, Any] = {
        "devices": 12,
        "server": {"strategy": "fedbuff", "buffer_size": 4},
        "data": {"name": "digits", "dirichlet_alpha": 0.5},
        "fleet": {"builtin": "heavy_tailed", "median_seconds_per_sample": 0.05},
        "run": {"duration_s": 400, "time_scale": 0.01, "target_accuracy": 0.5},
    }
    values.update(tables)
    return Experiment.from_mapping(values)


def check_consistent(result: SimulationResult) -> dict[str, Any]:
    summary = result.summary()
    assert summary["devices_emulated"] == result.experiment.devices
    assert sorted(d["index"] for d in result.devices) == list(range(result.experiment.devices))
    assert summary["device_errors"] == 0
    # what the devices saw accepted is what the server counted
    assert summary["updates_accepted"] == result.server_stats["updates_accepted"] > 0
    assert result.history[0].version == 0 and result.history[-1].version == result.final_version > 0
    return summary


def test_fedbuff_fleet_with_dropouts_and_availability(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        """
[defaults]
seconds_per_sample = 0.05
dropout = 0.3
availability = { kind = "alternating", mean_on_s = 60, mean_off_s = 30 }
[[devices]]
count = 11
[[devices]]
seconds_per_sample = 0.5
battery_level = 0.1
battery_capacity_j = 100
charging = "never"
dropout = 0.0
availability = "always"
"""
    )
    result = run_experiment(
        experiment(fleet={"file": str(fleet)}, eligibility={"min_battery": 0.05}), LocalBackend()
    )
    summary = check_consistent(result)
    assert summary["dropouts"] > 0
    assert sum(d["waited_offline_s"] for d in result.devices) > 0
    assert summary["energy_j"] > 0
    # 0.1 of 100 J is spent in its first round (29 examples x 0.5 s x 3 W); it never charges: it stops
    flat = next(d for d in result.devices if d["index"] == 11)
    assert flat["battery_level"] == 0.0 and flat["updates_accepted"] + flat["updates_refused"] == 1
    assert summary["final_accuracy"] > result.history[0].accuracy


def test_synchronous_fedavg_waits_for_rounds() -> None:
    result = run_experiment(experiment(server={"strategy": "fedavg", "clients_per_round": 4}), LocalBackend())
    summary = check_consistent(result)
    # every version is one round of exactly clients_per_round updates
    assert summary["updates_accepted"] == 4 * result.final_version or summary["updates_accepted"] // 4 == result.final_version
    assert summary["mean_staleness"] == 0.0


def test_secure_aggregation_fleet() -> None:
    server = {"strategy": "fedbuff", "secure_aggregation": True, "cohort_size": 4, "forming_timeout_s": 2.0, "upload_timeout_s": 5.0}
    result = run_experiment(experiment(server=server, run={"duration_s": 600, "time_scale": 0.01}), LocalBackend())
    summary = result.summary()
    assert summary["devices_emulated"] == 12
    assert result.server_stats["cohorts_applied"] > 0 and result.final_version > 0
    assert summary["updates_accepted"] >= 2 * result.server_stats["cohorts_applied"]


def test_a_thousand_devices_share_two_processes() -> None:
    thousand = experiment(
        devices=1000,
        data={"name": "synthetic", "alpha": 0.5, "beta": 0.5, "max_samples": 200},
        server={"strategy": "fedbuff", "buffer_size": 20},
        fleet={"builtin": "heavy_tailed", "median_seconds_per_sample": 0.02},
        run={"duration_s": 1500, "time_scale": 0.01, "processes": 2},
    )
    result = run_experiment(thousand, LocalBackend())
    summary = check_consistent(result)
    assert len(result.groups) == 2
    assert all(d["rounds_started"] >= 1 for d in result.devices)
    assert summary["devices_that_pushed"] > 500


def test_ray_backend_on_a_local_instance() -> None:
    result = run_experiment(experiment(run={"duration_s": 300, "time_scale": 0.01}), RayBackend(num_cpus=2))
    assert result.backend == "ray"
    check_consistent(result)


def test_fedavg_with_slots_waits_for_the_devices_it_picked_and_sums_energy(tmp_path: Path) -> None:
    """Slots make each round exactly clients_per_round devices; devices their
    policy refuses (never charging, require_charging) never train; the energy
    the devices reported is what the server summed, version by version."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        """
[defaults]
seconds_per_sample = 0.05
[[devices]]
count = 8
charging = "always"
[[devices]]
count = 4
charging = "never"
"""
    )
    server = {"strategy": "fedavg", "clients_per_round": 4, "max_concurrent_trainers": 4, "slot_lease_s": 2.0, "heartbeat_interval_s": 0.5}
    result = run_experiment(
        experiment(server=server, fleet={"file": str(fleet)}, eligibility={"require_charging": True}), LocalBackend()
    )
    summary = check_consistent(result)
    never_charging = [d for d in result.devices if d["index"] >= 8]
    assert all(d["rounds_started"] == 0 and d["accepted"] == [] for d in never_charging)
    assert all(d["ineligible"] == "not charging (require_charging)" for d in never_charging)
    # each closed round: exactly clients_per_round distinct devices pushed on its version
    by_base: dict[int, list[int]] = {}
    for device in result.devices:
        for base, _ in device["accepted"]:
            by_base.setdefault(base, []).append(device["index"])
    closed = [base for base in by_base if base < result.final_version]
    assert sorted(closed) == list(range(result.final_version)) and result.final_version >= 2
    assert all(len(set(by_base[base])) == len(by_base[base]) == 4 for base in closed)
    assert summary["slot_refusals"] > 0  # the 4 others were turned away each round
    # energy: what the devices reported is the server's total, and version v holds the round on v - 1
    reported = {base: sum(e for d in result.devices for b, e in d["accepted"] if b == base) for base in by_base}
    assert result.server_stats["energy_joules_total"] == pytest.approx(summary["energy_reported_j"], abs=0.1)
    assert [v for v, _ in result.version_energy] == list(range(1, result.final_version + 1))
    for version, joules in result.version_energy:
        assert joules == pytest.approx(reported[version - 1]) and joules > 0
