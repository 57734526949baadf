"""`tributary simulate CONFIG.toml` as a user runs it: a subprocess, a results folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TRIBUTARY = [sys.executable, "-m", "tributary"]
SMALL = """
name = "small"
seed = 1
devices = 6

[server]
strategy = "fedbuff"
buffer_size = 3

[data]
name = "synthetic"
alpha = 0.5
beta = 0.5

[fleet]
builtin = "heavy_tailed"
median_seconds_per_sample = 0.01

[run]
duration_s = 300
time_scale = 0.01
target_accuracy = 0.3
"""


def test_simulate_writes_a_run_folder(tmp_path: Path) -> None:
    config = tmp_path / "small.toml"
    config.write_text(SMALL)
    done = subprocess.run(
        [*TRIBUTARY, "simulate", str(config), "--devices", "8", "--seed", "2", "--out", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "simulating 8 devices" in done.stdout
    # stdout is a pipe: no progress bar, no terminal control sequences
    assert "\x1b[" not in done.stdout + done.stderr and "\r" not in done.stdout
    assert "tributary.server" not in done.stderr  # the in-process server only speaks up for errors
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("small-seed2-")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["summary"]["devices_emulated"] == 8
    assert results["summary"]["updates_accepted"] > 0
    assert results["experiment"]["seed"] == 2
    assert (run_dir / "history.csv").read_text().startswith("emulated_s,real_s,version,accuracy")
    assert len(json.loads((run_dir / "devices.json").read_text())) == 8


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (("buffer_size = 3", "buffer_size = 0"), "[server] buffer_size must be an integer >= 1, got 0"),
        (("buffer_size = 3", "bufer_size = 3"), "[server] unknown job setting 'bufer_size'"),
        (("time_scale = 0.01", "time_scale = -1"), "[run] time_scale must be a positive number, got -1"),
        (('builtin = "heavy_tailed"', 'builtin = "lumpy"'), "[fleet] builtin must be one of uniform, heavy_tailed, diurnal, got 'lumpy'"),
        (("median_seconds_per_sample = 0.01", "median_seconds_per_sample = 0"), "median_seconds_per_sample must be a positive number, got 0"),
        (('name = "synthetic"', 'name = "digits"\nmin_size = 500'), "[data] 1437 examples cannot give 6 clients 500 each"),
    ],
)
def test_bad_config_is_a_cli_error_naming_the_key(tmp_path: Path, change: tuple[str, str], needle: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(SMALL.replace(*change))
    done = subprocess.run([*TRIBUTARY, "simulate", str(config)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert needle in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_bad_flags(tmp_path: Path) -> None:
    config = tmp_path / "small.toml"
    config.write_text(SMALL)
    done = subprocess.run([*TRIBUTARY, "simulate", str(config), "--devices", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--devices" in done.stderr and "got 0" in done.stderr
    done = subprocess.run([*TRIBUTARY, "simulate", str(tmp_path / "none.toml")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "does not exist" in done.stderr
