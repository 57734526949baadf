"""Runs a fleet against a server and records test accuracy over time.

`simulate()` spreads the devices over `run.processes` groups, starts them on
a backend, and meanwhile evaluates each new global model on the held-out test
set (a thread here, reading versions from `watch`, the caller's view of the
server), so the result is a time series of (emulated seconds, real seconds,
version, accuracy). It needs a running server; `tributary simulate` starts
one in-process (see tributary/_simulate_cmd.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edge.datasets import build_model, evaluate
from edge.simulate.backends import Backend
from edge.simulate.config import Experiment
from edge.simulate.worker import GroupReport, GroupSpec, experiment_data

VersionWatch = Callable[[int, float], tuple[int, Mapping[str, np.ndarray]]]
"""watch(min_version, timeout_s) -> (version, tensors): the newest model once
its version is >= min_version, or the current one when the timeout passes."""


def initial_model(experiment: Experiment) -> dict[str, np.ndarray]:
    """The job's starting weights: the experiment's model, seeded."""
    data = experiment_data(experiment)
    model = build_model(experiment.model.kind, data.num_features, data.num_classes, hidden=experiment.model.hidden, seed=experiment.seed)
    return {name: t.detach().numpy().copy() for name, t in model.state_dict().items()}


@dataclass
class Point:
    emulated_s: float
    real_s: float
    version: int
    accuracy: float


@dataclass
class SimulationResult:
    experiment: Experiment
    backend: str
    history: list[Point]
    groups: list[GroupReport]
    real_seconds: float
    final_version: int = 0
    final_accuracy: float = 0.0
    server_stats: dict[str, Any] = field(default_factory=dict)
    version_energy: list[tuple[int, float]] = field(default_factory=list)
    """(version, joules) as the server recorded them: the energy reported for
    the updates that went into each version, oldest first."""

    @property
    def devices(self) -> list[dict[str, Any]]:
        return [device for group in self.groups for device in group.devices]

    def time_to(self, target: float) -> float | None:
        """Emulated seconds until test accuracy first reached `target`."""
        return next((p.emulated_s for p in self.history if p.accuracy >= target), None)

    def summary(self) -> dict[str, Any]:
        devices = self.devices
        target = self.experiment.run.target_accuracy
        reached = self.time_to(target) if target is not None else None
        staleness = [s for d in devices for s in d["staleness"]]
        return {
            "name": self.experiment.name,
            "backend": self.backend,
            "strategy": self.experiment.strategy,
            "secure_aggregation": self.experiment.secure_aggregation,
            "seed": self.experiment.seed,
            "devices": self.experiment.devices,
            "devices_emulated": len(devices),
            "devices_that_pushed": sum(d["updates_accepted"] > 0 for d in devices),
            "final_version": self.final_version,
            "final_accuracy": self.final_accuracy,
            "best_accuracy": max((p.accuracy for p in self.history), default=0.0),
            "target_accuracy": target,
            "emulated_s_to_target": reached,
            "real_s_to_target": None if reached is None else reached * self.experiment.run.time_scale,
            "emulated_duration_s": self.experiment.run.duration_s,
            "real_seconds": round(self.real_seconds, 2),
            "updates_accepted": sum(d["updates_accepted"] for d in devices),
            "updates_refused": sum(d["updates_refused"] for d in devices),
            "rounds_started": sum(d["rounds_started"] for d in devices),
            "dropouts": sum(d["dropouts"] for d in devices),
            "went_offline": sum(d["went_offline"] for d in devices),
            "device_errors": sum(d["errors"] for d in devices),
            "energy_j": round(sum(d["energy_j"] for d in devices), 1),
            "energy_reported_j": round(sum(d["energy_reported_j"] for d in devices), 1),
            "energy_per_version_j": round(sum(e for _, e in self.version_energy) / len(self.version_energy), 2) if self.version_energy else None,
            "slot_refusals": sum(d["slot_refusals"] for d in devices),
            "mean_staleness": float(np.mean(staleness)) if staleness else None,
            "unfinished_devices": sum(g.unfinished for g in self.groups),
            "server": self.server_stats,
        }


def plan_groups(experiment: Experiment, address: str, job_id: str) -> list[GroupSpec]:
    """Devices dealt round-robin over `run.processes` groups (so each group
    gets its share of slow and fast devices)."""
    count = min(experiment.run.processes, experiment.devices)
    return [GroupSpec(experiment, address, job_id, tuple(range(g, experiment.devices, count)), group=g) for g in range(count)]


def simulate(
    experiment: Experiment, address: str, job_id: str, backend: Backend, watch: VersionWatch, on_point: Callable[[Point], Any] | None = None
) -> SimulationResult:
    """Run the experiment's fleet against the server at `address` until the
    run's end; `on_point` is told each evaluation as it is recorded (the first
    one, at emulated second 0, when the devices' clock starts)."""
    data = experiment_data(experiment)
    model = build_model(experiment.model.kind, data.num_features, data.num_classes, hidden=experiment.model.hidden)
    run = experiment.run
    history: list[Point] = []

    def record(point: Point) -> None:
        history.append(point)
        if on_point is not None:
            on_point(point)
    started = threading.Event()
    done = threading.Event()
    clock_start = [0.0]

    def on_start(start_wall: float) -> None:
        clock_start[0] = start_wall
        started.set()

    def accuracy_of(tensors: Mapping[str, np.ndarray]) -> float:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
        return evaluate(model, data.x_test, data.y_test)

    def evaluator() -> None:
        while not started.wait(0.5):
            if done.is_set():
                return
        start_wall = clock_start[0]
        version, tensors = watch(0, 0.0)
        record(Point(0.0, 0.0, version, accuracy_of(tensors)))
        seen = version
        while not done.is_set():
            version, tensors = watch(seen + 1, 0.5)
            if version <= seen:
                continue
            real = max(0.0, time.time() - start_wall)
            record(Point(real / run.time_scale, real, version, accuracy_of(tensors)))
            seen = version
            done.wait(run.eval_interval_s)

    thread = threading.Thread(target=evaluator, name="simulate-evaluator", daemon=True)
    thread.start()
    try:
        groups = backend.run_groups(plan_groups(experiment, address, job_id), on_start)
    finally:
        done.set()
        thread.join()
    version, tensors = watch(0, 0.0)
    final = accuracy_of(tensors)
    real = time.time() - clock_start[0]
    end = min(real, run.real_duration_s)
    record(Point(end / run.time_scale, end, version, final))
    return SimulationResult(experiment, backend.name, history, groups, real, version, final)
