"""The gRPC layer: messages in, core calls, status codes out. Nothing else.

`_STATUS_BY_ERROR` is the one table that turns the server's exceptions into
gRPC status codes; the message is passed through for the person reading it.
A refusal that may succeed later (`RetryLater`: rate limit, concurrent streams)
also carries its hint in the `grpc-retry-pushback-ms` trailer (gRFC A6), which
tells a client to back off and retry, where a size limit carries none.

Every RPC that names a client calls `self._admit_client(client_id)` before it
does any work, so the per-client rate limit covers it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NoReturn, Protocol, TypeVar

import grpc

from proto import tributary_pb2 as pb
from proto import tributary_pb2_grpc as pb_grpc
from proto.logcontext import log_context
from proto.metadata import RETRY_PUSHBACK_MS
import numpy as np

from proto.compression import RAW, Encoding, decode_payload, encoded_size
from proto.tensors import CHUNK_BYTES, MalformedPayload, PayloadAssembler, TensorSpec, header_to_pb, specs_from_pb
from server.core import AggregationCore, Job, ModelSnapshot, PushOutcome, Update, UpdateHeader, check_energy
from server.federated import EvaluationReport
from server.uploads import PartialUploads, TruncatedPayload
from server.roster import ClientState
from server.scheduling import DeviceReport
from proto.secagg.protocol import KeyAdvert, ProtocolViolation, SealedShares, UnmaskResponse
from server.cohorts import CohortManager
from server import faults
from server.auth import Authorizer
from server.errors import (
    ClientAlreadyEnrolled,
    InvalidUpdate,
    JobNotFound,
    LimitExceeded,
    NotAuthenticated,
    PermissionDenied,
    PreconditionFailed,
    RetryLater,
    ServerError,
    StreamDeadlineExceeded,
    Unavailable,
    UnknownClient,
    UploadSuperseded,
)
from server.limits import ServerLimits
from server.metrics import ServerMetrics
from server.secagg import CohortAborted

_STATUS_BY_ERROR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (CohortAborted, grpc.StatusCode.ABORTED),
    (ProtocolViolation, grpc.StatusCode.FAILED_PRECONDITION),
    (MalformedPayload, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidUpdate, grpc.StatusCode.INVALID_ARGUMENT),
    (JobNotFound, grpc.StatusCode.NOT_FOUND),
    (PreconditionFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (NotAuthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (ClientAlreadyEnrolled, grpc.StatusCode.ALREADY_EXISTS),
    (UnknownClient, grpc.StatusCode.NOT_FOUND),
    (StreamDeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UploadSuperseded, grpc.StatusCode.ABORTED),
)
_REFUSALS = (ServerError, MalformedPayload, ProtocolViolation, CohortAborted)
_STRATEGY_KIND = {
    "fedasync": pb.STRATEGY_KIND_FEDASYNC,
    "fedbuff": pb.STRATEGY_KIND_FEDBUFF,
    "fedavg": pb.STRATEGY_KIND_FEDAVG,
}
_CLIENT_STATES = {
    pb.CLIENT_STATE_IDLE: ClientState.IDLE,
    pb.CLIENT_STATE_TRAINING: ClientState.TRAINING,
    pb.CLIENT_STATE_UPLOADING: ClientState.UPLOADING,
}
MAX_LONG_POLL_S = 30.0
MAX_ID_LENGTH = 128
DEFAULT_HISTORY = 100
MAX_HISTORY = 1000
_RETRIED_REFUSALS = (RetryLater, Unavailable, StreamDeadlineExceeded, TruncatedPayload, UploadSuperseded)
"""Refusals after which the update may still arrive (the SDK retries it, or
resumes a cut upload, or another stream took the upload over): the client's
training slot stays held."""
logger = logging.getLogger("tributary.server")
OFFSET_SETTLE_S = 5.0
"""Longest GetUploadOffset waits for a stream still writing the upload (server/uploads.py)."""


class TributaryServicer(pb_grpc.TributaryServicer):
    """Every RPC first checks, through `authorizer` (None: auth is off), that
    the caller may act in the job the request names and as the client id it
    names; the interceptor has already checked the token itself."""

    def __init__(
        self,
        core: AggregationCore,
        cohorts: dict[str, CohortManager] | None = None,
        authorizer: Authorizer | None = None,
        limits: ServerLimits | None = None,
        uploads: PartialUploads | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self._core = core
        self._metrics = metrics if metrics is not None else ServerMetrics(core, cohorts)
        self._uploads = uploads if uploads is not None else PartialUploads()
        self._cohorts = cohorts or {}
        self._authorizer = authorizer
        self._limits = limits

    def _admit_client(self, client_id: str) -> None:
        """The per-client rate limit; RPCs that name a client call this first."""
        if self._limits is not None:
            self._limits.check_client(client_id)

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.JobInfo:
        with _status_on_error(context):
            self._authorize(context, request.job_id)
            job = self._core.job(request.job_id)
            snapshot = job.snapshot()
            return pb.JobInfo(
                job_id=job.job_id,
                strategy=_STRATEGY_KIND[job.config.strategy.name],
                synchronous=job.synchronous,
                version=snapshot.version,
                model=header_to_pb(job.specs),
                max_staleness=job.config.max_staleness or 0,
                updates_accepted=job.stats.updates_accepted,
                max_update_bytes=job.config.max_update_bytes,
                secure_aggregation=job.config.secure_aggregation is not None,
                energy_joules_total=job.energy_joules_total,
                max_concurrent_trainers=job.config.max_concurrent_trainers or 0,
                active_trainers=job.slots.active if job.slots is not None else 0,
                compression=pb.CompressionSupport(
                    quantize="quantize" in job.config.compression,
                    top_k="top_k" in job.config.compression,
                    secure_quantize_bits=(job.config.secure_aggregation.quantize_bits or 0) if job.config.secure_aggregation else 0,
                ),
            )

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.PullResponse]:
        sent = 0
        try:
            for response in self._pull(request, context):
                if response.WhichOneof("kind") == "chunk":
                    sent += len(response.chunk.data)
                yield response
        finally:  # a pull cut off mid-stream counts what it sent
            self._metrics.note_sent_bytes(request.job_id, sent)

    def _pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.PullResponse]:
        with _status_on_error(context):
            self._authorize(context, request.job_id)
            job = self._core.job(request.job_id)
            offset = 0
            if request.resume:
                snapshot, offset = _resume_point(job, request)
            elif request.min_version > 0:
                timeout = min(request.wait_timeout_ms / 1000.0, MAX_LONG_POLL_S)
                snapshot = job.wait_for_version(request.min_version, timeout)
            else:
                snapshot = job.snapshot()
            header = pb.ModelHeader(job_id=job.job_id, version=snapshot.version, header=header_to_pb(snapshot.specs), offset=offset)
        yield pb.PullResponse(model=header)
        for data in snapshot.chunks(start=offset):
            response = pb.PullResponse()
            response.chunk.data = data  # one copy; PullResponse(chunk=Chunk(data=...)) makes two
            yield response

    def Push(self, request_iterator: Iterator[pb.PushRequest], context: grpc.ServicerContext) -> pb.PushAck:
        started = time.perf_counter()
        tally = _Tally()
        try:
            return self._push(tally.count(request_iterator), context, tally)
        finally:
            self._metrics.note_received_bytes(tally.job_id, tally.payload_bytes)
            self._metrics.observe_push(tally.job_id, time.perf_counter() - started)

    def _push(self, request_iterator: Iterator[pb.PushRequest], context: grpc.ServicerContext, tally: _Tally) -> pb.PushAck:
        job: Job | None = None
        message: pb.UpdateHeader | None = None

        def refused(error: BaseException) -> None:
            self._note_rejected(job, tally.job_id, error, message.client_id if message else "")
            logger.log(
                logging.DEBUG if isinstance(error, RetryLater) else logging.INFO,  # back-pressure, retried: not news
                "update refused (%s): %s", type(error).__name__, error,
                extra=log_context(
                    job=message.job_id if message else None,
                    client=message.client_id if message else None,
                    version=message.base_version if message else None,
                ),
            )  # fmt: skip

        with _status_on_error(context, refused):
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "update":
                raise InvalidUpdate("a push stream must start with an `update` header message")
            message = first.update
            tally.job_id = message.job_id
            self._metrics.note_update_received(message.job_id)
            self._authorize(context, message.job_id, message.client_id)
            job = self._core.job(message.job_id)
            _check_id("client_id", message.client_id)
            self._admit_client(message.client_id)
            _check_id("idempotency_key", message.idempotency_key)
            encoding = Encoding.from_pb(message.encoding) if message.HasField("encoding") else RAW
            specs = specs_from_pb(message.header, payload_size=lambda specs: encoded_size(specs, encoding))
            header = UpdateHeader(
                job_id=message.job_id,
                client_id=message.client_id,
                idempotency_key=message.idempotency_key,
                base_version=message.base_version,
                num_samples=message.num_samples,
                specs=tuple(specs),
                energy_joules=message.energy_joules,
                encoding=encoding,
            )
            resuming = False
            try:
                stored = job.admit(header)
                if stored is not None:
                    return _ack(job.job_id, stored)
                resuming = message.resume_offset > 0  # a refused resume is followed by the whole update
                upload = self._uploads.attach(header, message.resume_offset)
                resuming = False
                try:
                    for request in request_iterator:
                        if request.WhichOneof("kind") != "chunk":
                            raise InvalidUpdate("a push stream carries one `update` header, then only `chunk` messages")
                        upload.add(request.chunk.data)
                        faults.point("push.receiving")
                except (MalformedPayload, InvalidUpdate, UploadSuperseded):
                    upload.discard()  # bad data is never kept; a superseded stream owns nothing
                    raise
                except BaseException:
                    upload.park()  # the stream broke (connection lost, a deadline): keep what arrived for a resume
                    raise
                received = upload.take()
                delta = received if encoding.is_raw else decode_payload(specs, encoding, received["encoded"])
                outcome = job.submit(Update(header, delta))
            except _REFUSALS as error:
                if not (resuming or isinstance(error, _RETRIED_REFUSALS)):  # refused for good: the slot goes to another client
                    job.release_slot(header.client_id, pushed=False)
                raise
            faults.point("push.acking")
            return _ack(job.job_id, outcome)
        raise AssertionError("unreachable: _status_on_error aborts")  # pragma: no cover

    def GetUploadOffset(self, request: pb.UploadOffsetRequest, context: grpc.ServicerContext) -> pb.UploadOffset:
        with _status_on_error(context):
            self._authorize(context, request.job_id, request.client_id)
            job = self._core.job(request.job_id)
            _check_id("client_id", request.client_id)
            _check_id("idempotency_key", request.idempotency_key)
            if not request.client_id or not request.idempotency_key:
                raise InvalidUpdate("name the upload: client_id and idempotency_key must not be empty")
            if job.acknowledged(request.client_id, request.idempotency_key):
                return pb.UploadOffset(offset=0, accepted=True)
            held = self._uploads.offset(job.job_id, request.client_id, request.idempotency_key, settle_s=OFFSET_SETTLE_S)
            return pb.UploadOffset(offset=held)
        raise AssertionError("unreachable")  # pragma: no cover

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatAck:
        with _status_on_error(context):
            self._authorize(context, request.job_id, request.client_id)
            job = self._core.job(request.job_id)
            _check_id("client_id", request.client_id)
            state = _CLIENT_STATES.get(request.state)
            if state is None:
                raise InvalidUpdate(
                    f"heartbeat state {request.state} is not one of IDLE (1), TRAINING (2), UPLOADING (3); "
                    "say what the client is doing"
                )
            device = _device(request.device) if request.HasField("device") else None
            outcome = job.heartbeat(request.client_id, state, request.base_version, device)
            return pb.HeartbeatAck(
                version=outcome.version,
                server_time_ms=outcome.server_time_ms,
                next_heartbeat_ms=round(outcome.next_heartbeat_s * 1000),
                slot_lease_ms=_millis(outcome.slot_lease_s),
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def AcquireTrainingSlot(self, request: pb.TrainingSlotRequest, context: grpc.ServicerContext) -> pb.TrainingSlotGrant:
        with _status_on_error(context):
            self._authorize(context, request.job_id, request.client_id)
            job = self._core.job(request.job_id)
            _check_id("client_id", request.client_id)
            if not request.HasField("device"):
                raise InvalidUpdate("a training-slot request carries the device's state (device); say what the device is doing")
            decision = job.acquire_slot(request.client_id, _device(request.device))
            return pb.TrainingSlotGrant(
                granted=decision.granted,
                version=decision.version,
                lease_ms=_millis(decision.lease_s),
                retry_after_ms=_millis(decision.retry_after_s),
                reason=decision.reason,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def GetVersionHistory(self, request: pb.VersionHistoryRequest, context: grpc.ServicerContext) -> pb.VersionHistory:
        with _status_on_error(context):
            self._authorize(context, request.job_id)
            job = self._core.job(request.job_id)
            # a page size above the maximum is coerced to it (as AIP-158 has it), not refused
            history = job.version_history(min(request.limit or DEFAULT_HISTORY, MAX_HISTORY))
            return pb.VersionHistory(
                versions=[
                    pb.VersionRecord(version=version, published_unix_ms=round(published * 1000), energy_joules=energy)
                    for version, published, energy in history
                ]
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def ReportEvaluation(self, request: pb.EvaluationReport, context: grpc.ServicerContext) -> pb.EvaluationAck:
        with _status_on_error(context):
            self._authorize(context, request.job_id, request.client_id)
            job = self._core.job(request.job_id)
            _check_id("client_id", request.client_id)
            self._admit_client(request.client_id)
            _check_id("idempotency_key", request.idempotency_key)
            report = EvaluationReport(
                client_id=request.client_id,
                version=request.version,
                num_examples=request.num_examples,
                metrics=dict(request.metrics),
                idempotency_key=request.idempotency_key,
            )
            outcome = job.report_evaluation(report)
            if not outcome.duplicate:
                self._metrics.note_federated_evaluation(job.job_id)
                logger.debug(
                    "evaluation report taken (%d example(s), %d for this version so far)", report.num_examples, outcome.reports_for_version,
                    extra=log_context(job=job.job_id, client=report.client_id, version=report.version),
                )  # fmt: skip
            return pb.EvaluationAck(version=outcome.version, reports_for_version=outcome.reports_for_version, duplicate=outcome.duplicate)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- secure aggregation ----------------------------------------------------------

    def JoinCohort(self, request: pb.JoinCohortRequest, context: grpc.ServicerContext) -> pb.CohortPlanMessage:
        with _status_on_error(context):
            self._authorize(context, request.job_id, request.client_id)
            manager = self._manager(request.job_id)
            _check_id("client_id", request.client_id)
            if not request.client_id:
                raise InvalidUpdate("client_id is empty; a member must name itself to join a cohort")
            self._admit_client(request.client_id)
            joined = manager.join(request.client_id, min(request.wait_timeout_ms / 1000.0, MAX_LONG_POLL_S))
            if joined is None:
                return pb.CohortPlanMessage(formed=False)
            plan, rule = joined.plan, manager.job.config
            return pb.CohortPlanMessage(
                formed=True,
                cohort_id=plan.cohort_id,
                member=plan.member,
                token=joined.token,
                members=plan.members,
                neighbours=plan.neighbours,
                threshold=plan.threshold,
                min_survivors=plan.min_survivors,
                bits=plan.bits,
                scale=plan.scale,
                bound=plan.bound,
                vector_length=plan.vector_length,
                weight_scale=plan.weight_scale,
                weight_bound=plan.weight_bound,
                quantize_bits=(manager.config.quantize_bits or 0),
                staleness=pb.StalenessRule(
                    kind=rule.staleness.kind, a=rule.staleness.a, b=rule.staleness.b, max_staleness=rule.max_staleness or 0
                ),
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def AdvertiseKeys(self, request: pb.KeyAdvertMessage, context: grpc.ServicerContext) -> pb.NeighbourKeys:
        with _status_on_error(context):
            ref = request.sender
            self._authorize(context, ref.job_id)
            manager = self._manager(ref.job_id)
            advert = KeyAdvert(ref.cohort_id, ref.member, request.share_key, request.mask_key)
            keys = manager.advertise(ref.cohort_id, ref.member, ref.token, advert)
            return pb.NeighbourKeys(
                keys=[pb.NeighbourKey(member=m, share_key=a.share_key, mask_key=a.mask_key) for m, a in sorted(keys.items())]
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def ShareKeys(self, request: pb.SealedSharesMessage, context: grpc.ServicerContext) -> pb.SharesForMember:
        with _status_on_error(context):
            ref = request.sender
            self._authorize(context, ref.job_id)
            manager = self._manager(ref.job_id)
            sealed = _by_peer(request.shares, "sealed shares", who="receiver")
            mine = manager.share(ref.cohort_id, ref.member, ref.token, SealedShares(ref.cohort_id, ref.member, sealed))
            return pb.SharesForMember(shares=[pb.SealedShare(peer=p, blob=b) for p, b in sorted(mine.items())])
        raise AssertionError("unreachable")  # pragma: no cover

    def GetUploadSlot(self, request: pb.MemberRef, context: grpc.ServicerContext) -> pb.UploadSlot:
        with _status_on_error(context):
            self._authorize(context, request.job_id)
            manager = self._manager(request.job_id)
            return pb.UploadSlot(version=manager.upload_slot(request.cohort_id, request.member, request.token))
        raise AssertionError("unreachable")  # pragma: no cover

    def UploadMasked(self, request_iterator: Iterator[pb.MaskedInputRequest], context: grpc.ServicerContext) -> pb.UnmaskRequestMessage:
        tally = _Tally()
        try:
            return self._upload_masked(tally.count(request_iterator), context, tally)
        finally:
            self._metrics.note_received_bytes(tally.job_id, tally.payload_bytes)

    def _upload_masked(
        self, request_iterator: Iterator[pb.MaskedInputRequest], context: grpc.ServicerContext, tally: _Tally
    ) -> pb.UnmaskRequestMessage:
        with _status_on_error(context, lambda error: self._note_rejected(None, tally.job_id, error)):
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise InvalidUpdate("a masked upload must start with a `header` message")
            ref = first.header
            tally.job_id = ref.job_id
            self._metrics.note_update_received(ref.job_id)
            self._authorize(context, ref.job_id)
            manager = self._manager(ref.job_id)
            check_energy(ref.energy_joules)
            length = manager.job.vector_length + 1
            word = manager.masked_dtype(ref.cohort_id)  # the cohort's ring width: uint8/16/32
            assembler = PayloadAssembler([TensorSpec("masked", word, (length,))])
            try:
                # each chunk is checked as it comes: a stream longer than the
                # vector is refused at the first byte too many
                for request in request_iterator:
                    if request.WhichOneof("kind") != "chunk":
                        raise InvalidUpdate("a masked upload carries one `header`, then only `chunk` messages")
                    assembler.add(request.chunk.data)
                vector = assembler.finish()["masked"].astype(np.uint32)
            except MalformedPayload as error:
                raise InvalidUpdate(
                    f"masked input must be {length} {word.name} values ({word.itemsize * length} bytes): {error}"
                ) from error
            unmask = manager.upload(ref.cohort_id, ref.member, ref.token, vector, ref.energy_joules)
            return pb.UnmaskRequestMessage(survivors=sorted(unmask.survivors), dropped=sorted(unmask.dropped))
        raise AssertionError("unreachable")  # pragma: no cover

    def Unmask(self, request: pb.UnmaskResponseMessage, context: grpc.ServicerContext) -> pb.CohortOutcome:
        with _status_on_error(context):
            ref = request.sender
            self._authorize(context, ref.job_id)
            manager = self._manager(ref.job_id)
            response = UnmaskResponse(
                ref.cohort_id,
                ref.member,
                _by_peer(request.self_mask_shares, "self-mask shares"),
                _by_peer(request.mask_key_shares, "mask-key shares"),
            )
            version = manager.unmask(ref.cohort_id, ref.member, ref.token, response)
            return pb.CohortOutcome(version=version)
        raise AssertionError("unreachable")  # pragma: no cover

    def _note_rejected(self, job: Job | None, job_id: str, error: BaseException, client_id: str = "") -> None:
        """A refused update: counted by the job (by error type, and among its recent
        refusals with what the client was told) and in the metrics (by reason)."""
        if job is not None:
            job.note_rejection(type(error).__name__, client_id, str(error))
        self._metrics.note_rejected(job_id, error)

    def _authorize(self, context: grpc.ServicerContext, job_id: str, client_id: str = "") -> None:
        if self._authorizer is not None:
            self._authorizer.authorize(context.invocation_metadata(), job_id, client_id)

    def _manager(self, job_id: str) -> CohortManager:
        job = self._core.job(job_id)
        manager = self._cohorts.get(job_id)
        if manager is None:
            raise PreconditionFailed(f"job {job.job_id!r} does not run secure aggregation; push updates in plaintext")
        return manager


class _Chunked(Protocol):
    """A streamed request: a header message, then `chunk` messages."""

    @property
    def chunk(self) -> pb.Chunk: ...

    def WhichOneof(self, oneof_group: str) -> str | None: ...


_Request = TypeVar("_Request", bound=_Chunked)


class _Tally:
    """What a client stream carried, for the metrics: the job it named and its chunk bytes."""

    def __init__(self) -> None:
        self.job_id = ""
        self.payload_bytes = 0

    def count(self, requests: Iterator[_Request]) -> Iterator[_Request]:
        for request in requests:
            if request.WhichOneof("kind") == "chunk":
                self.payload_bytes += len(request.chunk.data)
            yield request


def _by_peer(shares: Iterable[pb.SealedShare], what: str, who: str = "peer") -> dict[int, bytes]:
    """Shares keyed by peer. A peer listed twice is refused, never collapsed:
    which of the two blobs would be kept is arbitrary, and a member whose
    message is dropped in part cannot tell why its cohort failed."""
    by_peer: dict[int, bytes] = {}
    for share in shares:
        if share.peer in by_peer:
            raise InvalidUpdate(f"each {who} may appear once among the {what}; member {share.peer} appears twice")
        by_peer[share.peer] = share.blob
    return by_peer


def _device(message: pb.DeviceState) -> DeviceReport:
    return DeviceReport(
        battery_level=message.battery_level if message.HasField("battery_level") else None,
        charging=message.charging,
        idle=message.idle,
        unmetered=message.unmetered,
        profile=message.profile,
    )


def _millis(seconds: float) -> int:
    """Seconds as uint32 milliseconds (capped, never negative)."""
    return min(max(0, math.ceil(seconds * 1000)), 2**32 - 1)
def _resume_point(job: Job, request: pb.PullRequest) -> tuple[ModelSnapshot, int]:
    """The snapshot and byte offset a resumed pull continues from."""
    if request.min_version > 0:
        raise InvalidUpdate("a resumed pull names its version (resume_version); drop min_version")
    snapshot = job.snapshot_at(request.resume_version)
    offset = request.resume_offset
    if offset % CHUNK_BYTES or offset > snapshot.payload_bytes:
        raise InvalidUpdate(
            f"resume_offset {offset} must be a multiple of the {CHUNK_BYTES}-byte chunk size and at most the "
            f"model's {snapshot.payload_bytes} bytes; resume after the last whole chunk received"
        )
    return snapshot, offset


def _check_id(field: str, value: str) -> None:
    if len(value) > MAX_ID_LENGTH:
        raise InvalidUpdate(f"{field} is {len(value)} characters long; at most {MAX_ID_LENGTH} are accepted")


def _ack(job_id: str, outcome: PushOutcome) -> pb.PushAck:
    return pb.PushAck(
        job_id=job_id,
        version_at_arrival=outcome.version_at_arrival,
        staleness=outcome.staleness,
        staleness_weight=outcome.staleness_weight,
        version_after=outcome.version_after,
        duplicate=outcome.duplicate,
    )


def status_code_for(error: BaseException) -> grpc.StatusCode | None:
    """The status a refusal maps to, from the one table (None: not a refusal)."""
    for error_type, code in _STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return code
    return None


@contextlib.contextmanager
def _status_on_error(context: grpc.ServicerContext, on_reject: Callable[[BaseException], None] | None = None) -> Iterator[None]:
    """Turn a refusal into its status; `on_reject(error)` notes it first."""
    try:
        yield
    except _REFUSALS as error:
        if on_reject is not None and status_code_for(error) is not None:
            on_reject(error)
        abort_with_error(context, error)


def abort_with_error(context: grpc.ServicerContext, error: BaseException) -> NoReturn:
    """End the call with the status `_STATUS_BY_ERROR` gives `error`, its
    message, and for RetryLater the pushback trailer. An error missing from the
    table is our bug: it is re-raised, and gRPC reports UNKNOWN."""
    code = status_code_for(error)
    if code is None:
        raise error
    if isinstance(error, RetryLater):
        context.set_trailing_metadata(((RETRY_PUSHBACK_MS, str(max(1, math.ceil(error.retry_after_s * 1000)))),))
    context.abort(code, str(error))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
