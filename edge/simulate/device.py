"""One emulated device: its profile's delays as real (scaled) sleeps, its
availability, battery and dropouts, and real training on its shard.

A round, on the emulated clock:
  1. wait until online and eligible (battery above the minimum, or charging;
     charging when the rules require it);
  2. pull the model (for real) and spend the download time;
  3. train for real on the shard (cheap), then spend the emulated compute
     time (samples x epochs x seconds_per_sample);
  4. abandon the round on a dropout (drawn per round from the device's own
     generator) or when the device goes offline before it is done;
  5. spend the upload time and push (for real; under secure aggregation,
     through a cohort joined at the start of the round);
  6. synchronous jobs: wait for the next round's model.
Real work (pull, train, push) goes through the worker's gate, a semaphore
that bounds how much of it runs at once in one process.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from client_sdk import (
    Client,
    CohortAborted,
    NotAcceptedNow,
    TributaryError,
    load_into,
    model_arrays,
)
from client_sdk._secure import SecureRound
from edge.datasets import Shard, build_model
from edge.profiles import DeviceProfile, Timeline
from edge.simulate.config import Experiment

logger = logging.getLogger("tributary.simulate")
ERROR_BACKOFF_S = 0.5
"""Real seconds a device waits after an unexpected error before its next round."""


class EmulatedClock:
    """Emulated seconds since `start_wall` (a time.time()), compressed by
    `time_scale`; sleeps end early at the end of the run or on `stop`."""

    def __init__(self, start_wall: float, time_scale: float, duration_s: float, stop: threading.Event) -> None:
        self.start_wall = start_wall
        self.time_scale = time_scale
        self.duration_s = duration_s
        self.stop = stop

    def now(self) -> float:
        return (time.time() - self.start_wall) / self.time_scale

    def over(self) -> bool:
        return self.stop.is_set() or self.now() >= self.duration_s

    def sleep_until(self, t: float) -> bool:
        """Sleep until emulated time t; False when the run ends first."""
        end = min(t, self.duration_s)
        real = (end - self.now()) * self.time_scale
        if real > 0 and self.stop.wait(real):
            return False
        return t <= self.duration_s and not self.stop.is_set()

    def remaining_real_s(self) -> float:
        return max(0.0, (self.duration_s - self.now()) * self.time_scale)


class VersionWatch:
    """One long poll per worker process for synchronous jobs: devices wait on
    it for the next round's version instead of each holding a server thread."""

    def __init__(self, client: Client, clock: EmulatedClock) -> None:
        self._client = client
        self._clock = clock
        self._version = 0
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._poll, name="simulate-version-watch", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._clock.over():
            wait = min(10.0, self._clock.remaining_real_s())
            try:
                version = self._client.pull(min_version=self._version + 1, wait_s=wait).version
            except TributaryError as error:
                if not self._clock.over():
                    logger.warning("version watch: %s", error)
                self._clock.stop.wait(ERROR_BACKOFF_S)
                continue
            with self._changed:
                self._version = max(self._version, version)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def version(self) -> int:
        """The newest version seen."""
        return self._version

    def wait_beyond(self, version: int) -> bool:
        """Block until a version > `version` is published; False if the run ended."""
        with self._changed:
            while self._version <= version:
                if self._clock.over():
                    return False
                self._changed.wait(timeout=0.5)
        return True


@dataclass
class DeviceReport:
    index: int
    client_id: str
    rounds_started: int = 0
    updates_accepted: int = 0
    updates_refused: int = 0
    dropouts: int = 0
    went_offline: int = 0
    """Rounds abandoned because the device went offline before finishing."""
    waited_offline_s: float = 0.0
    waited_battery_s: float = 0.0
    errors: int = 0
    energy_j: float = 0.0
    """Energy spent training (power_w x emulated compute seconds)."""
    battery_level: float = 1.0
    staleness: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DeviceEmulator:
    def __init__(
        self,
        index: int,
        profile: DeviceProfile,
        shard: Shard,
        experiment: Experiment,
        client: Client,
        stop: threading.Event,
        gate: threading.Semaphore,
        names: list[str],
        model_bytes: int,
        num_classes: int,
        synchronous: bool,
        secure: bool,
    ) -> None:
        self.profile = profile
        self.shard = shard
        self.experiment = experiment
        self.client = client
        self.clock = EmulatedClock(time.time(), 1.0, 0.0, stop)  # replaced by start()
        self.gate = gate
        self.names = names
        self.model_bytes = model_bytes
        self.synchronous = synchronous
        self.secure = secure
        self.versions: VersionWatch | None = None
        # one generator per device and process: the schedule is the seed's, whichever worker runs it
        seed = experiment.seed
        self.rng = np.random.default_rng([seed, index, 1])
        self.online: Timeline = profile.availability.timeline(np.random.default_rng([seed, index, 2]))
        self.charging: Timeline = profile.charging.timeline(np.random.default_rng([seed, index, 3]))
        self.report = DeviceReport(index=index, client_id=client.client_id, battery_level=profile.battery_level)
        self._battery_at = 0.0
        self.model = build_model(experiment.model.kind, shard.x.shape[1], num_classes, hidden=experiment.model.hidden)
        self._x = torch.from_numpy(shard.x)
        self._y = torch.from_numpy(shard.y)
        self._generator = torch.Generator().manual_seed(int(self.rng.integers(2**31)))

    def start(self, clock: EmulatedClock, versions: VersionWatch | None) -> None:
        """The run's clock, and (synchronous jobs) the worker's version watch."""
        self.clock = clock
        self.versions = versions

    # -- battery -----------------------------------------------------------------------

    def _battery(self, t: float) -> float:
        """The level at t: charging since the last update adds charge_w (the
        state at the last update stands for the whole interval: good enough
        for intervals far shorter than a charging period)."""
        report, p = self.report, self.profile
        if t > self._battery_at and self.charging.is_on(self._battery_at):
            report.battery_level = min(1.0, report.battery_level + p.charge_w * (t - self._battery_at) / p.battery_capacity_j)
        self._battery_at = max(self._battery_at, t)
        return report.battery_level

    def _wait_until_eligible(self) -> bool:
        rules = self.experiment.eligibility
        while not self.clock.over():
            t = self.clock.now()
            if not self.online.is_on(t):
                resume = self.online.next_on(t)
                self.report.waited_offline_s += min(resume, self.clock.duration_s) - t
                if not self.clock.sleep_until(resume):
                    return False
                continue
            charging = self.charging.is_on(t)
            low = self._battery(t) < rules.min_battery or self.report.battery_level <= 0
            if (rules.require_charging or low) and not charging:
                resume = self.charging.next_on(t)
                if math.isinf(resume):
                    return False  # never charges again: this device is out of the run
                self.report.waited_battery_s += min(resume, self.clock.duration_s) - t
                if not self.clock.sleep_until(resume):
                    return False
                continue
            return True
        return False

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> DeviceReport:
        last_pushed_base = -1
        while self._wait_until_eligible():
            try:
                if self.synchronous and self.versions is not None and self.versions.version <= last_pushed_base:
                    # this round is pushed (or closed): train again on the next one
                    if not self.versions.wait_beyond(last_pushed_base):
                        break
                    continue  # time passed: check availability and eligibility again
                pushed_base = self._one_round()
                if pushed_base is not None:
                    last_pushed_base = pushed_base
            except TributaryError as error:
                self.report.errors += 1
                logger.info("device %d: %s", self.report.index, error)
                self.clock.stop.wait(ERROR_BACKOFF_S)
        return self.report

    def _one_round(self) -> int | None:
        """One round; the base version it pushed on, or None if it did not push."""
        report, p = self.report, self.profile
        started = self.clock.now()
        report.rounds_started += 1
        with self.gate:
            pulled = self.client.pull()
        cohort = None
        if self.secure:
            cohort = SecureRound(self.client)
            cohort.start()  # joins a cohort; key setup overlaps the training
        with self.gate:
            delta, samples = self._train(pulled.tensors)
        compute_s = p.compute_s(samples)
        download_s = p.transfer_s(self.model_bytes, upload=False)
        upload_s = p.transfer_s(self.model_bytes, upload=True)
        finish = started + download_s + compute_s + upload_s
        if self.rng.random() < p.dropout:
            report.dropouts += 1
            self.clock.sleep_until(started + download_s + compute_s * float(self.rng.random()))
            return None
        offline_at = self.online.next_change(started)
        if offline_at < finish:
            report.went_offline += 1
            self.clock.sleep_until(offline_at)
            return None
        if not self.clock.sleep_until(finish):
            return None
        report.energy_j += p.power_w * compute_s
        report.battery_level = max(0.0, self._battery(finish) - p.power_w * compute_s / p.battery_capacity_j)
        try:
            if cohort is not None:
                flat = np.concatenate([delta[name].reshape(-1) for name in self.names])
                receipt = cohort.submit(pulled.version, flat, samples)
                report.staleness.append(receipt.staleness)
            else:
                with self.gate:
                    result = self.client.push(pulled.version, delta, num_samples=samples)
                report.staleness.append(result.staleness)
        except (NotAcceptedNow, CohortAborted):
            report.updates_refused += 1
        else:
            report.updates_accepted += 1
        return pulled.version

    def _train(self, tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        training = self.experiment.training
        load_into(self.model, tensors)
        self.model.train()
        optimizer = torch.optim.SGD(self.model.parameters(), lr=training.lr, momentum=training.momentum)
        loss_fn = torch.nn.CrossEntropyLoss()
        for _ in range(training.epochs):
            order = torch.randperm(len(self._y), generator=self._generator)
            for start in range(0, len(order), training.batch_size):
                batch = order[start : start + training.batch_size]
                optimizer.zero_grad()
                loss = loss_fn(self.model(self._x[batch]), self._y[batch])
                loss.backward()
                optimizer.step()
        trained = model_arrays(self.model, self.names)
        return {name: trained[name] - tensors[name] for name in self.names}, len(self._y) * training.epochs
