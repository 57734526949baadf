"""`tributary demo`: a whole asynchronous federation on this machine.

A server on loopback (in this process), a fleet of `tributary client`
processes holding non-IID shards of the digits data with emulated device
speeds (some several times slower than others), fedbuff aggregation, live
progress, and a results folder. Server and clients talk mutual TLS, with a CA
and certificates made for the run in its folder (`certs/`), as a deployment would. Exits non-zero when the target accuracy was
not reached within the time limit.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from server.certs import Layout

FAST_ROUND_S = 0.3
SPEED_FACTORS = (1.0, 1.0, 1.5, 2.0, 3.0, 5.0)
"""Each client's local round takes at least FAST_ROUND_S times its factor:
the slowest emulated devices are 5x slower than the fastest."""


@dataclass
class History:
    started: float
    points: list[dict[str, float]] = field(default_factory=list)

    def add(self, version: int, accuracy: float, updates_accepted: int) -> None:
        self.points.append(
            {"seconds": round(time.monotonic() - self.started, 3), "version": version, "accuracy": accuracy, "updates_accepted": updates_accepted}
        )


def run_demo(options: dict[str, Any]) -> None:
    _validate(options)
    import numpy as np
    import torch

    from edge.tasks import DigitsCNN, accuracy, dirichlet_shards, initial_weights, load_digits_split
    from server import JobConfig, ServerConfig, StrategyConfig, TLSConfig
    from server.app import running_server
    from server.certs import Layout, write_layout
    from server.models import save_model

    started = time.monotonic()
    torch.set_num_threads(1)
    console = Console(stderr=False)
    run_dir = options["out_dir"] / time.strftime("demo-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = options["seed"]
    data = load_digits_split(seed)
    try:  # the clients draw the same shards; a bad split is reported here, not in their logs
        dirichlet_shards(data.y_train, options["clients"], options["dirichlet_alpha"], seed)
    except ValueError as error:
        raise click.UsageError(f"cannot split the digits for --clients {options['clients']} --dirichlet-alpha {options['dirichlet_alpha']}: {error}") from error
    strategy = StrategyConfig(name=options["strategy"], buffer_size=options["buffer_size"], clients_per_round=options["clients"])
    secure = None
    if options["secure_aggregation"]:
        from server.config import SecAggConfig

        # a cohort plays the part of fedbuff's buffer: K clients, aggregated as one
        secure = SecAggConfig(cohort_size=options["buffer_size"], forming_timeout_s=5.0, phase_timeout_s=10.0, upload_timeout_s=30.0)
    certs = Layout(run_dir / "certs")
    write_layout(certs.root, client_ids=[_client_id(shard) for shard in range(options["clients"])])
    tls = TLSConfig(cert_file=certs.server_cert, key_file=certs.server_key, client_ca_file=certs.ca_cert)
    config = ServerConfig(
        address="127.0.0.1:0", jobs=(JobConfig(job_id="digits", strategy=strategy, secure_aggregation=secure),), tls=tls,
        http_address=options["http_address"],
    )
    eval_model = DigitsCNN()

    def evaluate(tensors: Any) -> float:
        eval_model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
        return accuracy(eval_model, data.x_test, data.y_test)

    with running_server(config, {"digits": initial_weights(seed)}, grace_s=1.0) as running:
        job = running.core.job("digits")
        fleet = _start_fleet(running.address, options, run_dir, certs)
        rule = {"fedbuff": f" (K={strategy.buffer_size})", "fedavg": f" ({strategy.clients_per_round} clients per round)"}
        if secure is not None:
            rule["fedbuff"] = f" under secure aggregation (cohorts of {secure.cohort_size})"
        console.print(
            f"server on {running.address} (mutual TLS): {strategy.name}{rule.get(strategy.name, '')}, "
            f"{len(fleet)} clients, round times {', '.join(f'{FAST_ROUND_S * f:.2f}s' for f, _ in fleet)}"
        )
        if running.http_address is not None:  # HTTPS with the run's certificates: the browser trusts certs/ca.pem or warns
            console.print(f"dashboard on https://{running.http_address}/ (CA certificate: {certs.ca_cert})", soft_wrap=True)
        history = History(started)
        history.add(0, evaluate(job.snapshot().tensors), job.stats.updates_accepted)
        try:
            _watch(job, evaluate, history, options, console, fleet, run_dir)
            # the model as training ended, before the fleet's shutdown adds its own time
            final = job.snapshot()
            final_accuracy = evaluate(final.tensors)
            trained_s = time.monotonic() - started
        finally:
            _stop_fleet(fleet)
        stats = job.read_stats(copy.deepcopy)  # one consistent copy: the server still serves
        save_model(run_dir / "final_model.safetensors", final.tensors)

    target = options["target_accuracy"]
    first_hit = next((p for p in history.points if p["accuracy"] >= target and p["seconds"] <= options["time_limit"]), None)
    reached = first_hit is not None
    results = {
        "strategy": strategy.name,
        "secure_aggregation": secure is not None,
        "transport": "mutual TLS",
        "cohorts_applied": stats.cohorts_applied,
        "cohorts_aborted": dict(stats.cohorts_aborted),
        "buffer_size": strategy.buffer_size,
        "clients": options["clients"],
        "speed_factors": [f for f, _ in fleet],
        "final_version": final.version,
        "final_accuracy": final_accuracy,
        "target_accuracy": options["target_accuracy"],
        "reached_target": reached,
        "seconds_to_target": first_hit["seconds"] if first_hit else None,
        "version_at_target": first_hit["version"] if first_hit else None,
        "wall_seconds": round(trained_s, 2),
        "updates_accepted": stats.updates_accepted,
        "updates_rejected": dict(stats.rejected),
        "staleness_histogram": {str(k): v for k, v in sorted(stats.staleness.items())},
        "updates_per_client": dict(stats.updates_per_client),
        "energy_joules_total": job.energy_joules_total,
        # demo clients push uncompressed, so each update is the model's size on the wire;
        # under secure aggregation the masked uploads are sized otherwise (not recorded)
        "update_bytes": None if secure is not None else final.payload_bytes,
        "history": history.points,
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    _print_summary(console, results, run_dir)
    _print_report(console, run_dir)
    if not reached:
        best = max(p["accuracy"] for p in history.points)
        raise click.ClickException(
            f"best test accuracy {best:.1%} (final {final_accuracy:.1%}) after {trained_s:.0f}s: "
            f"the target was {target:.0%} within {options['time_limit']:.0f}s"
        )


def _validate(options: dict[str, Any]) -> None:
    if options["clients"] < 1:
        raise click.BadParameter(f"must be >= 1, got {options['clients']}", param_hint="--clients")
    if options["buffer_size"] < 1:
        raise click.BadParameter(f"must be >= 1, got {options['buffer_size']}", param_hint="--buffer-size")
    if options["max_versions"] < 1:
        raise click.BadParameter(f"must be >= 1, got {options['max_versions']}", param_hint="--max-versions")
    if options["time_limit"] <= 0:
        raise click.BadParameter(f"must be > 0, got {options['time_limit']}", param_hint="--time-limit")
    if options["secure_aggregation"] and options["strategy"] != "fedbuff":
        raise click.BadParameter(f"secure aggregation runs with fedbuff, not {options['strategy']}", param_hint="--strategy")
    if options["secure_aggregation"] and not 3 <= options["buffer_size"] <= options["clients"]:
        raise click.BadParameter(
            f"with --secure-aggregation the buffer is a cohort: between 3 and --clients ({options['clients']}), got {options['buffer_size']}",
            param_hint="--buffer-size",
        )
    if options["dirichlet_alpha"] <= 0:
        raise click.BadParameter(f"must be > 0, got {options['dirichlet_alpha']}", param_hint="--dirichlet-alpha")
    if not 0 < options["target_accuracy"] <= 1:
        raise click.BadParameter(f"must be in (0, 1], got {options['target_accuracy']}", param_hint="--target-accuracy")


def _client_id(shard: int) -> str:
    return f"client-{shard}"


def _start_fleet(address: str, options: dict[str, Any], run_dir: Path, certs: Layout) -> list[tuple[float, subprocess.Popen[bytes]]]:
    fleet = []
    count = options["clients"]
    for shard in range(count):
        factor = SPEED_FACTORS[shard % len(SPEED_FACTORS)]
        log = open(run_dir / f"client-{shard}.log", "wb")  # noqa: SIM115 - the child keeps its own copy
        command = [
            sys.executable, "-m", "tributary", "client",
            "--server", address, "--job", "digits", "--task", "digits",
            "--shard", str(shard), "--num-shards", str(count),
            "--dirichlet-alpha", str(options["dirichlet_alpha"]), "--seed", str(options["seed"]),
            "--duration", str(options["time_limit"]), "--round-seconds", str(FAST_ROUND_S * factor),
            "--client-id", _client_id(shard), "--device", "cpu",
            "--ca", str(certs.ca_cert), "--cert", str(certs.client_cert(_client_id(shard))),
            "--key", str(certs.client_key(_client_id(shard))),
        ]  # fmt: skip
        with log:
            fleet.append((factor, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)))
    return fleet


def _stop_fleet(fleet: list[tuple[float, subprocess.Popen[bytes]]]) -> None:
    for _, process in fleet:
        process.terminate()
    for _, process in fleet:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _watch(
    job: Any,
    evaluate: Any,
    history: History,
    options: dict[str, Any],
    console: Console,
    fleet: list[tuple[float, subprocess.Popen[bytes]]],
    run_dir: Path,
) -> None:
    """Evaluate each new version until max_versions or the time limit; stop
    early, with the cause, if a client process fails."""
    max_versions = options["max_versions"]
    deadline = history.started + options["time_limit"]
    columns = (
        TextColumn("[bold]training"),
        BarColumn(),
        TextColumn("version {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("accuracy {task.fields[accuracy]:.1%}"),
        TimeElapsedColumn(),
    )
    seen = 0
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task("versions", total=max_versions, accuracy=history.points[-1]["accuracy"])
        while seen < max_versions and time.monotonic() < deadline:
            _check_fleet(fleet, run_dir)
            snapshot = job.wait_for_version(seen + 1, timeout_s=0.5)
            if snapshot.version == seen:
                continue
            seen = snapshot.version
            history.add(seen, evaluate(snapshot.tensors), job.stats.updates_accepted)
            # the demo is the job's evaluator: its accuracy shows on the dashboard and in /metrics
            job.record_evaluation(seen, time.time(), {"accuracy": history.points[-1]["accuracy"]})
            progress.update(task, completed=min(seen, max_versions), accuracy=history.points[-1]["accuracy"])


def _check_fleet(fleet: list[tuple[float, subprocess.Popen[bytes]]], run_dir: Path) -> None:
    for shard, (_, process) in enumerate(fleet):
        code = process.poll()
        if code not in (None, 0):
            log = run_dir / f"client-{shard}.log"
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
            raise click.ClickException(f"client {shard} exited with status {code}; the end of {log}:\n{tail}")


def _print_summary(console: Console, results: dict[str, Any], run_dir: Path) -> None:
    table = Table(title="tributary demo", show_header=False)
    table.add_row("final test accuracy", f"{results['final_accuracy']:.2%} (target {results['target_accuracy']:.0%})")
    if results["reached_target"]:
        table.add_row("target reached", f"after {results['seconds_to_target']:.1f}s, at version {results['version_at_target']}")
    table.add_row("model versions", str(results["final_version"]))
    table.add_row("updates accepted", str(results["updates_accepted"]))
    if results["secure_aggregation"]:
        aborted = sum(results["cohorts_aborted"].values())
        table.add_row("secure cohorts", f"{results['cohorts_applied']} applied, {aborted} aborted")
    rejected = results["updates_rejected"]
    table.add_row("updates rejected", ", ".join(f"{k}: {v}" for k, v in rejected.items()) or "0")
    if results["secure_aggregation"]:
        hidden = "not known to the server (secure aggregation)"
        table.add_row("staleness seen (tau: count)", hidden)
        table.add_row("updates per client", hidden)
    else:
        histogram = results["staleness_histogram"]
        table.add_row("staleness seen (tau: count)", " ".join(f"{k}:{v}" for k, v in histogram.items()))
        per_client = sorted(results["updates_per_client"].items())
        table.add_row("updates per client", " ".join(f"{k.removeprefix('client-')}:{v}" for k, v in per_client))
    table.add_row("wall time", f"{results['wall_seconds']:.1f}s")
    console.print(table)
    console.print(f"results written to {run_dir}/ (results.json, final_model.safetensors, client logs, TLS certificates)", soft_wrap=True)


def _print_report(console: Console, run_dir: Path) -> None:
    from tributary._report_cmd import report_for_run

    console.print(f"report: {report_for_run(run_dir)}", soft_wrap=True)
