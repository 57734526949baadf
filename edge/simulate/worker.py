"""A group of emulated devices in one process (a local worker process or a
Ray actor): one gRPC channel shared by all of them, one thread per device
(they sleep most of the time), a gate bounding the real work at once.

`DeviceGroup` is what every backend runs; it is built from picklable data
(a `GroupSpec`) and returns picklable data (a `GroupReport`), so a backend
only ships a spec somewhere, says when to start, and brings the report back.
"""

from __future__ import annotations

import logging
import math
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
    group: int = 0


@dataclass
class GroupReport:
    group: int
    devices: list[dict[str, Any]] = field(default_factory=list)
    unfinished: int = 0
    """Device threads still in a call when the group gave up waiting for them."""


class DeviceGroup:
    """Two phases, so that every group's clock starts together however long
    its process took to start: `DeviceGroup(spec)` builds the partition, the
    fleet and a client per device (seconds, in a fresh process); `run(start_wall)`
    emulates the devices from `start_wall` (a time.time()) to the run's end."""

    def __init__(self, spec: GroupSpec) -> None:
        import torch

        from client_sdk import Client, RetryPolicy
        from edge.simulate.device import DeviceEmulator

        torch.set_num_threads(1)  # many devices share a core or two: no intra-op threads
        self.spec = spec
        experiment = spec.experiment
        data = experiment_data(experiment)
        fleet = experiment_fleet(experiment)
        self.stop = threading.Event()
        self.channel = grpc.insecure_channel(spec.address)
        retry = RetryPolicy(max_attempts=20, initial_backoff_s=0.1, max_backoff_s=5.0)
        self.probe = Client(spec.address, spec.job_id, channel=self.channel, client_id=f"sim-watch-{spec.group}", retry=retry)
        self.job = self.probe.job_info()
        names = [s.name for s in self.job.specs]
        model_bytes = sum(4 * math.prod(s.shape) for s in self.job.specs)
        gate = threading.Semaphore(experiment.run.max_in_flight)
        self.emulators = [
            DeviceEmulator(
                index=i,
                profile=fleet.profiles[i],
                shard=data.shards[i],
                experiment=experiment,
                client=Client(spec.address, spec.job_id, channel=self.channel, client_id=f"device-{i}", retry=retry),
                stop=self.stop,
                gate=gate,
                names=names,
                model_bytes=model_bytes,
                num_classes=data.num_classes,
                synchronous=self.job.synchronous,
                secure=self.job.secure_aggregation,
                slots=self.job.max_concurrent_trainers is not None,
                profile_name=fleet.name,
            )
            for i in spec.devices
        ]

    def run(self, start_wall: float) -> GroupReport:
        from edge.simulate.device import EmulatedClock, VersionWatch

        run = self.spec.experiment.run
        clock = EmulatedClock(start_wall, run.time_scale, run.duration_s, self.stop)
        try:
            time.sleep(max(0.0, start_wall - time.time()))
            watch = VersionWatch(self.probe, clock) if self.job.synchronous else None
            for emulator in self.emulators:
                emulator.start(clock, watch)
            threads = [threading.Thread(target=e.run, name=f"device-{e.report.index}", daemon=True) for e in self.emulators]
            for thread in threads:
                thread.start()
            deadline = start_wall + run.real_duration_s + JOIN_GRACE_S
            for thread in threads:
                thread.join(timeout=max(0.0, deadline - time.time()))
            self.stop.set()
            unfinished = sum(t.is_alive() for t in threads)
            return GroupReport(self.spec.group, [e.report.to_dict() for e in self.emulators], unfinished)
        finally:
            self.stop.set()
            self.channel.close()


def run_device_group(spec: GroupSpec, start_wall: float) -> GroupReport:
    """Both phases at once (when the caller has no need to line groups up)."""
    return DeviceGroup(spec).run(start_wall)
