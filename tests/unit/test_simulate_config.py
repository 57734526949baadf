"""Experiment files: every section checks itself, errors name the key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.simulate import Experiment, SimulationConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "simulate"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_examples_load(path: Path) -> None:
    experiment = Experiment.from_toml(path)
    assert experiment.fleet.build(experiment.devices, experiment.seed)


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"devices": 0}, "devices must be an integer >= 1, got 0"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"colour": "red"}, "unknown key(s) colour"),
        ({"data": {"name": "mnist"}}, "[data] name must be one of digits, synthetic, got 'mnist'"),
        ({"data": {"dirichlet_alpha": 0}}, "[data] dirichlet_alpha must be > 0, got 0"),
        ({"data": {"alph": 1}}, "unknown key(s) in [data]: alph"),
        ({"model": {"kind": "cnn"}}, "[model] kind must be one of logistic, mlp, got 'cnn'"),
        ({"training": {"lr": -0.1}}, "[training] lr must be a positive number, got -0.1"),
        ({"training": {"epochs": 1.5}}, "[training] epochs must be an integer >= 1, got 1.5"),
        ({"run": {"time_scale": 0}}, "[run] time_scale must be a positive number, got 0"),
        ({"run": {"target_accuracy": 2}}, "[run] target_accuracy must be in (0, 1], got 2"),
        ({"eligibility": {"min_battery": 2}}, "[eligibility] min_battery must be in [0, 1], got 2"),
        ({"fleet": {"builtin": "lumpy"}}, "[fleet] builtin must be one of uniform, heavy_tailed, diurnal, got 'lumpy'"),
        ({"fleet": {"file": "nowhere.toml"}}, "[fleet] file 'nowhere.toml' does not exist"),
        ({"server": {"id": "x"}}, "[server] id is set by the simulator"),
        ({"run": 3}, "[run] must be a table, got 3"),
    ],
)
def test_bad_values_are_named(values: dict[str, object], needle: str) -> None:
    with pytest.raises(SimulationConfigError) as caught:
        Experiment.from_mapping(values)
    assert needle in str(caught.value)


def test_bad_fleet_parameters_surface_when_built() -> None:
    experiment = Experiment.from_mapping({"fleet": {"builtin": "heavy_tailed", "sigma": -1}})
    with pytest.raises(SimulationConfigError, match=r"\[fleet\] sigma must be a positive number, got -1"):
        experiment.fleet.build(10, 0)


def test_fleet_file_is_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "phones.toml").write_text("[[devices]]\nseconds_per_sample = 0.3\n")
    config = tmp_path / "exp.toml"
    config.write_text('devices = 4\n[fleet]\nfile = "phones.toml"\n')
    experiment = Experiment.from_toml(config)
    fleet = experiment.fleet.build(experiment.devices, experiment.seed)
    assert len(fleet) == 4 and {p.seconds_per_sample for p in fleet.profiles} == {0.3}
    assert experiment.with_overrides(devices=7, seed=3).devices == 7
