"""The SDK's exceptions, and the one place that turns `grpc.RpcError` into them.

    TributaryError                 base of everything the SDK raises
    +-- UpdateRejected             the server refused the update as malformed
    |                              (names, shapes, dtypes, NaN/Inf, stream)
    +-- NotAcceptedNow             well-formed but not acceptable now: too stale,
    |                              round closed, unknown base version. Pull and retrain.
    +-- JobNotFound                the server does not run that job
    +-- LimitExceeded              over one of the server's limits (size, rate,
    |                              concurrent streams); `retry_after_s` is set when
    |                              a later retry may succeed
    +-- ServerUnavailable          the server could not be reached, retries spent
    +-- ProtocolError              the server sent something malformed (a bug, or
                                   not a Tributary server)
    +-- ModelMismatch              the local model does not fit the job's tensors
    +-- CohortAborted              a secure-aggregation cohort could not complete;
                                   nothing of it was applied: join another one
"""

from __future__ import annotations

import grpc

from proto.metadata import RETRY_PUSHBACK_MS


class TributaryError(Exception):
    """Base of every SDK error. `code` is the gRPC status code, when one applies."""

    code: grpc.StatusCode | None = None


class UpdateRejected(TributaryError):
    pass


class NotAcceptedNow(TributaryError):
    pass


class JobNotFound(TributaryError):
    pass


class LimitExceeded(TributaryError):
    retry_after_s: float | None = None
    """The server's hint for a load limit (rate, concurrent streams); None for a
    limit no retry can pass (an update over max_update_bytes)."""


class ServerUnavailable(TributaryError):
    pass


class ProtocolError(TributaryError):
    pass


class ModelMismatch(TributaryError):
    pass


class CohortAborted(TributaryError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[TributaryError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: UpdateRejected,
    grpc.StatusCode.FAILED_PRECONDITION: NotAcceptedNow,
    grpc.StatusCode.NOT_FOUND: JobNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceeded,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: ServerUnavailable,
    grpc.StatusCode.ABORTED: CohortAborted,
}

TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
"""Failures worth retrying: the same request may succeed a moment later."""


def status_code(error: grpc.RpcError) -> grpc.StatusCode | None:
    """The status of a failed call. Duck-typed: what the channel raises (and
    what an interceptor raises in its place) has code(), not always grpc.Call."""
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def retry_after_s(error: grpc.RpcError) -> float | None:
    """The server's pushback on a RESOURCE_EXHAUSTED refusal that may succeed
    later (rate limit, all stream slots taken), in seconds; None otherwise."""
    if status_code(error) != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == RETRY_PUSHBACK_MS:
            try:
                milliseconds = int(value)
            except ValueError:
                return None
            return milliseconds / 1000.0 if milliseconds >= 0 else None  # negative: gRFC A6's "do not retry"
    return None


def translate(error: grpc.RpcError, doing: str) -> TributaryError:
    code = status_code(error)
    details_fn = getattr(error, "details", None)
    details = details_fn() if callable(details_fn) else str(error)
    kind = _BY_CODE.get(code, TributaryError) if code is not None else TributaryError
    translated = kind(f"{doing}: {details}" + (f" ({code.name})" if code is not None else ""))
    translated.code = code
    if isinstance(translated, LimitExceeded):
        translated.retry_after_s = retry_after_s(error)
    return translated
