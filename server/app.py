"""Builds and runs the gRPC server for a ServerConfig.

Threads, not grpc.aio: on this project's 2-core reference machine a threaded
and an asyncio server moved the same client-streaming load at the same rate
(bench/throughput.py prints both raw rates), the aggregation core is
synchronous numpy code that would run in an executor under asyncio anyway,
and the threaded servicer keeps the gRPC layer a plain function per RPC.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from proto import tributary_pb2_grpc as pb_grpc
from server.cohorts import CohortManager
from server.config import ServerConfig
from server.core import AggregationCore
from proto.tensors import MAX_MESSAGE_BYTES
from server.errors import ConfigError
from server.limits import ServerLimits
from server.limits_interceptor import LimitsInterceptor
from server.models import load_model
from server.servicer import TributaryServicer

SERVICE_NAME = "tributary.v1.Tributary"


@dataclass(frozen=True)
class RunningServer:
    port: int
    address: str
    core: AggregationCore
    grpc_server: grpc.Server
    health: health.HealthServicer
    limits: ServerLimits


def load_initial_models(config: ServerConfig) -> dict[str, dict[str, np.ndarray]]:
    models = {}
    for job in config.jobs:
        if job.initial_model is None:
            raise ConfigError(f"job {job.job_id!r} needs an initial model (initial_model = path to .safetensors)")
        models[job.job_id] = load_model(job.initial_model)
    return models


@contextlib.contextmanager
def running_server(
    config: ServerConfig,
    initial_models: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    *,
    grace_s: float = 5.0,
    secagg_observer: Callable[[str, np.ndarray], None] | None = None,
) -> Iterator[RunningServer]:
    """Serve until the block exits; yields the port actually bound (port 0 in
    the address picks a free one)."""
    if initial_models is None:
        initial_models = load_initial_models(config)
    try:
        core = AggregationCore.from_config(config, initial_models)
    except (ValueError, KeyError) as error:
        raise ConfigError(str(error)) from error
    limits = ServerLimits.from_config(config)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="tributary-rpc"),
        interceptors=[LimitsInterceptor(limits)],
        # gRPC refuses a larger single message itself, with RESOURCE_EXHAUSTED
        # "Received message larger than max (N vs. M)"
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
    )
    cohorts = {
        job.job_id: CohortManager(core.job(job.job_id), job.secure_aggregation, secagg_observer)
        for job in config.jobs
        if job.secure_aggregation is not None
    }
    pb_grpc.add_TributaryServicer_to_server(TributaryServicer(core, cohorts, limits), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(config.address)
    except RuntimeError as error:
        raise ConfigError(f"cannot listen on {config.address}: {error}") from error
    if port == 0:
        raise ConfigError(f"cannot listen on {config.address}: address in use or not local")
    server.start()
    limits.watchdog.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    host = config.address.rpartition(":")[0]
    try:
        yield RunningServer(port, f"{host}:{port}", core, server, health_servicer, limits)
    finally:
        health_servicer.enter_graceful_shutdown()
        server.stop(grace_s).wait()
        limits.watchdog.stop()
