"""A group of emulated devices in one process (a local worker process or a
Ray actor): one gRPC channel shared by all of them, one thread per device
(they sleep most of the time), a gate bounding the real work at once.

`run_device_group(spec)` is what every backend runs; it is a plain function
of picklable data, so a backend only has to ship a `GroupSpec` somewhere and
bring a `GroupReport` back.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from edge.datasets import FederatedDataset, digits_dirichlet, synthetic
from edge.profiles import Fleet
from edge.simulate.config import Experiment

logger = logging.getLogger("tributary.simulate")
JOIN_GRACE_S = 15.0
"""Real seconds device threads get, past the end of the run, to finish a call in flight."""


def experiment_data(experiment: Experiment) -> FederatedDataset:
    """The experiment's partition: the same for the same seed, in every process."""
    data = experiment.data
    if data.name == "digits":
        return digits_dirichlet(experiment.devices, data.dirichlet_alpha, experiment.seed, min_size=data.min_size)
    return synthetic(experiment.devices, data.alpha, data.beta, experiment.seed, max_samples=data.max_samples, iid=data.iid)


def experiment_fleet(experiment: Experiment) -> Fleet:
    return experiment.fleet.build(experiment.devices, experiment.seed)


@dataclass(frozen=True)
class GroupSpec:
    experiment: Experiment
    address: str
    job_id: str
    devices: tuple[int, ...]
    start_wall: float
    """time.time() at which the emulated clock starts (the same in every group)."""
    group: int = 0


@dataclass
class GroupReport:
    group: int
    devices: list[dict[str, Any]] = field(default_factory=list)
    ready_lag_s: float = 0.0
    """How late (real seconds) this group was ready after the clock started; <= 0 is on time."""
    unfinished: int = 0
    """Device threads still in a call when the group gave up waiting for them."""


def run_device_group(spec: GroupSpec) -> GroupReport:
    """Emulate `spec.devices` until the run's end; their reports."""
    import torch

    from client_sdk import Client, RetryPolicy
    from edge.simulate.device import DeviceEmulator, EmulatedClock, VersionWatch

    torch.set_num_threads(1)  # many devices share a core or two: no intra-op threads
    experiment = spec.experiment
    data = experiment_data(experiment)
    fleet = experiment_fleet(experiment)
    stop = threading.Event()
    clock = EmulatedClock(spec.start_wall, experiment.run.time_scale, experiment.run.duration_s, stop)
    channel = grpc.insecure_channel(spec.address, options=[("grpc.max_receive_message_length", 64 << 20)])
    retry = RetryPolicy(max_attempts=20, initial_backoff_s=0.1, max_backoff_s=5.0)
    try:
        probe = Client(spec.address, spec.job_id, channel=channel, client_id=f"sim-watch-{spec.group}", retry=retry)
        job = probe.job_info()
        names = [s.name for s in job.specs]
        model_bytes = sum(4 * int(_prod(s.shape)) for s in job.specs)
        gate = threading.Semaphore(experiment.run.max_in_flight)
        emulators = [
            DeviceEmulator(
                index=i,
                profile=fleet.profiles[i],
                shard=data.shards[i],
                experiment=experiment,
                client=Client(spec.address, spec.job_id, channel=channel, client_id=f"device-{i}", retry=retry),
                clock=clock,
                gate=gate,
                names=names,
                model_bytes=model_bytes,
                num_classes=data.num_classes,
                synchronous=job.synchronous,
                secure=job.secure_aggregation,
                versions=None,
            )
            for i in spec.devices
        ]
        ready_lag = time.time() - spec.start_wall
        if ready_lag > 0:
            logger.warning("device group %d was ready %.1fs after the clock started (raise [run] startup_s)", spec.group, ready_lag)
        else:
            time.sleep(-ready_lag)
        watch = VersionWatch(probe, clock) if job.synchronous else None
        for emulator in emulators:
            emulator.versions = watch
        threads = [threading.Thread(target=e.run, name=f"device-{e.report.index}", daemon=True) for e in emulators]
        for thread in threads:
            thread.start()
        deadline = spec.start_wall + experiment.run.real_duration_s + JOIN_GRACE_S
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.time()))
        stop.set()
        unfinished = sum(t.is_alive() for t in threads)
        return GroupReport(spec.group, [e.report.to_dict() for e in emulators], ready_lag, unfinished)
    finally:
        stop.set()
        channel.close()


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out
