"""Starting a local Ray instance again when Ray's fixed 30 s node start-up
wait runs out; any other failure, or a cluster address, is not retried."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from edge.simulate.backends import LOCAL_RAY_START_ATTEMPTS, _init_ray

TIMED_OUT = Exception("The current node timed out during startup. This could happen because some of the raylet failed to startup")


class RayStandIn:
    """Records what `_init_ray` asks of Ray; `init` raises the given failures in turn."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls: list[str] = []

    def init(self, **options: Any) -> None:
        self.calls.append("init")
        if self.failures:
            raise self.failures.pop(0)

    def shutdown(self) -> None:
        self.calls.append("shutdown")


def test_a_local_start_that_timed_out_is_tried_again() -> None:
    ray = RayStandIn(TIMED_OUT)
    _init_ray(ray, {"address": None, "num_cpus": 2})
    assert ray.calls == ["init", "shutdown", "init"]


def test_it_gives_up_after_the_last_attempt() -> None:
    ray = RayStandIn(*[TIMED_OUT] * LOCAL_RAY_START_ATTEMPTS)
    with pytest.raises(Exception, match="timed out during startup"):
        _init_ray(ray, {"address": None})
    assert ray.calls.count("init") == LOCAL_RAY_START_ATTEMPTS


@pytest.mark.parametrize(
    ("options", "failure"),
    [({"address": None}, ValueError("bad num_cpus")), ({"address": "auto"}, TIMED_OUT)],
)
def test_other_failures_and_clusters_are_not_retried(options: dict[str, Any], failure: Exception) -> None:
    ray = RayStandIn(failure)
    with pytest.raises(type(failure)):
        _init_ray(ray, options)
    assert ray.calls == ["init"]


class LeakyRayStandIn(RayStandIn):
    """Shuts down as Ray does after a node failed to start: its processes are
    killed but not waited for, and their Popen objects dropped while running."""

    def shutdown(self) -> None:
        super().shutdown()
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
        del process  # "subprocess N is still running": a ResourceWarning, an error under filterwarnings=error


def test_the_processes_a_failed_start_leaves_behind_do_not_surface_as_errors_elsewhere() -> None:
    ray = LeakyRayStandIn(TIMED_OUT)
    _init_ray(ray, {"address": None})
    assert ray.calls == ["init", "shutdown", "init"]
