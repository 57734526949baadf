"""One emulated device: its profile's delays as real (scaled) sleeps, its
availability, battery and dropouts, and real training on its shard.

A round, on the emulated clock:
  1. wait until online and eligible: the SDK's `EligibilityPolicy` (the
     experiment's [eligibility] table) checks the device's `DeviceState`
     (battery, charging; emulated devices are always idle and unmetered),
     and an empty battery stops a device that is not charging;
  2. on jobs with training slots, ask for one (refused: a synchronous job's
     device waits for the next round, an asynchronous one for retry_after_s);
     pull the model (for real) and spend the download time; a slot holder
     sends TRAINING heartbeats while it works, so its lease never lapses;
  3. train for real on the shard (cheap), then spend the emulated compute
     time (samples x epochs x seconds_per_sample);
  4. abandon the round on a dropout (drawn per round from the device's own
     generator) or when the device goes offline before it is done; a slot it
     held is kept by the server until its lease lapses (the device is gone:
     no heartbeats), which is what holds a synchronous round up, and the
     device stays away that long;
  5. spend the upload time and push with the update's energy estimate (for
     real; under secure aggregation, through a cohort joined at the start of
     the round);
  6. synchronous jobs: wait for the next round's model.
Real work (pull, train, push) goes through the worker's gate, a semaphore
that bounds how much of it runs at once in one process.

Energy of a round (`edge.energy`): the profile's `power_w` x the emulated
compute time, plus the radio cost of pulling and pushing the model over
Wi-Fi (`WIFI_2009`: emulated devices are on unmetered networks). A finished
round reports it with its push; an abandoned one spends what it used (the
download, the compute until it stopped) from the battery and reports nothing.
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
    ClientState,
    CohortAborted,
    DeviceState,
    EligibilityPolicy,
    Ineligible,
    NotAcceptedNow,
    SecureRound,
    SlotGrant,
    TributaryError,
    load_into,
    model_arrays,
)
from edge.datasets import Shard, build_model
from edge.energy import WIFI_2009, estimate_update_energy
from edge.profiles import DeviceProfile, Timeline
from edge.simulate.config import Experiment

logger = logging.getLogger("tributary.simulate")
ERROR_BACKOFF_S = 0.5
"""Real seconds a device waits after an unexpected error before its next round."""
INELIGIBLE_POLL_S = 60.0
"""Emulated seconds between two looks at a policy that refuses a charging device."""


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
                    logger.warning("version watch: %s", error, extra=self._client.log_context(self._version))
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

    def wait_beyond(self, version: int, timeout_s: float | None = None) -> bool:
        """Block until a version > `version` is published, or `timeout_s` real
        seconds pass; False if the run ended."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while self._version <= version:
                if self._clock.over():
                    return False
                left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if left <= 0:
                    break
                self._changed.wait(timeout=left)
        return not self._clock.over()


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
    slot_refusals: int = 0
    """Training slots asked for and refused (a full round, or all slots busy)."""
    ineligible: str = ""
    """Why the eligibility policy last refused the device ("" if it never did)."""
    energy_j: float = 0.0
    """Energy spent: compute (power_w x emulated compute seconds) and radio, lost rounds included."""
    energy_reported_j: float = 0.0
    """Energy reported with the updates the server accepted."""
    battery_level: float = 1.0
    staleness: list[int] = field(default_factory=list)
    accepted: list[tuple[int, float]] = field(default_factory=list)
    """(base version, energy reported) of each accepted update."""
    uploads: list[tuple[float, int]] = field(default_factory=list)
    """(emulated seconds, bytes on the wire) of each accepted plain push (run
    reports plot them; a secure cohort's masked upload is not counted here)."""

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
        slots: bool = False,
        profile_name: str = "",
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
        self.slots = slots
        """The job has training slots: ask for one before every round."""
        self.profile_name = profile_name
        self.policy = EligibilityPolicy(
            require_charging=experiment.eligibility.require_charging,
            require_idle=experiment.eligibility.require_idle,
            require_unmetered=experiment.eligibility.require_unmetered,
            min_battery=experiment.eligibility.min_battery,
        )
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

    def state(self, t: float) -> DeviceState:
        """The device's state at t, as its SDK would report it (emulated devices
        are always idle and on an unmetered network)."""
        return DeviceState(
            battery_level=self._battery(t), charging=self.charging.is_on(t), idle=True, unmetered=True, profile=self.profile_name
        )

    def _wait_until_eligible(self) -> bool:
        while not self.clock.over():
            t = self.clock.now()
            if not self.online.is_on(t):
                resume = self.online.next_on(t)
                self.report.waited_offline_s += min(resume, self.clock.duration_s) - t
                if not self.clock.sleep_until(resume):
                    return False
                continue
            state = self.state(t)
            verdict = self.policy.check(state)
            empty = not state.charging and self.report.battery_level <= 0
            if verdict and not empty:
                return True
            self.report.ineligible = verdict.reason if isinstance(verdict, Ineligible) else "battery empty"
            # charging is what can change the answer (battery, require_charging)
            resume = self.charging.next_on(t) if not state.charging else t + INELIGIBLE_POLL_S
            if math.isinf(resume):
                return False  # never charges again: this device is out of the run
            self.report.waited_battery_s += min(resume, self.clock.duration_s) - t
            if not self.clock.sleep_until(resume):
                return False
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
                grant = self._acquire_slot() if self.slots else None
                if grant is not None and not grant.granted:
                    self._wait_after_refusal(grant)
                    continue
                pushed_base = self._one_round(grant)
                if pushed_base is not None:
                    last_pushed_base = pushed_base
            except TributaryError as error:
                self.report.errors += 1
                logger.info("device %d: %s", self.report.index, error, extra=self.client.log_context())
                self.clock.stop.wait(ERROR_BACKOFF_S)
        return self.report

    def _acquire_slot(self) -> SlotGrant:
        with self.gate:
            grant = self.client.acquire_training_slot(self.state(self.clock.now()))
        if not grant.granted:
            self.report.slot_refusals += 1
        return grant

    def _wait_after_refusal(self, grant: SlotGrant) -> None:
        """A synchronous round is full: wait for the next round's version (a
        long poll shared by the worker), or until `retry_after_s` (real) in
        case a holder's lease lapses and frees a place in this round. An
        asynchronous job's slots are all busy: ask again after `retry_after_s`
        (real seconds: at time_scale 0.01, 1 s is 100 emulated seconds)."""
        if self.synchronous and self.versions is not None:
            self.versions.wait_beyond(grant.version, timeout_s=grant.retry_after_s)
        else:
            self.clock.stop.wait(grant.retry_after_s)

    def _sleep_working(self, t: float, grant: SlotGrant | None, version: int) -> bool:
        """Sleep until emulated time t; a slot holder sends a TRAINING heartbeat
        every third of its lease (real seconds), so the slot lasts as long as
        the work, however slow the device."""
        if grant is None or grant.lease_s <= 0:
            return self.clock.sleep_until(t)
        step = grant.lease_s / 3 / self.clock.time_scale
        while True:
            now = self.clock.now()
            if now + step >= t:
                return self.clock.sleep_until(t)
            if not self.clock.sleep_until(now + step):
                return False
            try:
                self.client.heartbeat(ClientState.TRAINING, base_version=version)
            except TributaryError as error:  # one lost heartbeat: the next one renews the lease
                logger.info("device %d: heartbeat: %s", self.report.index, error, extra=self.client.log_context(version))

    def _abandon(self, until: float, grant: SlotGrant | None, version: int, spent_j: float) -> None:
        """A dropout or going offline at emulated time `until`: the energy used
        so far is spent; a held slot is left to lapse (the device is gone), and
        the device stays away until it has."""
        self._sleep_working(until, grant, version)
        self._spend(until, spent_j)
        if grant is not None and grant.lease_s > 0:
            self.clock.stop.wait(grant.lease_s)

    def _spend(self, t: float, joules: float) -> None:
        report = self.report
        report.energy_j += joules
        if not self.charging.is_on(t):
            report.battery_level = max(0.0, self._battery(t) - joules / self.profile.battery_capacity_j)
        else:
            self._battery(t)

    def _one_round(self, grant: SlotGrant | None) -> int | None:
        """One round; the base version it pushed on, or None if it did not push."""
        report, p = self.report, self.profile
        started = self.clock.now()
        report.rounds_started += 1
        with self.gate:
            pulled = self.client.pull()
        cohort = None
        if self.secure:
            cohort = SecureRound(self.client)
            cohort.start()  # joins a cohort (holding the slot, if any); key setup overlaps the training
        with self.gate:
            delta, samples = self._train(pulled.tensors)
        compute_s = p.compute_s(samples)
        download_s = p.transfer_s(self.model_bytes, upload=False)
        upload_s = p.transfer_s(self.model_bytes, upload=True)
        finish = started + download_s + compute_s + upload_s
        download_j = WIFI_2009.transfer(self.model_bytes)
        if self.rng.random() < p.dropout:
            report.dropouts += 1
            done = float(self.rng.random())
            self._abandon(started + download_s + compute_s * done, grant, pulled.version, download_j + p.power_w * compute_s * done)
            return None
        offline_at = self.online.next_change(started)
        if offline_at < finish:
            report.went_offline += 1
            done = min(1.0, max(0.0, (offline_at - started - download_s) / compute_s)) if compute_s > 0 else 0.0
            self._abandon(offline_at, grant, pulled.version, download_j + p.power_w * compute_s * done)
            return None
        if not self._sleep_working(finish, grant, pulled.version):
            return None
        energy = estimate_update_energy(
            p.power_w, compute_s, upload_bytes=self.model_bytes, download_bytes=self.model_bytes, radio=WIFI_2009
        )
        self._spend(finish, energy)
        try:
            if cohort is not None:
                flat = np.concatenate([delta[name].reshape(-1) for name in self.names])
                receipt = cohort.submit(pulled.version, flat, samples, energy_joules=energy)
                report.staleness.append(receipt.staleness)
            else:
                with self.gate:
                    result = self.client.push(pulled.version, delta, num_samples=samples, energy_joules=energy)
                report.staleness.append(result.staleness)
                report.uploads.append((round(self.clock.now(), 3), result.payload_bytes))
        except (NotAcceptedNow, CohortAborted) as error:
            report.updates_refused += 1
            logger.info("device %d: update refused: %s", report.index, error, extra=self.client.log_context(pulled.version))
        else:
            report.updates_accepted += 1
            report.energy_reported_j += energy
            report.accepted.append((pulled.version, energy))
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
