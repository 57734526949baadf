"""Where device groups run: `local` worker processes on this machine, or
`ray` actors on a Ray cluster (a local one by default).

A backend takes the group specs and returns their reports once the run is
over; the devices of a group share one process and one gRPC channel. Both run
the same `edge.simulate.worker.DeviceGroup`, so there is one
emulator, whatever the backend.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import time
import warnings
from multiprocessing.connection import Connection
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from edge.simulate.worker import JOIN_GRACE_S, DeviceGroup, GroupReport, GroupSpec

logger = logging.getLogger("tributary.simulate")

BACKENDS = ("local", "ray")
START_MARGIN_S = 0.5
"""Real seconds between the last group being ready and the clock starting."""


class Backend(Protocol):
    name: str

    def run_groups(self, specs: Sequence[GroupSpec], on_start: Callable[[float], None]) -> list[GroupReport]:
        """Build every group, then start their clocks together at a time.time()
        it passes to `on_start`, and run them to the end; their reports, in order."""
        ...


class LocalBackend:
    """One spawned process per group. Spawned, not forked: the parent runs the
    gRPC server's threads, which a fork would copy in whatever state they are in.
    Each process builds its group and says so; once all have, the clock starts."""

    name = "local"

    def __init__(self, ready_timeout_s: float = 300.0, process_setup: Callable[[], Any] | None = None) -> None:
        self.ready_timeout_s = ready_timeout_s
        self.process_setup = process_setup
        """Called first in each worker process (picklable; e.g. the CLI's logging setup)."""

    def run_groups(self, specs: Sequence[GroupSpec], on_start: Callable[[float], None]) -> list[GroupReport]:
        context = multiprocessing.get_context("spawn")
        pipes, processes = [], []
        for spec in specs:
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_local_group, args=(spec, theirs, self.process_setup), name=f"simulate-group-{spec.group}", daemon=True
            )
            process.start()
            theirs.close()
            pipes.append(ours)
            processes.append(process)
        try:
            for spec, pipe in zip(specs, pipes, strict=True):
                _expect(pipe, "ready", spec, self.ready_timeout_s)
            start_wall = time.time() + START_MARGIN_S
            on_start(start_wall)
            for pipe in pipes:
                pipe.send(start_wall)
            run_s = specs[0].experiment.run.real_duration_s + START_MARGIN_S + JOIN_GRACE_S + 60
            return [_expect(pipe, "report", spec, run_s) for spec, pipe in zip(specs, pipes, strict=True)]
        finally:
            for process in processes:
                process.join(timeout=10)
                if process.is_alive():
                    process.terminate()
                    process.join()


def _local_group(spec: GroupSpec, pipe: Connection, process_setup: Callable[[], Any] | None = None) -> None:
    try:
        if process_setup is not None:
            process_setup()
        group = DeviceGroup(spec)
        pipe.send(("ready", None))
        start_wall = pipe.recv()
        pipe.send(("report", group.run(start_wall)))
    except BaseException as error:  # the parent raises it, with the group named
        pipe.send(("error", f"{type(error).__name__}: {error}"))
        raise


def _expect(pipe: Connection, what: str, spec: GroupSpec, timeout_s: float) -> Any:
    if not pipe.poll(timeout_s):
        raise RuntimeError(f"device group {spec.group} sent no {what} within {timeout_s:.0f}s")
    try:
        kind, value = pipe.recv()
    except EOFError:
        raise RuntimeError(f"device group {spec.group}'s process died before its {what}") from None
    if kind == "error":
        raise RuntimeError(f"device group {spec.group} failed: {value}")
    return value


class RayBackend:
    """Each group is a Ray actor. `address=None` starts a local Ray instance
    with `num_cpus` CPUs, which is how the tests run it; `address="auto"`
    joins a running cluster. The server must be reachable from the actors: on
    several machines, give the server a routable address."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus

    def run_groups(self, specs: Sequence[GroupSpec], on_start: Callable[[float], None]) -> list[GroupReport]:
        try:
            import ray
        except ImportError as error:
            raise RuntimeError("the ray backend needs Ray: pip install 'tributary[ray]'") from error
        started_here = not ray.is_initialized()
        if started_here:
            options: dict[str, Any] = {"address": self.address, "include_dashboard": False, "log_to_driver": False}
            if self.address is None:
                options["num_cpus"] = self.num_cpus or 2
            _init_ray(ray, options)
        try:
            # a fraction of a CPU each: the devices mostly sleep, and a small cluster still fits every group
            group: Any = ray.remote(num_cpus=0.1)(_RayDeviceGroup)
            actors: list[Any] = [group.remote(spec) for spec in specs]
            ray.get([actor.ready.remote() for actor in actors])
            start_wall = time.time() + START_MARGIN_S
            on_start(start_wall)
            reports: list[GroupReport] = ray.get([actor.run.remote(start_wall) for actor in actors])
            for actor in actors:
                ray.kill(actor)
            return reports
        finally:
            if started_here:
                _shutdown_ray(ray)


LOCAL_RAY_START_ATTEMPTS = 3


def _init_ray(ray: Any, options: dict[str, Any]) -> None:
    """`ray.init`, tried again when a local instance does not come up: Ray
    gives its node a fixed 30 s to register, which a loaded machine (CI on 2
    shared cores) can miss once; it then raises a bare Exception."""
    for attempt in range(1, LOCAL_RAY_START_ATTEMPTS + 1):
        try:
            ray.init(**options)
            return
        except Exception as error:
            if options.get("address") is not None or "timed out during startup" not in str(error) or attempt == LOCAL_RAY_START_ATTEMPTS:
                raise
            logger.warning("the local Ray instance did not start (attempt %d of %d): %s; starting it again", attempt, LOCAL_RAY_START_ATTEMPTS, error)
            _shutdown_ray(ray)


def _shutdown_ray(ray: Any) -> None:
    """`ray.shutdown`, knowing that Ray kills the processes of a node that failed
    to start without waiting for them: the Popen objects it drops would warn
    "subprocess N is still running", an error under this project's warnings
    policy that surfaces in whatever runs next. Those processes are Ray's, and
    killed; their objects are let go here, quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        ray.shutdown()
        gc.collect()  # drop what a reference cycle still holds while the filter is on


class _RayDeviceGroup:
    def __init__(self, spec: GroupSpec) -> None:
        self._group = DeviceGroup(spec)

    def ready(self) -> bool:
        return True

    def run(self, start_wall: float) -> GroupReport:
        return self._group.run(start_wall)


def make_backend(name: str, **options: Any) -> Backend:
    if name == "local":
        return LocalBackend()
    if name == "ray":
        return RayBackend(**options)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
