"""Server-side evaluation: an optional evaluator per job, run per model version.

The evaluator is a plug-in named "module:function" in the job's config
(`evaluator`), because the server imports neither the tasks nor the SDK: any
callable `(tensors: Mapping[str, np.ndarray]) -> Mapping[str, float]` works,
e.g. `edge.tasks:digits_evaluator` (accuracy and loss on a held-out split).

It runs off the aggregation path: one background thread per job waits for a
new version, reads its immutable snapshot without the job's lock, evaluates
it and records (version, unix time, metrics) into `JobStats.evaluations` and
the state directory. When evaluating is slower than publishing, the thread
takes the newest version each time and skips those in between; pushes never
wait for it. An evaluator that raises is logged and counted, and the thread
goes on with the next version.

Loading is checked at start: a module that does not import, a name that is
not there or not callable, and (on a trial run against the job's current
model) an evaluator that raises or returns anything but a mapping of names to
finite numbers stop the server with a ConfigError naming the job and value.
That trial run is the first evaluation recorded.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from server.core import Job
from server.federated import PREFIX as FEDERATED_PREFIX
from server.errors import ConfigError, ServerError

Evaluator = Callable[[Mapping[str, np.ndarray]], Mapping[str, float]]
logger = logging.getLogger("tributary.server")

POLL_S = 0.5
"""How long the thread waits for a new version before it checks for shutdown."""


def load_evaluator(spec: str, job_id: str) -> Evaluator:
    """The callable "module:function" names; ConfigError naming the job and value otherwise."""
    module_name, _, attribute = spec.partition(":")
    where = f"job {job_id!r}: evaluator {spec!r}"
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # an import can fail in any way the module's code can
        raise ConfigError(f"{where}: cannot import module {module_name!r}: {type(error).__name__}: {error}") from error
    target: object = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{where}: module {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{where}: {attribute!r} is a {type(target).__name__}, not a function")
    evaluator: Evaluator = target
    return evaluator


class BadMetrics(ValueError):
    """An evaluator returned something other than a mapping of names to finite numbers."""


def checked_metrics(metrics: object) -> dict[str, float]:
    """The evaluator's answer as {name: float}; BadMetrics saying what is wrong otherwise."""
    if not isinstance(metrics, Mapping):
        raise BadMetrics(f"returned a {type(metrics).__name__}, not a mapping of metric names to numbers")
    checked: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise BadMetrics(f"returned a metric named {name!r}; names must be non-empty strings")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(float(value)):
            raise BadMetrics(f"returned {name}={value!r}; metrics must be finite numbers")
        if name.startswith(FEDERATED_PREFIX):  # those names hold the clients' reports of the same version
            raise BadMetrics(f"returned a metric named {name!r}; the {FEDERATED_PREFIX} prefix is reserved for federated evaluation")
        checked[name] = float(value)
    return checked


class EvaluationLoop:
    """Evaluates `job`'s newest version in a thread of its own (see the module docstring)."""

    def __init__(self, job: Job, evaluator: Evaluator, spec: str = "", *, every: int = 1) -> None:
        self.job = job
        self.evaluator = evaluator
        self.spec = spec or getattr(evaluator, "__name__", repr(evaluator))
        self.every = every
        self.failures = 0
        """Evaluations that raised or returned bad metrics (each logged)."""
        self.evaluated = 0
        """Evaluations recorded by this loop."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_version: int | None = job.last_server_evaluation()
        """The newest version evaluated (restored from the state directory too)."""

    def check(self) -> None:
        """The trial run at start, on the current version (recorded unless it
        was evaluated before a restart): ConfigError when the evaluator fails."""
        snapshot = self.job.snapshot()
        if self.last_version == snapshot.version:
            return
        try:
            metrics = checked_metrics(self.evaluator(snapshot.tensors))
        except Exception as error:  # the evaluator is the operator's code: anything may come out of it
            raise ConfigError(
                f"job {self.job.job_id!r}: evaluator {self.spec!r} failed on version {snapshot.version}: {type(error).__name__}: {error}"
            ) from error
        self._record(snapshot.version, metrics)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"tributary-eval-{self.job.job_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop after the evaluation in progress (if any) ends."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("job %r: evaluator %s still running at shutdown; its result will not be stored", self.job.job_id, self.spec)

    def _run(self) -> None:
        while not self._stop.is_set():
            due = 0 if self.last_version is None else self.last_version + self.every
            snapshot = self.job.wait_for_version(due, POLL_S)
            if snapshot.version < due:
                if self.job.closing:  # shutting down: waits return at once now
                    self._stop.wait(POLL_S)
                continue
            if self._stop.is_set():
                return
            self.evaluate(snapshot.version, snapshot.tensors)

    def evaluate(self, version: int, tensors: Mapping[str, np.ndarray]) -> bool:
        """Evaluate one version and record it; False (logged, counted) when the evaluator fails."""
        try:
            metrics = checked_metrics(self.evaluator(tensors))
        except Exception as error:  # keep serving whatever the evaluator does
            self.failures += 1
            self.last_version = version  # not retried: the next version is tried instead
            logger.error(
                "job %r: evaluator %s failed on version %d (%d failure(s) so far; the server keeps serving): %s: %s",
                self.job.job_id, self.spec, version, self.failures, type(error).__name__, error,
            )  # fmt: skip
            return False
        self._record(version, metrics)
        return True

    def _record(self, version: int, metrics: dict[str, float]) -> None:
        self.last_version = version
        try:
            self.job.record_evaluation(version, time.time(), metrics)
        except ServerError as error:  # the state directory refused the row; memory has it
            logger.error("job %r: the evaluation of version %d could not be stored: %s", self.job.job_id, version, error)
        self.evaluated += 1
