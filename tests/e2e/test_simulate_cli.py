"""`tributary simulate CONFIG.toml` as a user runs it: a subprocess, a results folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

TRIBUTARY = [sys.executable, "-m", "tributary"]
JOB_ID = "sim"  # the job tributary simulate runs
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


def test_simulate_serves_the_dashboard_with_its_accuracy(tmp_path: Path) -> None:
    """--http-address: the run's server serves the dashboard API while it runs, and
    the simulation's evaluations of new versions show there as the job's accuracy."""
    config = tmp_path / "small.toml"
    config.write_text(SMALL.replace("duration_s = 300", "duration_s = 1500"))  # 15 real s to look at it
    with (tmp_path / "stderr.txt").open("w") as stderr:
        run = subprocess.Popen(
            [*TRIBUTARY, "simulate", str(config), "--out", str(tmp_path / "runs"), "--http-address", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
        assert run.stdout is not None
        lines = []
        for line in run.stdout:
            lines.append(line)
            if match := re.search(r"dashboard on (http://\S+/)", line):
                break
        assert match, "".join(lines)
        job: dict[str, Any] = {}
        for _ in range(300):
            with urllib.request.urlopen(match.group(1) + "api/jobs/" + JOB_ID, timeout=10) as response:
                job = json.load(response)
            if job["version"] >= 1 and job["evaluations"] and job["evaluations"][-1]["version"] >= 1:
                break
            time.sleep(0.1)
        assert job["version"] >= 1 and job["evaluations"][-1]["version"] >= 1, job
        assert 0 <= job["evaluations"][-1]["metrics"]["accuracy"] <= 1
        run.communicate(timeout=240)
    assert run.returncode == 0, (tmp_path / "stderr.txt").read_text()


def test_a_bad_http_address_is_a_cli_error_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "small.toml"
    config.write_text(SMALL)
    done = subprocess.run([*TRIBUTARY, "simulate", str(config), "--http-address", "nowhere"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "http_address (--http-address) must be host:port" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
