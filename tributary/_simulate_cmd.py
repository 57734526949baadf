"""`tributary simulate CONFIG.toml`: an emulated fleet against a real server.

The server runs in this process (`server.app.running_server` on 127.0.0.1,
port 0, plaintext on loopback), the devices in worker processes or Ray actors
(edge.simulate). In-process because the evaluator then reads each published
model version straight from the job, exactly and without competing with the
devices for pulls, and the job's statistics come for free; the devices never
share the server's process, so they reach it only over gRPC, as real ones do.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import functools
import os
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from edge.simulate.runner import Point

import click
import numpy as np

from edge.simulate.backends import LocalBackend
from tributary._logging import FORMAT_ENV, LEVEL_ENV
from tributary._logging import configure as configure_logging
from edge.simulate import Backend, Experiment, SimulationConfigError, SimulationResult, initial_model, make_backend, simulate

JOB_ID = "sim"


def server_config(experiment: Experiment) -> Any:
    """The ServerConfig for the experiment's [server] table (errors name the key)."""
    from server import ConfigError, JobConfig, ServerConfig

    try:
        job = JobConfig.from_mapping({**experiment.server, "id": JOB_ID})
    except ConfigError as error:
        raise SimulationConfigError(f"[server] {error}") from None
    except TypeError as error:  # a value of the wrong type deep in a dataclass
        raise SimulationConfigError(f"[server] {error}") from None
    run = experiment.run
    # every open stream holds a server thread: the gated pulls and pushes of each
    # worker, one version watch per worker, and under secure aggregation every
    # device may wait in a cohort at once
    streams = run.processes * (2 * run.max_in_flight + 2) + (experiment.devices if job.secure_aggregation is not None else 0)
    workers = max(64, streams + 32)
    return ServerConfig(address="127.0.0.1:0", jobs=(job,), insecure=True, max_workers=workers, max_concurrent_streams=workers - 16)


@contextlib.contextmanager
def _server_log_quiet() -> Iterator[None]:
    """Only the server's errors while a simulation runs (plaintext on loopback
    is the point here), and its level as it was afterwards: a program or test
    that runs a simulation and then a server still hears that server."""
    server_logger = logging.getLogger("tributary.server")
    level = server_logger.level
    server_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        server_logger.setLevel(level)


def run_experiment(
    experiment: Experiment,
    backend: Backend,
    on_point: Callable[[Point], Any] | None = None,
    *,
    http_address: str | None = None,
    on_serving: Callable[[str], Any] | None = None,
) -> SimulationResult:
    """Start the server, run the fleet to the end, stop the server; `on_point`:
    see edge.simulate.simulate. With `http_address` the server also serves the
    dashboard and /metrics there (`on_serving` is told the address bound), and
    the run's evaluations are the job's, so the dashboard shows its accuracy."""
    from server.app import running_server
    from server.core import VERSION_LOG_LENGTH

    config = dataclasses.replace(server_config(experiment), http_address=http_address)
    with _server_log_quiet(), running_server(config, {JOB_ID: initial_model(experiment)}, grace_s=1.0) as running:
        job = running.core.job(JOB_ID)
        if running.http_address is not None and on_serving is not None:
            on_serving(running.http_address)

        def on_evaluated(point: Point) -> None:
            job.record_evaluation(point.version, time.time(), {"accuracy": point.accuracy})
            if on_point is not None:
                on_point(point)

        def watch(min_version: int, timeout_s: float) -> tuple[int, Mapping[str, np.ndarray]]:
            snapshot = job.wait_for_version(min_version, timeout_s)
            return snapshot.version, snapshot.tensors

        result = simulate(experiment, running.address, JOB_ID, backend, watch, on_evaluated)
        stats = job.read_stats(copy.deepcopy)  # one consistent copy: the server still serves
        result.server_stats = {
            "updates_accepted": stats.updates_accepted,
            "rejected": dict(stats.rejected),
            "cohorts_applied": stats.cohorts_applied,
            "cohorts_aborted": sum(stats.cohorts_aborted.values()),
            "energy_joules_total": job.energy_joules_total,
            "slots_expired": job.slots.expired if job.slots is not None else None,
        }
        # the newest VERSION_LOG_LENGTH versions (the server keeps no more in memory); version 0 has none
        result.version_energy = [(v, joules) for v, _, joules in reversed(job.version_history(VERSION_LOG_LENGTH)) if v > 0]
    return result


def write_results(result: SimulationResult, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    (run_dir / "results.json").write_text(
        json.dumps(
            {
                "summary": summary,
                "experiment": result.experiment.to_mapping(),
                "history": [p.__dict__ for p in result.history],
                "energy_per_version": [{"version": v, "energy_j": joules} for v, joules in result.version_energy],
            },
            indent=2,
            default=str,
        )
    )
    with open(run_dir / "history.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["emulated_s", "real_s", "version", "accuracy"])
        for p in result.history:
            writer.writerow([f"{p.emulated_s:.3f}", f"{p.real_s:.3f}", p.version, f"{p.accuracy:.4f}"])
    (run_dir / "devices.json").write_text(json.dumps(result.devices, indent=1))


def load_experiment(path: Path, devices: int | None, seed: int | None) -> Experiment:
    try:
        experiment = Experiment.from_toml(path).with_overrides(devices=devices, seed=seed)
        server_config(experiment)  # the [server] table is checked before any process starts
        from edge.simulate.worker import experiment_data, experiment_fleet

        experiment_fleet(experiment)
        experiment_data(experiment)
    except SimulationConfigError as error:
        raise click.ClickException(f"{path}: {error}") from None
    except ValueError as error:  # the partition cannot be drawn (e.g. too many devices for the digits)
        raise click.ClickException(f"{path}: [data] {error}") from None
    return experiment


def run_simulate(options: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    if options["devices"] is not None and options["devices"] < 1:
        raise click.BadParameter(f"must be >= 1, got {options['devices']}", param_hint="--devices")
    if options["seed"] is not None and options["seed"] < 0:
        raise click.BadParameter(f"must be >= 0, got {options['seed']}", param_hint="--seed")
    experiment = load_experiment(options["config_path"], options["devices"], options["seed"])
    backend = make_backend(options["backend"])
    if isinstance(backend, LocalBackend):
        # the workers log in this command's format; their devices' routine events
        # (hundreds of devices, each refusal and retry) only at --log-level debug
        level = os.environ.get(LEVEL_ENV, "info")
        backend.process_setup = functools.partial(configure_logging, os.environ.get(FORMAT_ENV, "text"), "debug" if level == "debug" else "warning")
    console = Console()
    run = experiment.run
    console.print(
        f"simulating {experiment.devices} devices ({experiment.fleet.builtin or experiment.fleet.file}) on {experiment.data.name}, "
        f"{experiment.strategy}{' + secure aggregation' if experiment.secure_aggregation else ''}, "
        f"{run.duration_s:g} emulated s in {run.real_duration_s:.0f} real s, backend {backend.name}"
    )
    from tributary._progress import SimulationBar

    with SimulationBar(console, run.duration_s, run.time_scale) as bar:
        result = run_experiment(
            experiment, backend, lambda p: bar.point(p.emulated_s, p.version, p.accuracy),
            http_address=options["http_address"],
            on_serving=lambda address: console.print(f"dashboard on http://{address}/", soft_wrap=True),
        )  # fmt: skip
    run_dir = options["out_dir"] / f"{experiment.name}-seed{experiment.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    write_results(result, run_dir)
    summary = result.summary()
    table = Table(title=f"tributary simulate: {experiment.name}", show_header=False)
    for key in ("strategy", "devices_emulated", "devices_that_pushed", "final_version", "updates_accepted", "updates_refused",
                "dropouts", "went_offline", "device_errors", "slot_refusals", "mean_staleness", "energy_j",
                "energy_reported_j", "energy_per_version_j"):  # fmt: skip
        table.add_row(key.replace("_", " "), str(summary[key]))
    table.add_row("final test accuracy", f"{summary['final_accuracy']:.2%} (best {summary['best_accuracy']:.2%})")
    if summary["target_accuracy"] is not None:
        reached = summary["emulated_s_to_target"]
        table.add_row(
            f"time to {summary['target_accuracy']:.0%}",
            "not reached" if reached is None else f"{reached:.0f} emulated s ({summary['real_s_to_target']:.1f} real s)",
        )
    console.print(table)
    console.print(f"results written to {run_dir}/ (results.json, history.csv, devices.json)", soft_wrap=True)
    from tributary._report_cmd import report_for_run

    console.print(f"report: {report_for_run(run_dir)}", soft_wrap=True)
