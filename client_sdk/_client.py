"""The low-level API: pull and push named tensors, with retries.

The channel is TLS unless the app asks for plaintext (`insecure=True`, which
is logged as a warning): with no settings, the server's certificate is checked
against gRPC's default roots; `tls=ClientTLS(...)` names a private CA, a
client certificate for mutual TLS, and the name to expect.

Every call is retried on transient failures (UNAVAILABLE, DEADLINE_EXCEEDED)
with exponential backoff and jitter, and on refusals the server marks as worth
retrying (RESOURCE_EXHAUSTED with a `grpc-retry-pushback-ms` trailer: its rate
limit, or all its stream slots taken), waiting at least the server's hint; a
hint longer than `RetryPolicy.max_backoff_s` is raised at once (LimitExceeded,
with `retry_after_s`) for the app to schedule; never on UNAUTHENTICATED or
PERMISSION_DENIED, which a retry would not change. A push picks its idempotency key
once and reuses it on every retry, so a retried push whose ack was lost is
counted once by the server (which answers with the first ack, `duplicate=True`).
A push or pull cut off mid-stream resumes on its retry: a push asks the server
how much of it arrived (GetUploadOffset) and sends only the rest; a pull asks
for the same version from its last whole chunk; either starts over when the
server no longer holds what it had (FAILED_PRECONDITION).
"""

from __future__ import annotations

import enum
import math
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np

from client_sdk._errors import (
    TRANSIENT_CODES,
    LimitExceeded,
    ProtocolError,
    ServerUnavailable,
    TributaryError,
    closed_connection_hint,
    retry_after_s,
    status_code,
    tls_failure,
    translate,
)
from client_sdk._tls import ClientTLS, channel_for
from client_sdk._auth import BearerToken
from client_sdk._device import DeviceState, SlotGrant
from client_sdk._compression import Compression, Compressor
from proto import tributary_pb2 as pb
from proto import tributary_pb2_grpc as pb_grpc
from proto.logcontext import log_context
from proto.tensors import (
    CHUNK_BYTES,
    MalformedPayload,
    PayloadAssembler,
    TensorSpec,
    header_to_pb,
    iter_chunks,
    specs_from_pb,
    specs_of,
)

T = TypeVar("T")
LOG = logging.getLogger("tributary.client")
MAX_WAIT_S = 3600.0
HEARTBEAT_TIMEOUT_S = 10.0
_STRATEGY_NAMES = {pb.STRATEGY_KIND_FEDASYNC: "fedasync", pb.STRATEGY_KIND_FEDBUFF: "fedbuff", pb.STRATEGY_KIND_FEDAVG: "fedavg"}


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: delay_k = min(max_backoff_s, initial_backoff_s * multiplier^k),
    each scaled by a random factor in [1 - jitter, 1]."""

    max_attempts: int = 8
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def delays(self) -> Iterator[float]:
        for attempt in range(self.max_attempts - 1):
            base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt)
            yield base * (1 - self.jitter * random.random())


class ClientState(enum.Enum):
    """What a client tells the server it is doing, in heartbeats."""

    IDLE = "idle"
    TRAINING = "training"
    UPLOADING = "uploading"


_STATE_TO_PB = {
    ClientState.IDLE: pb.CLIENT_STATE_IDLE,
    ClientState.TRAINING: pb.CLIENT_STATE_TRAINING,
    ClientState.UPLOADING: pb.CLIENT_STATE_UPLOADING,
}


@dataclass(frozen=True)
class HeartbeatReply:
    version: int
    """The job's current model version: a client holding an older one may pull."""
    server_time_ms: int
    next_heartbeat_s: float
    """When the server would like the next heartbeat."""
    slot_lease_s: float = 0.0
    """What is left of this client's training-slot lease (0.0: it holds none)."""


@dataclass(frozen=True)
class JobDescription:
    job_id: str
    strategy: str
    synchronous: bool
    version: int
    specs: tuple[TensorSpec, ...]
    max_staleness: int | None
    updates_accepted: int
    max_update_bytes: int
    secure_aggregation: bool
    energy_joules_total: float = 0.0
    """Energy clients reported for the updates the job accepted."""
    max_concurrent_trainers: int | None = None
    """Training slots: None when the job has none (train and push at will)."""
    active_trainers: int = 0
    accepts_quantized: bool = False
    """Plain pushes may be quantized (Compression(quantize_bits=...))."""
    accepts_top_k: bool = False
    """Plain pushes may be top-k sparsified (Compression(top_k=...))."""
    secure_quantize_bits: int | None = None
    """Secure aggregation: bits the job's cohorts quantize each value to (None: full ring precision)."""


@dataclass(frozen=True)
class VersionRecord:
    version: int
    published_at: float
    """Unix time."""
    energy_joules: float
    """Energy reported for the updates that went into this version."""


@dataclass(frozen=True)
class PulledModel:
    version: int
    tensors: dict[str, np.ndarray]


@dataclass(frozen=True)
class PushResult:
    version_at_arrival: int
    staleness: int
    staleness_weight: float
    version_after: int
    duplicate: bool
    idempotency_key: str
    payload_bytes: int = 0
    """Bytes of the update's payload as sent (encoded size when compressed)."""


@dataclass(frozen=True)
class EvaluationReceipt:
    """The server's answer to `Client.report_evaluation`."""

    version: int
    reports_for_version: int
    """Clients whose reports the server holds for this version, this one included."""
    duplicate: bool
    """A retry of a report the server had already counted (counted once)."""
    idempotency_key: str


class Client:
    """A connection to one job on a Tributary server.

    >>> tls = ClientTLS(ca_file="ca.pem", cert_file="me.pem", key_file="me.key")
    >>> with Client("server.example:50051", job="default", tls=tls) as client:
    ...     model = client.pull()
    ...     client.push(model.version, delta, num_samples=128)

    `tls`: the CA, client certificate and server name to use; None is TLS
    against gRPC's default roots. `insecure=True`: plaintext, for a network
    you trust (logged as a warning); not together with `tls`. `channel`: a
    channel of your own (e.g. with interceptors), used as it is.
    Against a server run with --auth, pass the client's `token` (from
    `tributary admin enrol`) and the `client_id` it was enrolled as; every
    call then carries it as `authorization: Bearer <token>` metadata.
    """

    def __init__(
        self,
        address: str,
        job: str = "default",
        *,
        tls: ClientTLS | None = None,
        insecure: bool = False,
        client_id: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        timeout_s: float = 300.0,
        channel: grpc.Channel | None = None,
        token: str | None = None,
    ) -> None:
        if token is not None and client_id is None:
            raise ValueError("a token belongs to one enrolled client: pass client_id= the id it was enrolled as")
        bearer = BearerToken(token) if token is not None else None  # checks the token before anything opens
        self.address = address
        self.job = job
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:12]}"
        self.retry = retry
        self.timeout_s = timeout_s
        if channel is not None:
            self._transport = "custom"
        else:
            self._transport = "plaintext" if insecure else ("mtls" if tls is not None and tls.mutual else "tls")
        channel = channel_for(address, tls, insecure, channel)
        self._channel = grpc.intercept_channel(channel, bearer) if bearer is not None else channel
        self._stub = pb_grpc.TributaryStub(self._channel)
        self.last_pulled_version = 0
        """Version of the latest model this client pulled (0 before the first pull)."""
        self._compressors: dict[Compression, Compressor] = {}

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # -- calls -----------------------------------------------------------------

    def job_info(self) -> JobDescription:
        info: pb.JobInfo = self._with_retries("get job", lambda: self._stub.GetJob(pb.GetJobRequest(job_id=self.job), timeout=self.timeout_s))
        try:
            specs = tuple(specs_from_pb(info.model))
        except MalformedPayload as error:
            raise ProtocolError(f"server described job {self.job!r} with a bad tensor list: {error}") from error
        return JobDescription(
            job_id=info.job_id,
            strategy=_STRATEGY_NAMES.get(info.strategy, "unknown"),
            synchronous=info.synchronous,
            version=info.version,
            specs=specs,
            max_staleness=info.max_staleness or None,
            updates_accepted=info.updates_accepted,
            max_update_bytes=info.max_update_bytes,
            secure_aggregation=info.secure_aggregation,
            energy_joules_total=info.energy_joules_total,
            max_concurrent_trainers=info.max_concurrent_trainers or None,
            active_trainers=info.active_trainers,
            accepts_quantized=info.compression.quantize,
            accepts_top_k=info.compression.top_k,
            secure_quantize_bits=info.compression.secure_quantize_bits or None,
        )

    def version_history(self, limit: int = 100) -> list[VersionRecord]:
        """The job's newest `limit` versions (at most 1000), newest first, with
        the energy reported for the updates in each."""
        if not 1 <= limit <= 1000:
            raise ValueError(f"limit must be between 1 and 1000, got {limit}")
        request = pb.VersionHistoryRequest(job_id=self.job, limit=limit)
        history: pb.VersionHistory = self._with_retries("read the version history", lambda: self._stub.GetVersionHistory(request, timeout=self.timeout_s))
        return [VersionRecord(v.version, v.published_unix_ms / 1000.0, v.energy_joules) for v in history.versions]

    def acquire_training_slot(self, state: DeviceState) -> SlotGrant:
        """Ask the server for a slot to train in, reporting the device's
        `state`. Not granted: `retry_after_s` says when to ask again and
        `reason` why. A job without slots grants every request (lease 0). A
        granted slot is released by this client's next push to the job, or
        lapses after `lease_s` unless heartbeats in state training or
        uploading renew it (`fit` sends them)."""
        if not isinstance(state, DeviceState):
            raise ValueError(f"state must be a DeviceState, got {state!r}")
        request = pb.TrainingSlotRequest(job_id=self.job, client_id=self.client_id, device=_device_to_pb(state))
        grant: pb.TrainingSlotGrant = self._with_retries(
            "ask for a training slot", lambda: self._stub.AcquireTrainingSlot(request, timeout=self.timeout_s)
        )
        return SlotGrant(grant.granted, grant.version, grant.lease_ms / 1000.0, grant.retry_after_ms / 1000.0, grant.reason)

    def pull(self, *, min_version: int = 0, wait_s: float = 0.0) -> PulledModel:
        """The job's current model. With `min_version`, wait up to `wait_s`
        seconds for that version (synchronous rounds); the answer may still be
        older if the wait runs out."""
        if min_version < 0:
            raise ValueError(f"min_version must be >= 0, got {min_version}")
        if not 0 <= wait_s <= MAX_WAIT_S:
            raise ValueError(f"wait_s must be between 0 and {MAX_WAIT_S} seconds, got {wait_s}")
        request = pb.PullRequest(job_id=self.job, min_version=min_version, wait_timeout_ms=int(wait_s * 1000))
        partial = _PartialPull()
        pulled = self._with_retries("pull", lambda: self._pull_once(request, self.timeout_s + wait_s, partial))
        self.last_pulled_version = pulled.version
        return pulled

    def heartbeat(
        self,
        state: ClientState | str = ClientState.IDLE,
        *,
        base_version: int | None = None,
        timeout_s: float = HEARTBEAT_TIMEOUT_S,
        device: DeviceState | None = None,
    ) -> HeartbeatReply:
        """Tell the server this client is there and what it is doing (`idle`,
        `training` or `uploading`) on `base_version` (default: the version it
        last pulled), and optionally its `device` state. One attempt, no
        retries: a lost heartbeat is replaced by the next one, sent after
        `next_heartbeat_s` of the reply. A training or uploading heartbeat
        renews this client's training slot."""
        try:
            state = ClientState(state.lower() if isinstance(state, str) else state)
        except ValueError:
            raise ValueError(
                f"state must be one of {', '.join(s.value for s in ClientState)}, got {state!r}"
            ) from None
        version = self.last_pulled_version if base_version is None else base_version
        if version < 0:
            raise ValueError(f"base_version must be >= 0 (a version pulled from the server), got {version}")
        request = pb.HeartbeatRequest(job_id=self.job, client_id=self.client_id, state=_STATE_TO_PB[state], base_version=version)
        if device is not None:
            request.device.CopyFrom(_device_to_pb(device))
        try:
            ack: pb.HeartbeatAck = self._stub.Heartbeat(request, timeout=min(timeout_s, self.timeout_s))
        except grpc.RpcError as error:
            doing = f"heartbeat on job {self.job!r} at {self.address}"
            raise (tls_failure(error, doing) or translate(error, doing)) from None
        return HeartbeatReply(ack.version, ack.server_time_ms, ack.next_heartbeat_ms / 1000.0, ack.slot_lease_ms / 1000.0)

    def log_context(self, version: int | None = None, cohort: str | None = None) -> dict[str, object]:
        """The `extra` of a log event about this client (see proto/logcontext.py)."""
        return log_context(job=self.job, client=self.client_id, version=version, cohort=cohort)

    def push(
        self,
        base_version: int,
        delta: Mapping[str, Any],
        *,
        num_samples: int = 1,
        idempotency_key: str | None = None,
        energy_joules: float = 0.0,
        compression: Compression | None = None,
    ) -> PushResult:
        """Send `delta` (trained minus pulled, for every tensor of the model, in
        the model's order), computed against `base_version`. Values may be numpy
        arrays or torch tensors. `energy_joules`: what the update cost the
        device (e.g. `edge.energy.EnergyModel`); the server sums it per version.
        `compression`: quantize and/or sparsify it (see `Compression`); the
        top-k error-feedback residual is kept in this client per `Compression`
        value and added to the next push made with it."""
        if base_version < 0:
            raise ValueError(f"base_version must be >= 0 (a version pulled from the server), got {base_version}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (the examples the update was trained on), got {num_samples}")
        if isinstance(energy_joules, bool) or not (isinstance(energy_joules, (int, float)) and math.isfinite(energy_joules) and energy_joules >= 0):
            raise ValueError(f"energy_joules must be a finite number >= 0, got {energy_joules!r}")
        arrays = {name: _to_numpy(value) for name, value in delta.items()}
        key = idempotency_key or uuid.uuid4().hex
        compressor = self._compressor(compression) if compression is not None else None
        residual: dict[str, np.ndarray] = {}
        try:
            tensor_header = header_to_pb(specs_of(arrays))
            payload: list[np.ndarray] = list(arrays.values())
            if compressor is not None:
                encoded, residual = compressor.encode(arrays)
                payload = [np.frombuffer(tensor.data, dtype=np.uint8) for tensor in encoded.values()]
                tensor_header.payload_bytes = sum(part.size for part in payload)
            header = pb.UpdateHeader(
                job_id=self.job,
                client_id=self.client_id,
                idempotency_key=key,
                base_version=base_version,
                num_samples=num_samples,
                energy_joules=float(energy_joules),
                header=tensor_header,
            )
            if compressor is not None:
                header.encoding.CopyFrom(compressor.encoding.to_pb())
        except MalformedPayload as error:
            raise TributaryError(f"cannot send this update: {error}") from error

        def requests(offset: int) -> Iterator[pb.PushRequest]:
            first = pb.PushRequest(update=header)
            first.update.resume_offset = offset
            yield first
            for data in iter_chunks(payload, start=offset):
                request = pb.PushRequest()
                request.chunk.data = data  # one copy; PushRequest(chunk=Chunk(data=...)) makes two
                yield request

        tried = False

        def attempt() -> pb.PushAck:
            # A retry first asks how much of this upload the server holds and
            # sends only the rest; should those bytes be gone by the time the
            # resumed stream arrives (expired, evicted, a restart), the server
            # says FAILED_PRECONDITION and the whole update goes once more.
            nonlocal tried
            offset = self._upload_offset(key) if tried else 0
            tried = True
            if offset:
                LOG.info("push %s: resuming at byte %d of %d", key, offset, header.header.payload_bytes, extra=self.log_context(base_version))
                try:
                    ack: pb.PushAck = self._stub.Push(requests(offset), timeout=self.timeout_s)
                    return ack
                except grpc.RpcError as error:
                    if status_code(error) != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                    LOG.info(
                        "push %s: the server no longer holds byte %d (%s); sending the whole update", key, offset, _details_of(error),
                        extra=self.log_context(base_version),
                    )  # fmt: skip
            ack = self._stub.Push(requests(0), timeout=self.timeout_s)
            return ack

        ack: pb.PushAck = self._with_retries("push", attempt)
        if compressor is not None:
            compressor.commit(residual)  # only now: a refused update leaves the residual as it was
        LOG.debug(
            "update accepted: base version %d, staleness %d (weight %.3g), %d bytes%s",
            base_version, ack.staleness, ack.staleness_weight, header.header.payload_bytes, " (a duplicate)" if ack.duplicate else "",
            extra=self.log_context(ack.version_after),
        )  # fmt: skip
        return PushResult(
            version_at_arrival=ack.version_at_arrival,
            staleness=ack.staleness,
            staleness_weight=ack.staleness_weight,
            version_after=ack.version_after,
            duplicate=ack.duplicate,
            idempotency_key=key,
            payload_bytes=int(header.header.payload_bytes),
        )

    def report_evaluation(
        self, version: int, metrics: Mapping[str, float], num_examples: int, *, idempotency_key: str | None = None
    ) -> EvaluationReceipt:
        """Report how model `version` (one this client pulled) did on
        `num_examples` of this client's own held-out examples, e.g.
        `{"accuracy": 0.91, "loss": 0.3}` (federated evaluation). The server
        keeps the example-weighted mean per version over the clients that
        reported; a later report of the same version by this client replaces
        this one. Retried like every call, with one idempotency key, so it
        counts once."""
        if version < 0:
            raise ValueError(f"version must be >= 0 (a version pulled from the server), got {version}")
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"num_examples must be an int >= 1 (the held-out examples evaluated), got {num_examples!r}")
        if not metrics:
            raise ValueError("metrics must name at least one metric, e.g. {'accuracy': 0.9}")
        values: dict[str, float] = {}
        for name, value in metrics.items():
            number = float(value)
            if not isinstance(name, str) or not math.isfinite(number):
                raise ValueError(f"metrics must map names to finite numbers, got {name!r}: {value!r}")
            values[name] = number
        key = idempotency_key or uuid.uuid4().hex
        request = pb.EvaluationReport(
            job_id=self.job, client_id=self.client_id, version=version, num_examples=num_examples, metrics=values, idempotency_key=key
        )
        ack: pb.EvaluationAck = self._with_retries("report an evaluation", lambda: self._stub.ReportEvaluation(request, timeout=self.timeout_s))
        LOG.debug(
            "evaluation reported: %s on %d example(s); %d report(s) for this version", values, num_examples, ack.reports_for_version,
            extra=self.log_context(version),
        )  # fmt: skip
        return EvaluationReceipt(version=ack.version, reports_for_version=ack.reports_for_version, duplicate=ack.duplicate, idempotency_key=key)

    def fit(self, model: Any, train_fn: Any, **options: Any) -> Any:
        """Train `model` federatedly: see `client_sdk.fit` (needs torch)."""
        from client_sdk._training import fit

        return fit(self, model, train_fn, **options)

    def compression_residual(self, compression: Compression) -> dict[str, np.ndarray]:
        """The error-feedback residual kept for pushes with `compression`
        (empty before the first, or without top-k error feedback)."""
        compressor = self._compressors.get(compression)
        return dict(compressor.residual) if compressor is not None else {}

    # -- internals -------------------------------------------------------------

    def _compressor(self, compression: Compression) -> Compressor:
        if not isinstance(compression, Compression):
            raise TypeError(f"compression must be a client_sdk.Compression, got {type(compression).__name__}")
        if compression not in self._compressors:
            self._compressors[compression] = Compressor(compression)
        return self._compressors[compression]

    def _upload_offset(self, key: str) -> int:
        """Where a retried push resumes: the bytes of upload `key` the server
        holds (0: none, or it was accepted already and any push with the key
        gets its first ack back at the header, or the server predates resuming)."""
        request = pb.UploadOffsetRequest(job_id=self.job, client_id=self.client_id, idempotency_key=key)
        try:
            answer: pb.UploadOffset = self._stub.GetUploadOffset(request, timeout=min(HEARTBEAT_TIMEOUT_S, self.timeout_s))
        except grpc.RpcError as error:
            if status_code(error) == grpc.StatusCode.UNIMPLEMENTED:
                return 0
            raise
        return 0 if answer.accepted else int(answer.offset)

    def _pull_once(self, request: pb.PullRequest, timeout: float, partial: _PartialPull) -> PulledModel:
        """One attempt; `partial` carries what earlier attempts received, so a
        pull cut off mid-stream resumes on the same version after its last
        whole chunk. A version the server no longer keeps (FAILED_PRECONDITION)
        starts over with the current one."""
        if partial.assembler is not None:
            offset = partial.assembler.received_bytes - partial.assembler.received_bytes % CHUNK_BYTES
            resume = pb.PullRequest(job_id=self.job, resume=True, resume_version=partial.version, resume_offset=offset)
            LOG.info(
                "pull of version %d: resuming at byte %d of %d", partial.version, offset, partial.assembler.expected_bytes,
                extra=self.log_context(partial.version),
            )  # fmt: skip
            try:
                return self._pull_stream(resume, timeout, partial)
            except grpc.RpcError as error:
                if status_code(error) != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                LOG.info(
                    "pull: the server no longer keeps version %d (%s); pulling the current one", partial.version, _details_of(error),
                    extra=self.log_context(partial.version),
                )  # fmt: skip
                partial.assembler = None
        return self._pull_stream(request, timeout, partial)

    def _pull_stream(self, request: pb.PullRequest, timeout: float, partial: _PartialPull) -> PulledModel:
        stream = self._stub.Pull(request, timeout=timeout)
        try:
            first = next(stream, None)
            if first is None or first.WhichOneof("kind") != "model":
                raise ProtocolError("pull answer did not start with a model header")
            specs = specs_from_pb(first.model.header)
            if request.resume:
                assembler = partial.assembler
                assert assembler is not None
                if (first.model.version, first.model.offset, specs) != (partial.version, request.resume_offset, partial.specs):
                    raise ProtocolError(
                        f"server answered a resumed pull of version {partial.version} at byte {request.resume_offset} "
                        f"with version {first.model.version} at byte {first.model.offset}, or other tensors"
                    )
                assembler.rewind(request.resume_offset)
            else:
                if first.model.offset:
                    raise ProtocolError(f"server answered a whole pull from byte {first.model.offset}")
                assembler = partial.assembler = PayloadAssembler(specs)
                partial.version, partial.specs = first.model.version, specs
            for message in stream:
                if message.WhichOneof("kind") != "chunk":
                    raise ProtocolError("pull answer carried a second header")
                assembler.add(message.chunk.data)
            return PulledModel(first.model.version, assembler.finish())
        except MalformedPayload as error:
            raise ProtocolError(f"server sent a malformed model: {error}") from error
        finally:
            stream.cancel()  # a no-op once the stream is complete; frees it on any early exit

    def _with_retries(self, doing: str, call: Callable[[], T], *, transient: bool = True) -> T:
        """`call()`, retried per `self.retry` on transient failures (unless
        `transient` is False) and on refusals with a server pushback."""
        delays = self.retry.delays()
        while True:
            try:
                return call()
            except grpc.RpcError as error:
                doing_what = f"{doing} on job {self.job!r} at {self.address}"
                handshake = tls_failure(error, doing_what)
                if handshake is not None:
                    raise handshake from None
                code = status_code(error)
                pushback = retry_after_s(error)
                retryable = (transient and code in TRANSIENT_CODES) or (
                    pushback is not None and pushback <= self.retry.max_backoff_s
                )
                delay = next(delays, None) if retryable else None
                if delay is None:
                    translated = translate(error, doing_what)
                    if retryable and code in TRANSIENT_CODES:
                        cause = closed_connection_hint(error, self._transport)
                        translated = ServerUnavailable(f"{translated} after {self.retry.max_attempts} attempts{cause}")
                        translated.code = code
                    elif retryable and isinstance(translated, LimitExceeded):
                        hint = translated.retry_after_s
                        translated = LimitExceeded(f"{translated} after {self.retry.max_attempts} attempts")
                        translated.code, translated.retry_after_s = code, hint
                    raise translated from None
                time.sleep(max(delay, pushback or 0.0))


def _device_to_pb(state: DeviceState) -> pb.DeviceState:
    message = pb.DeviceState(charging=state.charging, idle=state.idle, unmetered=state.unmetered, profile=state.profile)
    if state.battery_level is not None:
        message.battery_level = state.battery_level
    return message
@dataclass
class _PartialPull:
    """What earlier attempts of one pull received."""

    version: int = 0
    specs: list[TensorSpec] = field(default_factory=list)
    assembler: PayloadAssembler | None = None


def _details_of(error: grpc.RpcError) -> str:
    details = getattr(error, "details", None)
    return str(details()) if callable(details) else str(error)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    detach = getattr(value, "detach", None)
    if detach is not None:  # a torch tensor; torch itself is not needed for the low-level API
        array: np.ndarray = detach().cpu().numpy()
        return array
    return np.asarray(value)
