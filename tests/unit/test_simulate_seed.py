"""One seed, one experiment: the partition, the fleet and every device's
schedule (availability, charging, dropouts) come out the same each time the
experiment is built, in whichever process builds it; another seed differs."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import grpc

from client_sdk import Client
from edge.simulate import Experiment
from edge.simulate.device import DeviceEmulator
from edge.simulate.worker import experiment_data, experiment_fleet

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "simulate" / "synthetic-1000.toml"  # diurnal: devices come and go, charge and not
PROBE_TIMES = (0.0, 50.0, 400.0, 3000.0, 20000.0)


def schedule(seed: int) -> list[Any]:
    """What the seed fixes about each device, read the way the emulator reads it."""
    experiment = Experiment.from_mapping({**Experiment.from_toml(EXAMPLE).to_mapping(), "seed": seed, "devices": 12})
    data, fleet = experiment_data(experiment), experiment_fleet(experiment)
    channel = grpc.insecure_channel("127.0.0.1:9")  # never called: building a device makes no RPC
    try:
        devices = [
            DeviceEmulator(
                index=i, profile=fleet.profiles[i], shard=data.shards[i], experiment=experiment,
                client=Client("127.0.0.1:9", "default", channel=channel, client_id=f"device-{i}"),
                stop=threading.Event(), gate=threading.Semaphore(1), names=[], model_bytes=0,
                num_classes=data.num_classes, synchronous=False, secure=False, slots=False, profile_name=fleet.name,
            )  # fmt: skip
            for i in range(experiment.devices)
        ]
        return [
            (
                fleet.profiles[i],
                data.shards[i].y.tolist(),
                [device.online.next_change(t) for t in PROBE_TIMES],
                [device.charging.is_on(t) for t in PROBE_TIMES],
                device.rng.random(8).tolist(),  # the dropout and abandon draws
            )
            for i, device in enumerate(devices)
        ]
    finally:
        channel.close()


def test_the_same_seed_gives_the_same_partition_fleet_and_device_schedules() -> None:
    assert schedule(5) == schedule(5)


def test_another_seed_gives_another_experiment() -> None:
    first, other = schedule(5), schedule(6)
    assert [device[1] for device in first] != [device[1] for device in other]  # partition
    assert [device[0] for device in first] != [device[0] for device in other]  # fleet
    assert [device[4] for device in first] != [device[4] for device in other]  # draws
