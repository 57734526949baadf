"""The Admin gRPC service: server status and client enrolment. Thin, like
the servicer: the registry (`server.auth`) and the core do the work.

Served only with auth on; the interceptor lets only the admin token through.
"""

from __future__ import annotations

import grpc

from proto import tributary_pb2 as pb
from proto import tributary_pb2_grpc as pb_grpc
from server.auth import ClientRegistry, EnrolledClient
from server.core import AggregationCore
from server.servicer import _STRATEGY_KIND, _status_on_error


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, core: AggregationCore, registry: ClientRegistry) -> None:
        self._core = core
        self._registry = registry

    def Status(self, request: pb.ServerStatusRequest, context: grpc.ServicerContext) -> pb.ServerStatus:
        return pb.ServerStatus(
            jobs=[
                pb.JobStatus(
                    job_id=job.job_id,
                    strategy=_STRATEGY_KIND[job.config.strategy.name],
                    version=job.snapshot().version,
                    updates_accepted=job.stats.updates_accepted,
                    pending_updates=job.pending_updates,
                    enrolled_clients=self._registry.enrolled_count(job.job_id),
                    energy_joules_total=job.energy_joules_total,
                    active_trainers=job.slots.active if job.slots is not None else 0,
                )
                for job in sorted(self._core.jobs.values(), key=lambda j: j.job_id)
            ]
        )

    def EnrolClient(self, request: pb.EnrolClientRequest, context: grpc.ServicerContext) -> pb.EnrolledClientToken:
        with _status_on_error(context):
            for job_id in request.job_ids:
                self._core.job(job_id)  # NOT_FOUND, naming the jobs this server runs
            token = self._registry.enrol(request.client_id, request.job_ids, rotate=request.rotate)
            return pb.EnrolledClientToken(client_id=request.client_id, token=token, job_ids=sorted(set(request.job_ids)))
        raise AssertionError("unreachable")  # pragma: no cover

    def RevokeClient(self, request: pb.RevokeClientRequest, context: grpc.ServicerContext) -> pb.RevokeClientResponse:
        with _status_on_error(context):
            client, was_active = self._registry.revoke(request.client_id)
            return pb.RevokeClientResponse(client_id=client.client_id, was_active=was_active)
        raise AssertionError("unreachable")  # pragma: no cover

    def ListClients(self, request: pb.ListClientsRequest, context: grpc.ServicerContext) -> pb.ClientList:
        return pb.ClientList(clients=[_client_info(client) for client in self._registry.clients()])


def _client_info(client: EnrolledClient) -> pb.EnrolledClientInfo:
    return pb.EnrolledClientInfo(
        client_id=client.client_id,
        job_ids=sorted(client.job_ids),
        created_unix_ms=int(client.enrolled_at * 1000),
        revoked=not client.active,
        revoked_unix_ms=int(client.revoked_at * 1000) if client.revoked_at is not None else 0,
    )
