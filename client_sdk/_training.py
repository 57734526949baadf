"""The high-level loop for a PyTorch model: pull -> train locally -> push delta.

torch is imported here only, so apps that use the low-level numpy API never
need it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from client_sdk._client import Client, ClientState, JobDescription, PulledModel, PushResult
from client_sdk._device import DeviceState, EligibilityPolicy, Ineligible, SlotGrant
from client_sdk._compression import Compression
from client_sdk._errors import CohortAborted, ModelMismatch, NotAcceptedNow
from client_sdk._presence import Presence

logger = logging.getLogger("tributary.client")

if TYPE_CHECKING:
    import torch

TrainResult = int | tuple[int, Mapping[str, float]]
TrainFn = Callable[["torch.nn.Module", "torch.device"], TrainResult]
"""Trains the model in place for one local round; returns the number of
examples used, or (that number, local metrics such as {"loss": 0.31}) for
`fit`'s progress reports."""

SYNC_WAIT_S = 30.0
MAINS_POWERED = DeviceState(battery_level=None, charging=True, idle=True, unmetered=True)
"""What a training-slot request reports when the app gives no device_state."""
EnergyEstimate = Callable[[float, int], float]
"""(seconds of local training, bytes of the update) -> joules (e.g. edge.energy.EnergyModel)."""
EvaluateFn = Callable[["torch.nn.Module"], tuple[int, Mapping[str, float]]]
"""Evaluates the model (loaded with a pulled version, in eval mode, under
torch.no_grad) on the app's own held-out data; returns (examples evaluated,
metrics such as {"accuracy": 0.91, "loss": 0.3}) for federated evaluation."""


def pick_device(preferred: str | None = None) -> torch.device:
    """`preferred`, else $TRIBUTARY_DEVICE, else cuda, then mps, then cpu."""
    import torch

    choice = preferred or os.environ.get("TRIBUTARY_DEVICE")
    if choice:
        try:
            device = torch.device(choice)
        except RuntimeError as error:
            raise ValueError(f"device {choice!r} is not a torch device (try cuda, cuda:1, mps or cpu)") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {choice!r} was asked for but torch sees no CUDA device")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {choice!r} was asked for but torch sees {torch.cuda.device_count()} CUDA device(s)")
        mps = getattr(torch.backends, "mps", None)
        if device.type == "mps" and not (mps is not None and mps.is_available()):
            raise ValueError(f"device {choice!r} was asked for but this machine has no usable MPS device")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_into(model: torch.nn.Module, tensors: dict[str, np.ndarray]) -> None:
    """Copy pulled tensors into the model's parameters and buffers (in place,
    on whatever device the model is on). Tensors the job does not aggregate
    (integer buffers) keep their local values."""
    import torch

    state = model.state_dict()
    missing = [name for name in tensors if name not in state]
    if missing:
        raise ModelMismatch(f"the job's model has tensors {missing} that this model lacks")
    with torch.no_grad():
        for name, array in tensors.items():
            target = state[name]
            if tuple(target.shape) != array.shape:
                raise ModelMismatch(f"tensor {name!r}: job has shape {list(array.shape)}, model has {list(target.shape)}")
            target.copy_(torch.from_numpy(np.ascontiguousarray(array)))


def model_arrays(model: torch.nn.Module, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Floating-point tensors of `model.state_dict()` as numpy arrays (copies)."""
    state = model.state_dict()
    names = names if names is not None else [n for n, t in state.items() if t.is_floating_point()]
    return {name: state[name].detach().to("cpu").numpy().copy() for name in names}


@dataclass(frozen=True)
class FitProgress:
    """Where `fit` stands, passed to its `progress` callback at the start, when
    local training starts, and after each update is answered."""

    updates_accepted: int
    updates_refused: int
    updates_planned: int | None
    """`fit(updates=...)`; None when it runs for a duration."""
    elapsed_s: float
    duration_s: float | None
    version: int
    """The model version the client trains on (or trained on last)."""
    state: str
    """"starting", "training", "uploading", "waiting" (for eligibility or a slot), or "done"."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    """The last local round's metrics from train_fn (e.g. loss); empty when it reports none."""

    @property
    def fraction(self) -> float | None:
        """How far fit is toward its stop (the nearer of updates and duration), in [0, 1]."""
        parts = []
        if self.updates_planned:
            parts.append(self.updates_accepted / self.updates_planned)
        if self.duration_s:
            parts.append(self.elapsed_s / self.duration_s)
        return min(1.0, max(parts)) if parts else None


ProgressFn = Callable[[FitProgress], Any]


@dataclass
class FitSummary:
    updates_pushed: int = 0
    updates_refused: int = 0
    last_version: int = 0
    staleness: list[int] = field(default_factory=list)
    seconds: float = 0.0
    energy_joules: float = 0.0
    """Energy reported with the accepted pushes."""
    waited_s: float = 0.0
    """Time spent waiting for the device to become eligible or for a training slot."""
    stop_reason: str = ""
    """Why fit returned: "updates", "duration" or "waited max_wait_s"."""
    evaluations_reported: int = 0
    """Federated evaluations (evaluate_fn) the server took."""


def fit(
    client: Client,
    model: torch.nn.Module,
    train_fn: TrainFn,
    *,
    updates: int | None = None,
    duration_s: float | None = None,
    device: str | None = None,
    on_push: Callable[[PushResult], Any] | None = None,
    device_state: Callable[[], DeviceState] | None = None,
    policy: EligibilityPolicy | None = None,
    energy_estimate: EnergyEstimate | None = None,
    poll_s: float = 5.0,
    max_wait_s: float | None = None,
    compression: Compression | None = None,
    progress: ProgressFn | None = None,
    evaluate_fn: EvaluateFn | None = None,
    evaluate_every: int = 1,
) -> FitSummary:
    """Loop pull -> `train_fn(model, device)` -> push delta until `updates`
    pushes were accepted or `duration_s` passed (at least one must be given).

    Before each local round, `device_state()` is read and checked against
    `policy`; while the policy refuses, fit does not train: it logs the reason,
    reports the state in its heartbeats (idle) and asks again every `poll_s`.
    On a job with training slots it then asks the server for one, waiting as
    the server says while none is free. Waiting counts toward `duration_s`;
    `max_wait_s` bounds one wait (fit then returns, `stop_reason` says so).
    `energy_estimate(train_seconds, update_bytes)` gives the joules each
    push reports.

    An update the server refuses as too stale (or, in synchronous rounds,
    arriving after its round closed, or under secure aggregation, in a cohort
    that aborted) is dropped and training restarts from the current model;
    other errors propagate. Under secure aggregation each update goes through
    a cohort, whose key setup overlaps the local training.

    While it runs, heartbeats tell the server what the client is doing
    (training, uploading, idle; see client_sdk/_presence.py). They are best
    effort: a failed heartbeat never stops or slows training.

    `compression` (see `Compression`) compresses every push; its top-k
    error-feedback residual is kept in `client` across updates. Under secure
    aggregation only quantization composes, and the job's cohorts decide it
    (a different `quantize_bits`, or any `top_k`, is a ValueError).

    `progress(FitProgress)` is told where the loop stands (see FitProgress),
    e.g. for a progress bar; fit itself shows nothing. A train_fn returning
    (num_samples, {"loss": ...}) puts its metrics in the reports.

    Federated evaluation: with `evaluate_fn`, the first pulled version and
    then every `evaluate_every`-th pull's version (each version at most once)
    is evaluated on the app's held-out data and reported to the server
    (`Client.report_evaluation`) before training on it. A report the server
    refuses as too old is logged and skipped; other errors propagate.
    """
    if updates is None and duration_s is None:
        raise ValueError("give `updates` or `duration_s`, or the loop would never end")
    if policy is not None and device_state is None:
        raise ValueError("a policy needs device_state, a function returning the device's DeviceState")
    if not poll_s > 0:
        raise ValueError(f"poll_s must be > 0 seconds, got {poll_s!r}")
    if max_wait_s is not None and not max_wait_s >= 0:
        raise ValueError(f"max_wait_s must be >= 0 seconds, got {max_wait_s!r}")
    if isinstance(evaluate_every, bool) or not isinstance(evaluate_every, int) or evaluate_every < 1:
        raise ValueError(f"evaluate_every must be an int >= 1 (pulls between evaluations), got {evaluate_every!r}")
    evaluation = _Evaluation(client, model, evaluate_fn, evaluate_every) if evaluate_fn is not None else None
    gate = _Gate(client, device_state, policy, poll_s, max_wait_s)
    with Presence(client) as presence:
        return _fit(client, model, train_fn, presence, updates, duration_s, device, on_push, gate, energy_estimate, compression, progress, evaluation)


def _fit(
    client: Client,
    model: torch.nn.Module,
    train_fn: TrainFn,
    presence: Presence,
    updates: int | None,
    duration_s: float | None,
    device: str | None,
    on_push: Callable[[PushResult], Any] | None,
    gate: _Gate,
    energy_estimate: EnergyEstimate | None,
    compression: Compression | None,
    progress: ProgressFn | None,
    evaluation: _Evaluation | None = None,
) -> FitSummary:
    start = time.monotonic()
    summary = FitSummary()
    metrics: Mapping[str, float] = {}

    def report(state: str) -> None:
        if progress is not None:
            elapsed = time.monotonic() - start
            progress(FitProgress(summary.updates_pushed, summary.updates_refused, updates, elapsed, duration_s, summary.last_version, state, metrics))
    job = client.job_info()
    if compression is not None:
        _check_compression(compression, job)  # before anything is trained
    torch_device = pick_device(device)
    model.to(torch_device)
    plain_compression = None if job.secure_aggregation else compression
    names = [spec.name for spec in job.specs]
    pulled: PulledModel = client.pull()

    def pulled_now(model_pulled: PulledModel) -> PulledModel:
        summary.last_version = model_pulled.version
        if evaluation is not None and evaluation.after_pull(model_pulled):
            summary.evaluations_reported += 1
        return model_pulled

    def done() -> bool:
        if updates is not None and summary.updates_pushed >= updates:
            return True
        return duration_s is not None and time.monotonic() - start >= duration_s

    pulled_now(pulled)
    logger.info("client starts on version %d", pulled.version, extra=client.log_context(pulled.version))
    report("starting")
    while not done():
        waited_from = time.monotonic()
        ready = gate.wait(job, presence, pulled.version, done)
        summary.waited_s += time.monotonic() - waited_from
        if isinstance(ready, str):
            summary.stop_reason = ready
            break
        if ready is not None and ready.version != pulled.version:
            pulled = pulled_now(client.pull())  # the slot is for the job's current version
        presence.set(ClientState.TRAINING, pulled.version)
        report("training")
        cohort = None
        if job.secure_aggregation:
            from client_sdk._secure import SecureRound

            cohort = SecureRound(client)
            cohort.start()  # joins a cohort; its key setup runs while we train
        load_into(model, pulled.tensors)
        model.train()
        trained_from = time.perf_counter()
        trained_result = train_fn(model, torch_device)
        if isinstance(trained_result, tuple):
            trained_result, metrics = trained_result
        num_samples = max(1, int(trained_result))
        train_s = time.perf_counter() - trained_from
        logger.debug(
            "trained locally on %d samples in %.2f s%s", num_samples, train_s,
            "".join(f", {name} {value:.4g}" for name, value in metrics.items()),
            extra=client.log_context(pulled.version),
        )  # fmt: skip
        trained = model_arrays(model, names)
        delta = {name: trained[name] - pulled.tensors[name] for name in names}
        energy = 0.0
        if energy_estimate is not None:
            energy = float(energy_estimate(train_s, sum(array.nbytes for array in delta.values())))
        presence.set(ClientState.UPLOADING, pulled.version)
        report("uploading")
        try:
            if cohort is not None:
                flat = np.concatenate([delta[name].reshape(-1) for name in names])
                receipt = cohort.submit(pulled.version, flat, num_samples, energy)
                summary.staleness.append(receipt.staleness)
            else:
                result = client.push(pulled.version, delta, num_samples=num_samples, energy_joules=energy, compression=plain_compression)
                summary.staleness.append(result.staleness)
                if on_push is not None:
                    on_push(result)
        except (NotAcceptedNow, CohortAborted) as error:
            summary.updates_refused += 1
            logger.info("update refused, training again on a newer model: %s", error, extra=client.log_context(pulled.version))
        else:
            summary.updates_pushed += 1
            summary.energy_joules += energy
        presence.set(ClientState.IDLE, pulled.version)
        report("idle")
        if done():
            break
        pulled = pulled_now(_next_model(client, pulled.version, job.synchronous, done))
    if not summary.stop_reason:
        summary.stop_reason = "updates" if updates is not None and summary.updates_pushed >= updates else "duration"
    summary.seconds = time.monotonic() - start
    logger.info(
        "client stops (%s): %d updates accepted, %d refused, in %.1f s", summary.stop_reason, summary.updates_pushed, summary.updates_refused,
        summary.seconds, extra=client.log_context(summary.last_version),
    )  # fmt: skip
    report("done")
    return summary


class _Evaluation:
    """Federated evaluation in `fit`: which pulls to evaluate, and the report."""

    def __init__(self, client: Client, model: torch.nn.Module, evaluate_fn: EvaluateFn, every: int) -> None:
        self.client, self.model, self.evaluate_fn, self.every = client, model, evaluate_fn, every
        self.pulls = 0
        self.last_version: int | None = None

    def after_pull(self, pulled: PulledModel) -> bool:
        """Evaluate and report `pulled` if it is due; True when the server took the report."""
        due = self.pulls % self.every == 0
        self.pulls += 1
        if not due or pulled.version == self.last_version:
            return False
        import torch

        self.last_version = pulled.version
        load_into(self.model, pulled.tensors)
        self.model.eval()
        with torch.no_grad():
            num_examples, metrics = self.evaluate_fn(self.model)
        try:
            receipt = self.client.report_evaluation(pulled.version, metrics, int(num_examples))
        except NotAcceptedNow as error:
            logger.info("evaluation of version %d refused: %s", pulled.version, error, extra=self.client.log_context(pulled.version))
            return False
        logger.debug(
            "evaluated version %d on %d example(s): %s", pulled.version, num_examples,
            ", ".join(f"{name} {value:.4g}" for name, value in metrics.items()), extra=self.client.log_context(pulled.version),
        )  # fmt: skip
        return not receipt.duplicate


class _Gate:
    """Holds training back until the device may train (the app's policy, on
    the device) and, on a job with training slots, the server granted one."""

    def __init__(
        self,
        client: Client,
        device_state: Callable[[], DeviceState] | None,
        policy: EligibilityPolicy | None,
        poll_s: float,
        max_wait_s: float | None,
    ) -> None:
        self._client = client
        self._device_state = device_state
        self._policy = policy
        self._poll_s = poll_s
        self._max_wait_s = max_wait_s

    def wait(self, job: JobDescription, presence: Presence, version: int, done: Callable[[], bool]) -> SlotGrant | None | str:
        """The slot granted (None when the job has none), or why fit must stop."""
        started = time.monotonic()
        told = ""
        while True:
            state = self._device_state() if self._device_state is not None else None
            if state is not None and not isinstance(state, DeviceState):
                raise TypeError(f"device_state() must return a DeviceState, got {state!r}")
            reason, delay = "", self._poll_s
            decision = self._policy.check(state) if self._policy is not None and state is not None else None
            if isinstance(decision, Ineligible):
                reason = f"device not eligible to train: {decision.reason}"
            elif job.max_concurrent_trainers is None:
                return None
            else:
                grant = self._client.acquire_training_slot(state or MAINS_POWERED)
                if grant.granted:
                    return grant
                reason, delay = f"no training slot: {grant.reason}", max(grant.retry_after_s, 0.01)
            if reason != told:  # once per change, not once per poll
                logger.info("client %s waits to train: %s", self._client.client_id, reason, extra=self._client.log_context(version))
                told = reason
            presence.set(ClientState.IDLE, version, state)
            waited = time.monotonic() - started
            if done():
                return "duration"
            if self._max_wait_s is not None and waited >= self._max_wait_s:
                logger.info(
                    "client %s stops: waited %.1f s (max_wait_s) to train: %s", self._client.client_id, waited, reason,
                    extra=self._client.log_context(version),
                )  # fmt: skip
                return "waited max_wait_s"
            if self._max_wait_s is not None:
                delay = min(delay, self._max_wait_s - waited)
            time.sleep(max(0.0, delay))
def _check_compression(compression: Compression, job: JobDescription) -> None:
    """Refuse before training what the job would refuse after it."""
    if job.secure_aggregation:
        compression.check_secure(job.job_id, job.secure_quantize_bits or 0)
        return
    if compression.quantize_bits is not None and not job.accepts_quantized:
        raise ValueError(f"job {job.job_id!r} does not take quantized updates (its accept_compression setting); drop quantize_bits")
    if compression.top_k is not None and not job.accepts_top_k:
        raise ValueError(f"job {job.job_id!r} does not take top-k sparsified updates (its accept_compression setting); drop top_k")


def _next_model(client: Client, version: int, synchronous: bool, done: Callable[[], bool]) -> PulledModel:
    """The model to train on next. In synchronous rounds that is the next
    version: training again on a round already pushed to would be refused."""
    if not synchronous:
        return client.pull()
    while True:
        pulled = client.pull(min_version=version + 1, wait_s=SYNC_WAIT_S)
        if pulled.version > version or done():
            return pulled
