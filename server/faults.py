"""Crash points, for the crash-recovery tests: the process kills itself with
SIGKILL the n-th time it reaches a named point, so a test can stop the server
exactly mid-upload, between logging an update and applying it, half way
through writing a checkpoint, or in a given secure-aggregation phase, which
no outside timer can hit reliably.

Off unless the environment variable TRIBUTARY_CRASH_AT is set when the server
starts, to "point:n" (e.g. "checkpoint.written:2"); then each `point()` call is
one dictionary lookup. Points: push.receiving, push.logged, aggregate.mid,
push.acking, checkpoint.written, checkpoint.renamed, secagg.joined,
secagg.advertise, secagg.share, secagg.upload, secagg.unmask, secagg.logged.
"""

from __future__ import annotations

import os
import signal
import threading

CRASH_AT_VARIABLE = "TRIBUTARY_CRASH_AT"


def _parse(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    name, _, count = value.partition(":")
    if not name or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{CRASH_AT_VARIABLE} must be 'point:n' with n >= 1, got {value!r}")
    return name, int(count)


_PLAN = _parse(os.environ.get(CRASH_AT_VARIABLE))
_reached = 0
_lock = threading.Lock()


def point(name: str) -> None:
    """SIGKILL this process if the plan says `name` is reached for the n-th time now."""
    global _reached
    if _PLAN is None or _PLAN[0] != name:
        return
    with _lock:
        _reached += 1
        if _reached == _PLAN[1]:
            os.kill(os.getpid(), signal.SIGKILL)
