"""Progress bars of the long-running commands (rich): `tributary simulate`
(emulated time of the run) and `tributary client` (the SDK's fit loop).

Every bar is disabled when its console is not a terminal (piped, redirected,
a CI log): nothing but the commands' own lines goes there. While a bar is live
rich redirects stdout and stderr through its console, so log lines (written to
the current sys.stderr, see tributary/_logging.py) print above the bar.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from client_sdk import FitProgress

TICK_S = 0.25


def _progress(console: Console, *columns: TextColumn | BarColumn | TimeRemainingColumn) -> Progress:
    return Progress(*columns, console=console, disable=not console.is_terminal, transient=False)


class SimulationBar:
    """The emulated seconds of a run out of its duration, the model version,
    its latest test accuracy and the real time left. `point(...)` takes each
    evaluation; a ticker thread moves the bar with the emulated clock between them."""

    def __init__(self, console: Console, duration_s: float, time_scale: float) -> None:
        self._duration_s = duration_s
        self._time_scale = time_scale
        self._progress = _progress(
            console,
            TextColumn("[bold]simulating"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} emulated s"),
            TextColumn("version {task.fields[version]}"),
            TextColumn("accuracy {task.fields[accuracy]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self._task = self._progress.add_task("run", total=duration_s, version="-", accuracy="-", start=False)
        self._started_at: float | None = None
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="simulate-progress", daemon=True)

    def point(self, emulated_s: float, version: int, accuracy: float) -> None:
        if self._started_at is None:
            self._started_at = time.monotonic() - emulated_s * self._time_scale
            self._progress.start_task(self._task)
        self._progress.update(self._task, completed=min(self._duration_s, emulated_s), version=version, accuracy=f"{accuracy:.1%}")

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            if self._started_at is not None:
                emulated = (time.monotonic() - self._started_at) / self._time_scale
                self._progress.update(self._task, completed=min(self._duration_s, emulated))

    def __enter__(self) -> SimulationBar:
        self._progress.start()
        if not self._progress.disable:
            self._ticker.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join()
        self._progress.stop()


class FitBar:
    """A client's fit loop: updates accepted out of those planned (or seconds
    out of the duration), the model version, the last local loss, the time left.
    Pass it as `fit(..., progress=bar)`."""

    def __init__(self, console: Console, updates: int | None, duration_s: float | None) -> None:
        by_updates = updates is not None
        self._by_updates = by_updates
        self._progress = _progress(
            console,
            TextColumn("[bold]{task.fields[state]:<9}"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} updates" if by_updates else "{task.completed:.0f}/{task.total:.0f} s"),
            TextColumn("version {task.fields[version]}"),
            TextColumn("{task.fields[metrics]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        total = float(updates) if updates is not None else float(duration_s or 0.0)
        self._task: TaskID = self._progress.add_task("fit", total=total, state="starting", version="-", metrics="")

    def __call__(self, report: FitProgress) -> None:
        metrics = " ".join(f"{name} {value:.4g}" for name, value in report.metrics.items())
        completed = report.updates_accepted if self._by_updates else min(report.elapsed_s, report.duration_s or 0.0)
        self._progress.update(self._task, completed=completed, state=report.state, version=report.version, metrics=metrics)

    @contextmanager
    def shown(self) -> Iterator[FitBar]:
        with self._progress:
            yield self
