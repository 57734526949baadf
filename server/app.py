"""Builds and runs the gRPC server for a ServerConfig.

Threads, not grpc.aio: on this project's 2-core reference machine a threaded
and an asyncio server moved the same client-streaming load at the same rate
(bench/throughput.py prints both raw rates), the aggregation core is
synchronous numpy code that would run in an executor under asyncio anyway,
and the threaded servicer keeps the gRPC layer a plain function per RPC.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from proto import tributary_pb2_grpc as pb_grpc
from server.admin import AdminServicer
from server.auth import DB_FILE_NAME, AdminCredential, Authorizer, CallGate, ClientRegistry
from server.cohorts import CohortManager
from server.config import ServerConfig
from server.core import AggregationCore
from server.dashboard import job_snapshot, overview
from server.errors import ConfigError, StateError
from server.evaluation import EvaluationLoop, load_evaluator
from server.http import HttpEndpoint
from server.interceptors import AuthInterceptor, InFlight
from proto.tensors import MAX_MESSAGE_BYTES
from server.limits import ServerLimits
from server.limits_interceptor import LimitsInterceptor
from server.metrics import ServerMetrics
from server.models import load_model
from server.servicer import TributaryServicer
from server.store import StateStore
from server.uploads import PartialUploads

SERVICE_NAME = "tributary.v1.Tributary"
logger = logging.getLogger("tributary.server")


@dataclass(frozen=True)
class RunningServer:
    port: int
    address: str
    core: AggregationCore
    grpc_server: grpc.Server
    health: health.HealthServicer
    limits: ServerLimits
    tls: bool
    """Whether the server serves TLS (mutual TLS when its config names a client CA)."""
    metrics: ServerMetrics
    """This server's Prometheus metrics (`metrics.exposition()` renders a scrape)."""
    recovered: tuple[str, ...] = ()
    """Jobs whose state was recovered from the state directory."""
    registry: ClientRegistry | None = None
    """The enrolled clients, with auth on."""
    admin_token_file: Path | None = None
    """Where the admin token is, with auth on."""
    admin_token_generated: bool = False
    """True when this start generated it into <state_dir>/admin.token."""
    uploads: PartialUploads | None = None
    """Interrupted pushes kept for their clients to resume."""
    evaluations: Mapping[str, EvaluationLoop] = field(default_factory=dict)
    """The server-side evaluator of each job that has one, by job id."""
    http: HttpEndpoint | None = None
    """The HTTP endpoint (/metrics, the dashboard), with http_address set."""

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    @property
    def http_address(self) -> str | None:
        """host:port the HTTP endpoint listens on (the port bound, with port 0)."""
        return self.http.address if self.http is not None else None



def load_initial_models(config: ServerConfig) -> dict[str, dict[str, np.ndarray]]:
    models = {}
    for job in config.jobs:
        if job.initial_model is None:
            raise ConfigError(f"job {job.job_id!r} needs an initial model (initial_model = path to .safetensors)")
        models[job.job_id] = load_model(job.initial_model)
    return models


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls is None:
        return None
    material = config.tls.read()
    return grpc.ssl_server_credentials(
        [(material.private_key, material.certificate_chain)],
        root_certificates=material.client_ca,
        require_client_auth=material.client_ca is not None,
    )


@contextlib.contextmanager
def running_server(
    config: ServerConfig,
    initial_models: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    *,
    grace_s: float | None = None,
    secagg_observer: Callable[[str, np.ndarray], None] | None = None,
) -> Iterator[RunningServer]:
    """Serve until the block exits; yields the port actually bound (port 0 in
    the address picks a free one). With a state directory, jobs found there
    resume where they were (the initial models are then not used).

    Leaving the block shuts down gracefully: health turns NOT_SERVING, new RPCs
    are refused, clients waiting on a cohort or a round are released with a
    status saying so, in-flight pushes get `grace_s` (default: the config's
    grace_period_s) to finish, and the state is checkpointed."""
    # the TLS files are read first: a bad one stops the server before any other work
    credentials = _server_credentials(config)
    if initial_models is None:
        initial_models = load_initial_models(config)
    try:
        core = AggregationCore.from_config(config, initial_models)
    except (ValueError, KeyError) as error:
        raise ConfigError(str(error)) from error
    evaluators = {job.job_id: load_evaluator(job.evaluator, job.job_id) for job in config.jobs if job.evaluator is not None}
    store = None
    recovered: list[str] = []
    grace = config.grace_period_s if grace_s is None else grace_s
    with contextlib.ExitStack() as undo:  # what a start that fails part-way must release, newest first
        if config.state_dir is not None:
            try:
                store = StateStore(config.state_dir, config.retention)
                undo.callback(store.close)
                recovered = [job_id for job_id, job in core.jobs.items() if store.open_job(job)]
            except StateError as error:
                raise ConfigError(str(error)) from error
        evaluations = {
            job.job_id: EvaluationLoop(core.job(job.job_id), evaluators[job.job_id], job.evaluator or "", every=job.evaluate_every)
            for job in config.jobs
            if job.job_id in evaluators
        }
        for loop in evaluations.values():
            loop.check()  # a trial run on the current model, before any client can connect
        registry, admin, admin_generated = _open_auth(config) if config.auth else (None, None, False)
        limits = ServerLimits.from_config(config)
        in_flight = InFlight()
        # Auth first: a caller without a credential never takes a stream slot.
        auth = [AuthInterceptor(CallGate(registry, admin))] if registry is not None and admin is not None else []
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="tributary-rpc"),
            interceptors=[in_flight, *auth, LimitsInterceptor(limits)],
            # gRPC refuses a larger single message itself, with RESOURCE_EXHAUSTED
            # "Received message larger than max (N vs. M)"
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
        )
        undo.callback(server.stop, 0)
        cohorts = {
            job.job_id: CohortManager(core.job(job.job_id), job.secure_aggregation, secagg_observer)
            for job in config.jobs
            if job.secure_aggregation is not None
        }
        authorizer = Authorizer(registry) if registry is not None else None
        uploads = PartialUploads(config.resume_budget_bytes, config.resume_expiry_s)
        metrics = ServerMetrics(core, cohorts)
        pb_grpc.add_TributaryServicer_to_server(TributaryServicer(core, cohorts, authorizer, limits, uploads, metrics), server)
        if registry is not None:  # with auth off there is no admin credential, so no Admin service
            pb_grpc.add_AdminServicer_to_server(AdminServicer(core, registry), server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        try:
            if credentials is None:
                port = server.add_insecure_port(config.address)
            else:
                port = server.add_secure_port(config.address, credentials)
        except RuntimeError as error:
            port = 0
            reason = str(error)
        else:
            reason = "address in use or not local"
        if port == 0:
            raise ConfigError(f"cannot listen on {config.address}: {reason}")
        endpoint = None
        if config.http_address is not None:
            endpoint = HttpEndpoint(
                config.http_address,
                metrics=metrics.exposition,
                jobs=lambda: overview(core),
                job=lambda job_id: job_snapshot(core.job(job_id), cohorts.get(job_id)),
                admin=admin,
                tls_files=(str(config.tls.cert_file), str(config.tls.key_file)) if config.tls is not None else None,
            )
            endpoint.start()  # binds now: a taken port stops the start before anything serves
            undo.callback(endpoint.close)
        server.start()
        limits.watchdog.start()
        undo.callback(limits.watchdog.stop)
        for loop in evaluations.values():
            loop.start()
            undo.callback(loop.stop, timeout_s=grace)
        undo.pop_all()  # started: from here on the shutdown below releases it all
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    host = config.address.rpartition(":")[0]
    if credentials is None:
        logger.warning(
            "serving plaintext on %s:%d (insecure): models, updates and client ids travel unencrypted and "
            "clients are not authenticated; use TLS (--tls-cert, --tls-key) outside a trusted network",
            host,
            port,
        )
    logger.info("server started on %s:%d, jobs: %s", host, port, ", ".join(core.jobs))
    try:
        yield RunningServer(
            port, f"{host}:{port}", core, server, health_servicer, limits, tls=credentials is not None, metrics=metrics, recovered=tuple(recovered),
            registry=registry, admin_token_file=admin.source if admin else None, admin_token_generated=admin_generated,
            uploads=uploads, evaluations=evaluations, http=endpoint,
        )  # fmt: skip
    finally:
        if endpoint is not None:
            endpoint.close()
        for loop in evaluations.values():
            loop.stop(timeout_s=grace)
        in_flight.close()
        health_servicer.enter_graceful_shutdown()
        for manager in cohorts.values():
            manager.shut_down()
        for job in core.jobs.values():
            job.release_waiters()
        stopped = server.stop(grace)  # refuses new RPCs from now on
        if not in_flight.wait_idle(grace):
            logger.warning("the grace period of %gs ran out with calls in flight; cancelling them (their clients retry)", grace)
        server.stop(0)  # what is left cannot be work: health Watch streams
        stopped.wait()
        limits.watchdog.stop()
        if store is not None:
            store.close()
            logger.info("state written to %s", config.state_dir)
        logger.info("server on %s:%d stopped", host, port)


def _open_auth(config: ServerConfig) -> tuple[ClientRegistry, AdminCredential, bool]:
    """The client registry in the state directory, the admin credential, and
    whether the credential was generated by this start."""
    assert config.state_dir is not None  # ServerConfig requires it with auth
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create state_dir {config.state_dir}: {error.strerror}") from error
    if config.admin_token_file is not None:
        admin, generated = AdminCredential.from_file(config.admin_token_file), False
    else:
        admin, generated = AdminCredential.generated_in(config.state_dir)
    return ClientRegistry(config.state_dir / DB_FILE_NAME), admin, generated
