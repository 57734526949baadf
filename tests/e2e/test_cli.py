"""The `tributary` command as a user runs it: real processes, real ports."""

from __future__ import annotations

import json
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

TRIBUTARY = [sys.executable, "-m", "tributary"]


STARTUP: dict[int, str] = {}
"""What each started server printed before it listened, by pid."""


def start_server(*args: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([*TRIBUTARY, "server", "--address", "127.0.0.1:0", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"listening on (\S+)", line)
        if match:
            STARTUP[process.pid] = "".join(lines)
            return process, match.group(1)
    process.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))


def test_server_and_clients_as_processes(tmp_path: Path) -> None:
    server, address = start_server("--insecure", "--task", "digits", "--strategy", "fedbuff", "--buffer-size", "2", "--max-staleness", "20")
    try:
        clients = [
            subprocess.run(
                [*TRIBUTARY, "client", "--insecure", "--server", address, "--shard", str(i), "--num-shards", "2", "--updates", "3", "--client-id", f"e2e-{i}"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            for i in range(2)
        ]
        for result in clients:
            assert result.returncode == 0, result.stdout + result.stderr
            assert re.search(r"3 updates accepted", result.stdout), result.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert "shutting down" in output


def test_clients_with_federated_eval_report_accuracy_the_server_records() -> None:
    """`--federated-eval`: each client holds out part of its shard and reports
    each pulled version's accuracy and loss; the server's dashboard API shows
    the merged federated_accuracy per version, counting every client's report."""
    server, address = start_server("--insecure", "--task", "digits", "--buffer-size", "2", "--max-staleness", "20", "--http-address", "127.0.0.1:0")
    try:
        assert server.stdout is not None
        dashboard = re.search(r"dashboard on (http://\S+/)", server.stdout.readline())
        assert dashboard, STARTUP[server.pid]
        clients = [
            subprocess.Popen(
                [*TRIBUTARY, "client", "--insecure", "--server", address, "--shard", str(i), "--num-shards", "2", "--updates", "3",
                 "--client-id", f"feval-{i}", "--federated-eval", "--eval-fraction", "0.25"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            for i in range(2)
        ]
        reported = 0
        for process in clients:
            stdout, stderr = process.communicate(timeout=120)
            assert process.returncode == 0, stdout + stderr
            match = re.search(r"3 updates accepted, .*, (\d+) evaluations reported", stdout)
            assert match, stdout
            assert int(match.group(1)) >= 1
            reported += int(match.group(1))
        with urllib.request.urlopen(dashboard.group(1) + "api/jobs/default", timeout=10) as response:
            job = json.load(response)
        federated = [point for point in job["evaluations"] if "federated_accuracy" in point["metrics"]]
        assert federated, job["evaluations"]
        for point in federated:
            assert 0 <= point["metrics"]["federated_accuracy"] <= 1
            assert point["metrics"]["federated_loss"] > 0
            assert point["metrics"]["federated_clients"] in (1, 2)
        assert sum(point["metrics"]["federated_clients"] for point in federated) == reported
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--eval-fraction", "0"], "Invalid value for --eval-fraction: must be a fraction in (0, 1), got 0.0"),
        (["--eval-fraction", "1.5"], "Invalid value for --eval-fraction: must be a fraction in (0, 1), got 1.5"),
        (["--eval-every", "0"], "Invalid value for --eval-every: must be >= 1, got 0"),
        (["--eval-fraction", "0.9999"], "--federated-eval: shard 0: 1437 example(s) are too few to hold out 0.9999 of them"),
    ],
)
def test_bad_federated_eval_flags_are_named(args: list[str], message: str) -> None:
    result = subprocess.run(
        [*TRIBUTARY, "client", "--insecure", "--server", "127.0.0.1:1", "--updates", "1", "--federated-eval", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_clients_started_before_the_server_connect_when_it_comes_up(tmp_path: Path) -> None:
    """Retries with backoff: a client whose server is not up yet keeps trying."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = subprocess.Popen(
        [*TRIBUTARY, "client", "--insecure", "--server", f"127.0.0.1:{port}", "--updates", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    time.sleep(2)
    server = subprocess.Popen(
        [*TRIBUTARY, "server", "--insecure", "--address", f"127.0.0.1:{port}", "--task", "digits", "--buffer-size", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output, _ = client.communicate(timeout=120)
        assert client.returncode == 0, output
        assert "2 updates accepted" in output
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "digits", "--buffer-size", "0"], "buffer_size must be an integer >= 1, got 0"),
        (["--task", "digits", "--alpha", "1.5", "--strategy", "fedasync"], "alpha must be in (0, 1], got 1.5"),
        (["--task", "digits", "--staleness", "hinge", "--staleness-b", "-1"], "staleness_b must be >= 0"),
        (["--task", "digits", "--strategy", "fedbuff", "--weight-by-samples"], "use normalizer='weight_sum'"),
        (["--task", "digits", "--strategy", "magic"], "'magic' is not one of"),
        (["--initial-model", "/nonexistent/model.safetensors"], "initial model /nonexistent/model.safetensors does not exist"),
        ([], "the job needs a starting model"),
        (["--task", "digits", "--job", "bad id!"], "job id 'bad id!' must be"),
        (["--task", "digits", "--state-dir", "s", "--checkpoint-every", "0"], "checkpoint_every must be an integer >= 1, got 0"),
        (["--task", "digits", "--state-dir", "s", "--keep-checkpoints", "-1"], "keep_checkpoints must be an integer >= 0, got -1"),
        (["--task", "digits", "--state-dir", "s", "--keep-log-entries", "10"], "keep_log_entries=10 is below the idempotency_window=100000 of job 'default'"),
        (["--task", "digits", "--grace-period", "-1"], "grace_period_s must be a number >= 0, got -1"),
        (["--task", "digits", "--resume-budget-bytes", "-1"], "resume_budget_bytes must be an integer >= 0"),
        (["--task", "digits", "--resume-expiry", "0"], "resume_expiry_s must be a positive number, got 0"),
        (["--task", "digits", "--keep-versions-for-resume", "-1"], "keep_versions_for_resume must be an integer from 0 to 100"),
        (["--task", "digits", "--state-dir", "/dev/null"], "state directory /dev/null cannot be used"),
        (["--task", "digits", "--http-address", "nowhere"], "http_address (--http-address) must be host:port"),
        (["--task", "digits", "--evaluator", "no_colon"], "evaluator (--evaluator) must be \"module:function\""),
        (["--task", "digits", "--evaluator", "no.such_module:f"], "cannot import module 'no.such_module'"),
        (["--task", "digits", "--evaluate-every", "0"], "evaluate_every (--evaluate-every) must be an integer >= 1"),
        (["--task", "digits", "--evaluator", "none", "--evaluate-every", "2"], "evaluate_every (--evaluate-every) only applies with an evaluator"),
    ],
)
def test_bad_server_flags_are_named(args: list[str], message: str) -> None:
    result = subprocess.run([*TRIBUTARY, "server", "--insecure", "--address", "127.0.0.1:0", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_bad_config_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('address = "127.0.0.1:0"\n[[jobs]]\nid = "a"\nstrategy = "fedbuff"\nbufer_size = 3\n')
    result = subprocess.run([*TRIBUTARY, "server", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "unknown job setting 'bufer_size'" in result.stderr


def test_config_file_runs_server(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-c", "from edge.tasks import initial_weights; from server.models import save_model; import sys; save_model(sys.argv[1], initial_weights(0))", str(tmp_path / "model.safetensors")],
        check=True, timeout=60,
    )  # fmt: skip
    (tmp_path / "server.toml").write_text(
        'address = "127.0.0.1:0"\ninsecure = true\n[[jobs]]\nid = "digits"\ninitial_model = "model.safetensors"\nstrategy = "fedasync"\nalpha = 0.5\nmax_staleness = 5\n'
    )
    server, address = start_server("--config", str(tmp_path / "server.toml"))
    try:
        result = subprocess.run(
            [*TRIBUTARY, "client", "--insecure", "--server", address, "--job", "digits", "--updates", "2"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        missing = subprocess.run(
            [*TRIBUTARY, "client", "--insecure", "--server", address, "--job", "nope", "--updates", "1"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert missing.returncode != 0
        assert "no job 'nope'" in missing.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)


def test_bad_client_flags_are_named() -> None:
    result = subprocess.run([*TRIBUTARY, "client", "--shard", "5", "--num-shards", "2", "--updates", "1"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "shard 5 is not in [0, 2)" in result.stderr


@pytest.mark.slow
def test_demo_reaches_target(tmp_path: Path) -> None:
    """The demo as the README runs it: >= 92% test accuracy, exit 0, results written;
    with --http-address its dashboard API serves the live version and the demo's accuracy."""
    out = tmp_path / "runs"
    with (tmp_path / "stderr.txt").open("w+") as stderr:
        demo = subprocess.Popen(
            [*TRIBUTARY, "demo", "--out", str(out), "--http-address", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        assert demo.stdout is not None
        lines = []
        for line in demo.stdout:
            lines.append(line)
            if match := re.search(r"dashboard on (https://\S+/) \(CA certificate: (\S+)\)", line):
                break
        assert match, "".join(lines)
        url, ca_file = match.groups()
        context = ssl.create_default_context(cafile=ca_file)
        job: dict[str, Any] = {}
        for _ in range(600):  # until the demo's own evaluations of new versions show (or it ends)
            with urllib.request.urlopen(url + "api/jobs/digits", context=context, timeout=10) as response:
                job = json.load(response)
            if job["version"] >= 1 and job["evaluations"] and job["evaluations"][-1]["version"] >= 1:
                break
            time.sleep(0.2)
        assert job["version"] >= 1 and job["evaluations"][-1]["version"] >= 1, job
        assert 0 <= job["evaluations"][-1]["metrics"]["accuracy"] <= 1
        rest, _ = demo.communicate(timeout=300)
        stderr.seek(0)
        result = subprocess.CompletedProcess(demo.args, demo.returncode, "".join(lines) + rest, stderr.read())
    assert result.returncode == 0, result.stdout + result.stderr
    tmp_path = out
    runs = list(tmp_path.glob("demo-*/results.json"))
    assert len(runs) == 1
    results = json.loads(runs[0].read_text())
    assert results["final_accuracy"] >= 0.92
    assert results["reached_target"] is True
    assert results["final_version"] >= 1
    assert results["transport"] == "mutual TLS"
    assert (runs[0].parent / "certs" / "clients" / "client-0.pem").is_file()
    assert sum(results["staleness_histogram"].values()) == results["updates_accepted"]
    assert (runs[0].parent / "final_model.safetensors").is_file()
    assert "final test accuracy" in result.stdout and f"results written to {runs[0].parent}/" in result.stdout


def test_demo_fails_loudly_when_target_is_missed(tmp_path: Path) -> None:
    result = subprocess.run(
        [*TRIBUTARY, "demo", "--out", str(tmp_path), "--clients", "2", "--max-versions", "1", "--target-accuracy", "0.99"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "the target was 99%" in result.stderr
    # a missed target still leaves a report of what happened, with its numbers
    (run_dir,) = tmp_path.glob("demo-*")
    assert f"report: {run_dir / 'report' / 'index.html'}" in result.stdout.replace("\n", "")
    results = json.loads((run_dir / "results.json").read_text())
    summary = (run_dir / "report" / "index.md").read_text()
    assert f"| updates accepted | {results['updates_accepted']} |" in summary and "| time to 99% | not reached |" in summary
    for kind in ("accuracy_time", "accuracy_version", "staleness", "updates_per_client", "bytes"):
        assert (run_dir / "report" / f"{run_dir.name}-{kind}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--updates", "0"], "Invalid value for --updates: must be >= 1, got 0"),
        (["--duration", "-1"], "Invalid value for --duration: must be > 0"),
        (["--updates", "1", "--num-shards", "0"], "Invalid value for --num-shards: must be >= 1"),
        (["--updates", "1", "--round-seconds", "-2"], "Invalid value for --round-seconds"),
        (["--updates", "1", "--device", "gpu"], "device 'gpu' is not a torch device"),
        (["--updates", "1", "--device", "cuda"], "torch sees no CUDA device"),
        (["--updates", "1", "--num-shards", "200"], "cannot give 200 clients"),
    ],
)
def test_more_bad_client_flags(args: list[str], message: str) -> None:
    result = subprocess.run([*TRIBUTARY, "client", "--server", "127.0.0.1:1", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dirichlet-alpha", "0"], "Invalid value for --dirichlet-alpha: must be > 0"),
        (["--clients", "500"], "cannot split the digits for --clients 500"),
        (["--clients", "0"], "Invalid value for --clients"),
        (["--target-accuracy", "1.5"], "Invalid value for --target-accuracy"),
        (["--http-address", "nowhere"], "http_address (--http-address) must be host:port"),
    ],
)
def test_bad_demo_flags_are_named(tmp_path: Path, args: list[str], message: str) -> None:
    result = subprocess.run([*TRIBUTARY, "demo", "--out", str(tmp_path), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


@pytest.mark.slow
def test_demo_reaches_target_under_secure_aggregation(tmp_path: Path) -> None:
    result = subprocess.run([*TRIBUTARY, "demo", "--secure-aggregation", "--out", str(tmp_path)], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(next(tmp_path.glob("demo-*/results.json")).read_text())
    assert results["secure_aggregation"] is True
    assert results["reached_target"] is True
    assert results["cohorts_applied"] >= 1
    assert results["staleness_histogram"] == {}  # the server never learns individual updates


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--secure-aggregation", "--strategy", "fedasync"], "secure aggregation runs with strategy 'fedbuff'"),
        (["--secure-aggregation", "--cohort-size", "2"], "cohort_size must be an integer >= 3"),
        (["--secure-aggregation", "--cohort-size", "50", "--min-survivors", "60"], "min_survivors must be an integer in [2, cohort_size=50]"),
        (["--secure-aggregation", "--ring-bits", "8", "--cohort-size", "100"], "ring_bits=8"),
        (["--cohort-size", "5"], "only apply with secure_aggregation = true"),
    ],
)
def test_bad_secure_aggregation_flags_are_named(args: list[str], message: str) -> None:
    result = subprocess.run([*TRIBUTARY, "server", "--insecure", "--address", "127.0.0.1:0", "--task", "digits", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_secure_server_and_clients_as_processes() -> None:
    server, address = start_server("--insecure", "--task", "digits", "--secure-aggregation", "--cohort-size", "3", "--forming-timeout", "2", "--upload-timeout", "30")
    try:
        clients = [
            subprocess.Popen(
                [*TRIBUTARY, "client", "--insecure", "--server", address, "--shard", str(i), "--num-shards", "3", "--updates", "2", "--client-id", f"s{i}"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            for i in range(3)
        ]
        for client in clients:
            output, _ = client.communicate(timeout=180)
            assert client.returncode == 0, output
            assert "2 updates accepted" in output
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert "secure aggregation in cohorts of 3" in STARTUP[server.pid]


def test_config_file_and_job_flags_do_not_mix(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[[jobs]]\nid = "a"\n')
    result = subprocess.run(
        [*TRIBUTARY, "server", "--config", str(config), "--job", "b", "--upload-timeout", "5"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "drop --job, --upload-timeout or move them into" in result.stderr, result.stderr
