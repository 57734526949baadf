"""The fleet emulator: many emulated devices (profiles from `edge.profiles`)
against a real Tributary server over gRPC.

    experiment = Experiment.from_toml(Path("examples/simulate/digits-fedbuff.toml"))
    result = simulate(experiment, address, job_id, LocalBackend(), watch)

`tributary simulate CONFIG.toml` starts the server and does the rest.
"""

from edge.simulate.backends import BACKENDS, Backend, LocalBackend, RayBackend, make_backend
from edge.simulate.config import Experiment, SimulationConfigError
from edge.simulate.runner import Point, SimulationResult, initial_model, simulate
from edge.simulate.worker import DeviceGroup, GroupReport, GroupSpec, run_device_group

__all__ = [
    "BACKENDS",
    "Backend",
    "DeviceGroup",
    "Experiment",
    "GroupReport",
    "GroupSpec",
    "LocalBackend",
    "Point",
    "RayBackend",
    "SimulationConfigError",
    "SimulationResult",
    "initial_model",
    "make_backend",
    "run_device_group",
    "simulate",
]
