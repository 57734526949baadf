"""Where device groups run: `local` worker processes on this machine, or
`ray` actors on a Ray cluster (a local one by default).

A backend takes the group specs and returns their reports once the run is
over; the devices of a group share one process and one gRPC channel. Both run
the same function (`edge.simulate.worker.run_device_group`), so there is one
emulator, whatever the backend.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from typing import Any, Protocol

from edge.simulate.worker import GroupReport, GroupSpec, run_device_group

BACKENDS = ("local", "ray")


class Backend(Protocol):
    name: str

    def run_groups(self, specs: Sequence[GroupSpec]) -> list[GroupReport]:
        """Run every group to the end of the run; their reports, in order."""
        ...


class LocalBackend:
    """One spawned process per group. Spawned, not forked: the parent runs the
    gRPC server's threads, which a fork would copy in whatever state they are in."""

    name = "local"

    def run_groups(self, specs: Sequence[GroupSpec]) -> list[GroupReport]:
        context = multiprocessing.get_context("spawn")
        with context.Pool(processes=len(specs)) as pool:
            return pool.map(run_device_group, specs, chunksize=1)


class RayBackend:
    """Each group is a Ray actor (one per CPU it asks for). `address=None`
    starts a local Ray instance with `num_cpus` CPUs, which is also how the
    tests run it; `address="auto"` joins a running cluster. The server must be
    reachable from the actors: on several machines, pass its routable address."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus

    def run_groups(self, specs: Sequence[GroupSpec]) -> list[GroupReport]:
        try:
            import ray
        except ImportError as error:
            raise RuntimeError("the ray backend needs Ray: pip install 'tributary[ray]'") from error
        started_here = not ray.is_initialized()
        if started_here:
            options: dict[str, Any] = {"address": self.address, "include_dashboard": False, "log_to_driver": False}
            if self.address is None:
                options["num_cpus"] = self.num_cpus or len(specs)
            ray.init(**options)
        try:
            group = ray.remote(num_cpus=0.5)(_RayDeviceGroup)
            actors = [group.remote() for _ in specs]
            reports: list[GroupReport] = ray.get([actor.run.remote(spec) for actor, spec in zip(actors, specs, strict=True)])
            for actor in actors:
                ray.kill(actor)
            return reports
        finally:
            if started_here:
                ray.shutdown()


class _RayDeviceGroup:
    def run(self, spec: GroupSpec) -> GroupReport:
        return run_device_group(spec)


def make_backend(name: str, **options: Any) -> Backend:
    if name == "local":
        return LocalBackend()
    if name == "ray":
        return RayBackend(**options)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
