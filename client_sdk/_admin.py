"""The Admin service, for operators: server status and client enrolment.

Needs the admin token (the server's --admin-token-file, or the one it
generated into <state_dir>/admin.token). Calls are not retried: enrolling
twice after a lost answer would be refused (the client exists) rather than
repeated, so a failed call is reported as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from client_sdk._auth import BearerToken
from client_sdk._tls import ClientTLS, channel_for
from client_sdk._client import _STRATEGY_NAMES
from client_sdk._errors import TributaryError, translate
from proto import tributary_pb2 as pb
from proto import tributary_pb2_grpc as pb_grpc

T = TypeVar("T")


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    strategy: str
    version: int
    updates_accepted: int
    pending_updates: int
    enrolled_clients: int
    energy_joules_total: float = 0.0
    """Energy clients reported for the updates the job accepted."""
    active_trainers: int = 0
    """Training slots held now (jobs with max_concurrent_trainers)."""


@dataclass(frozen=True)
class Enrolment:
    client_id: str
    token: str
    """Shown this once; the server keeps only its digest."""
    job_ids: tuple[str, ...]


@dataclass(frozen=True)
class EnrolledClient:
    client_id: str
    job_ids: tuple[str, ...]
    enrolled_at: float
    """Unix time of the latest enrolment or rotation."""
    revoked_at: float | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


class AdminClient:
    """Administer a server run with --auth.

    >>> with AdminClient("127.0.0.1:50051", admin_token) as admin:
    ...     token = admin.enrol("phone-17", ["keyboard"]).token
    ...     admin.revoke("phone-17")
    """

    def __init__(
        self,
        address: str,
        admin_token: str,
        *,
        tls: ClientTLS | None = None,
        insecure: bool = False,
        timeout_s: float = 30.0,
        channel: grpc.Channel | None = None,
    ) -> None:
        """`tls` and `insecure` as for `Client`: TLS unless plaintext is asked for."""
        bearer = BearerToken(admin_token)
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.intercept_channel(channel_for(address, tls, insecure, channel), bearer)
        self._stub = pb_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]  # generated, unannotated

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def status(self) -> list[JobStatus]:
        answer: pb.ServerStatus = self._call("status", lambda: self._stub.Status(pb.ServerStatusRequest(), timeout=self.timeout_s))
        return [
            JobStatus(
                job_id=job.job_id,
                strategy=_STRATEGY_NAMES.get(job.strategy, "unknown"),
                version=job.version,
                updates_accepted=job.updates_accepted,
                pending_updates=job.pending_updates,
                enrolled_clients=job.enrolled_clients,
                energy_joules_total=job.energy_joules_total,
                active_trainers=job.active_trainers,
            )
            for job in answer.jobs
        ]

    def enrol(self, client_id: str, jobs: Sequence[str], *, rotate: bool = False) -> Enrolment:
        """Enrol `client_id` in `jobs` and return its token. An enrolled,
        active client needs `rotate=True`, which replaces its token and jobs."""
        if isinstance(jobs, str):
            raise TypeError("jobs is a list of job ids, not one string")
        request = pb.EnrolClientRequest(client_id=client_id, job_ids=list(jobs), rotate=rotate)
        answer: pb.EnrolledClientToken = self._call(
            f"enrol client {client_id!r}", lambda: self._stub.EnrolClient(request, timeout=self.timeout_s)
        )
        return Enrolment(answer.client_id, answer.token, tuple(answer.job_ids))

    def revoke(self, client_id: str) -> bool:
        """Revoke the client's token; True if it was active until now."""
        answer: pb.RevokeClientResponse = self._call(
            f"revoke client {client_id!r}",
            lambda: self._stub.RevokeClient(pb.RevokeClientRequest(client_id=client_id), timeout=self.timeout_s),
            not_found_is_about_the_client=True,
        )
        return answer.was_active

    def clients(self) -> list[EnrolledClient]:
        answer: pb.ClientList = self._call("list clients", lambda: self._stub.ListClients(pb.ListClientsRequest(), timeout=self.timeout_s))
        return [
            EnrolledClient(
                client_id=c.client_id,
                job_ids=tuple(c.job_ids),
                enrolled_at=c.created_unix_ms / 1000,
                revoked_at=c.revoked_unix_ms / 1000 if c.revoked else None,
            )
            for c in answer.clients
        ]

    def _call(self, doing: str, call: Callable[[], T], *, not_found_is_about_the_client: bool = False) -> T:
        try:
            return call()
        except grpc.RpcError as error:
            where = f"{doing} at {self.address}"
            translated = translate(error, where, {grpc.StatusCode.NOT_FOUND: TributaryError} if not_found_is_about_the_client else None)
            if translated.code == grpc.StatusCode.UNIMPLEMENTED:
                translated = TributaryError(f"{where}: the server does not serve the Admin service; start it with --auth --state-dir DIR")
                translated.code = grpc.StatusCode.UNIMPLEMENTED
            raise translated from None
