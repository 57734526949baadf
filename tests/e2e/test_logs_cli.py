"""Logs as a user gets them: `python -m tributary --log-format json ...`
subprocesses (a real server on loopback, real SDK clients), stderr parsed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from tributary.cli import main

TRIBUTARY = [sys.executable, "-m", "tributary"]
ROOT = Path(__file__).resolve().parents[2]
CONTEXT = ("job", "client", "version", "cohort")


def _start_server(stderr: Path, *flags: str) -> tuple[subprocess.Popen[str], str]:
    """The server's stderr goes to a file: a pipe nobody reads would fill and block it."""
    with open(stderr, "w") as log:
        server = subprocess.Popen([*TRIBUTARY, *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    assert server.stdout is not None
    for line in server.stdout:
        if "listening on" in line:
            return server, line.split("listening on ")[1].split()[0]
    server.kill()
    server.wait(timeout=30)
    raise AssertionError(f"the server did not start: {stderr.read_text()}")


def _stop(server: subprocess.Popen[str], stderr: Path) -> str:
    server.send_signal(signal.SIGTERM)
    server.communicate(timeout=60)
    assert server.returncode == 0, stderr.read_text()
    return stderr.read_text()


def _json_lines(stderr: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in stderr.splitlines() if line.strip()]  # every line is one JSON object
    for event in events:
        assert {"timestamp", "level", "logger", "message", *CONTEXT} <= set(event), event
    return events


def test_json_logs_carry_job_client_version_and_cohort(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server, address = _start_server(
        log, "--log-format", "json", "--log-level", "debug", "server", "--task", "digits", "--insecure", "--address", "127.0.0.1:0",
        "--job", "logs", "--secure-aggregation", "--cohort-size", "3", "--min-survivors", "3", "--forming-timeout", "30",
    )  # fmt: skip
    try:
        # the clients take the format from the environment, as the demo's and simulate's children do
        env = {**os.environ, "TRIBUTARY_LOG_FORMAT": "json", "TRIBUTARY_LOG_LEVEL": "debug"}
        clients = [
            subprocess.Popen(
                [*TRIBUTARY, "client", "--server", address, "--insecure", "--job", "logs", "--updates", "1",
                 "--shard", str(shard), "--num-shards", "3", "--client-id", f"logger-{shard}"],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            for shard in range(3)
        ]
        outputs = [client.communicate(timeout=180) for client in clients]
    finally:
        server_stderr = _stop(server, log)
    for client, (stdout, stderr) in zip(clients, outputs, strict=True):
        assert client.returncode == 0, stdout + stderr
        assert "\x1b[" not in stdout + stderr  # no progress bar off a terminal
    server_events = _json_lines(server_stderr)
    client_events = [event for _, stderr in outputs for event in _json_lines(stderr)]

    published = [e for e in server_events if e["message"] == "published version 1"]
    assert published and published[0]["job"] == "logs" and published[0]["version"] == 1 and published[0]["logger"] == "tributary.server"
    formed = [e for e in server_events if e["message"].startswith("cohort formed")]
    assert formed and formed[0]["cohort"] and formed[0]["job"] == "logs"
    applied = [e for e in server_events if e["message"].startswith("cohort applied")]
    assert applied and applied[0]["cohort"] == formed[0]["cohort"] and applied[0]["version"] == 1
    assert [e for e in server_events if e["message"].startswith("cohort phase") and e["cohort"] == formed[0]["cohort"]]
    assert [e for e in server_events if e["message"].startswith("server started") and e["level"] == "INFO"]

    joined = [e for e in client_events if e["message"].startswith("joined cohort")]
    assert {e["client"] for e in joined} == {"logger-0", "logger-1", "logger-2"}
    assert {e["cohort"] for e in joined} == {formed[0]["cohort"]}
    stops = [e for e in client_events if e["message"].startswith("client stops")]
    assert {e["client"] for e in stops} == {"logger-0", "logger-1", "logger-2"}
    assert all(e["job"] == "logs" and e["version"] is not None for e in stops)
    assert len(stops) == 3


def test_text_is_the_default_and_rejections_say_why(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server, address = _start_server(log, "server", "--task", "digits", "--insecure", "--address", "127.0.0.1:0", "--max-staleness", "0")
    try:
        import numpy as np

        from client_sdk import Client, NotAcceptedNow

        with Client(address, insecure=True, client_id="stale-one") as client:
            pulled = client.pull()
            delta = {name: np.zeros_like(array) for name, array in pulled.tensors.items()}
            for _ in range(10):  # fedbuff's default K=10: version 1 is published
                client.push(pulled.version, delta)
            try:
                client.push(pulled.version, delta)  # on version 0, one behind: max_staleness 0 refuses it
            except NotAcceptedNow:
                pass
    finally:
        stderr = _stop(server, log)
    lines = stderr.splitlines()
    assert not [line for line in lines if line.startswith("{")]
    pattern = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING) +tributary\.server: ")
    assert all(pattern.match(line) for line in lines), lines
    assert [line for line in lines if "published version 1 [job=default version=1]" in line]
    refused = [line for line in lines if "update refused (StaleUpdate)" in line]
    assert refused and "client=stale-one" in refused[0] and "version=0" in refused[0]


def test_a_bad_log_level_is_named() -> None:
    result = CliRunner().invoke(main, ["--log-level", "loud", "server", "--task", "digits"])
    assert result.exit_code == 2
    assert "--log-level" in result.output and "'loud'" in result.output
    result = CliRunner().invoke(main, ["--log-format", "xml", "server"])
    assert result.exit_code == 2
    assert "--log-format" in result.output and "'xml'" in result.output
