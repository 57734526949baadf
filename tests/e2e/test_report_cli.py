"""`tributary report RUN` as a user runs it, on a server state directory and on
a small `tributary simulate` run (which prints its own report too)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from client_sdk import Client, RetryPolicy
from server import JobConfig, ServerConfig, StrategyConfig
from server.app import running_server
from tests.conftest import small_model
from tests.e2e.test_simulate_cli import SMALL

TRIBUTARY = [sys.executable, "-m", "tributary"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100


def report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRIBUTARY, "report", *args], capture_output=True, text=True, timeout=180)


def test_report_of_a_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    job = JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=2), evaluator="tests.integration.test_evaluation:weight_mean")
    config = ServerConfig(address="127.0.0.1:0", jobs=(job,), state_dir=state, insecure=True)
    delta = {name: np.full(t.shape, 0.1, dtype=t.dtype) for name, t in small_model().items()}
    with running_server(config, {"default": small_model()}, grace_s=0.5) as running:
        with Client(running.address, "default", client_id="a", insecure=True, retry=RetryPolicy(max_attempts=2)) as a, Client(
            running.address, "default", client_id="b", insecure=True, retry=RetryPolicy(max_attempts=2)
        ) as b:
            a.push(0, delta)
            b.push(0, delta)  # version 1
            a.push(1, delta)
            a.push(0, delta)  # staleness 1; version 2
            for _ in range(200):  # the server's evaluator first (its own thread), so version 2 has both
                if (running.evaluations["default"].last_version or 0) >= 2:
                    break
                time.sleep(0.05)
            # federated evaluation of version 2: weighted by examples, (0.5 * 10 + 0.8 * 30) / 40
            a.report_evaluation(2, {"accuracy": 0.5}, 10)
            b.report_evaluation(2, {"accuracy": 0.8}, 30)
        running.evaluations["default"].stop()
        evaluated = list(running.core.job("default").stats.evaluations)
    update_bytes = sum(t.nbytes for t in delta.values())

    done = report(str(state))
    assert done.returncode == 0, done.stdout + done.stderr
    out = state / "report"
    assert f"report: {out / 'index.md'}" in done.stdout and f"report: {out / 'index.html'}" in done.stdout
    for kind in ("accuracy_time", "accuracy_version", "staleness", "updates_per_client", "bytes"):
        assert_valid_png(out / f"default-{kind}.png")
    summary = (out / "index.md").read_text()
    final_version, _, final_metrics = evaluated[-1]
    assert f"| final accuracy | {final_metrics['accuracy']:.2%} (version {final_version}) |" in summary
    assert "| final federated accuracy | 72.50% (version 2, reported by the clients) |" in summary
    assert "| model versions | 2 |" in summary
    assert "| updates accepted | 4 |" in summary
    assert "| staleness | mean 0.25, max 1 over 4 updates |" in summary
    assert f"| bytes uploaded | {4 * update_bytes / 1e6:.2f} MB |" in summary
    assert "rejected updates: not kept in the state directory" in summary
    assert "![Staleness](default-staleness.png)" in summary
    page = (out / "index.html").read_text()
    assert '<img src="default-accuracy_time.png"' in page and "updates accepted</td><td>4<" in page


def test_simulate_prints_its_report_and_report_rewrites_it(tmp_path: Path) -> None:
    config = tmp_path / "small.toml"
    config.write_text(SMALL)
    done = subprocess.run([*TRIBUTARY, "simulate", str(config), "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    printed = re.search(r"report: (\S+)", done.stdout)
    assert printed is not None and Path(printed.group(1)) == run_dir / "report" / "index.html"
    assert (run_dir / "report" / "index.html").is_file()

    results = json.loads((run_dir / "results.json").read_text())["summary"]
    devices = json.loads((run_dir / "devices.json").read_text())
    assert sum(len(d["uploads"]) for d in devices) == results["updates_accepted"]
    done = report(str(run_dir), "--out", str(tmp_path / "out"), "--format", "md", "--target", "0.25")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (tmp_path / "out" / "index.html").exists()
    summary = (tmp_path / "out" / "index.md").read_text()
    assert f"| final accuracy | {results['final_accuracy']:.2%}" in summary
    assert f"| best accuracy | {results['best_accuracy']:.2%}" in summary
    assert f"| updates accepted | {results['updates_accepted']} |" in summary
    assert f"| model versions | {results['final_version']} |" in summary
    assert "| time to 25% |" in summary
    for png in (tmp_path / "out").glob("*.png"):
        assert_valid_png(png)
    assert {p.name for p in (tmp_path / "out").glob("*.png")} == {
        f"small-{kind}.png" for kind in ("accuracy_time", "accuracy_version", "staleness", "updates_per_client", "bytes")
    }


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: (d / "file.txt", (d / "file.txt").write_text("x"))[0], "is not a directory"),
        (lambda d: d, "holds neither tributary.db"),
        (lambda d: (d / "results.json", (d / "results.json").write_text("{not json"))[0].parent, "cannot be read as JSON"),
        (lambda d: (d / "results.json", (d / "results.json").write_text('{"summary": {}, "history": [{"version": 1}]}'))[0].parent, "is malformed"),
    ],
)
def test_a_bad_run_path_is_a_cli_error_naming_it(tmp_path: Path, make: object, needle: str) -> None:
    run = make(tmp_path)  # type: ignore[operator]
    done = report(str(run))
    assert done.returncode != 0
    assert f"RUN {run}" in done.stderr and needle in done.stderr
    assert "Traceback" not in done.stderr


def test_a_run_whose_report_fails_says_why_instead_of_losing_the_run(tmp_path: Path) -> None:
    """demo and simulate print this after their results are written: a report that
    cannot be made must not turn the finished run into a traceback."""
    from tributary._report_cmd import report_for_run

    (tmp_path / "results.json").write_text('{"summary": {}, "history": [{"version": 1}]}')
    said = report_for_run(tmp_path)
    assert said.startswith("not written (") and "is malformed" in said
