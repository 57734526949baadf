"""The SDK's exceptions, and the one place that turns `grpc.RpcError` into them.

    TributaryError                 base of everything the SDK raises
    +-- UpdateRejected             the server refused the update as malformed
    |                              (names, shapes, dtypes, NaN/Inf, stream)
    +-- NotAcceptedNow             well-formed but not acceptable now: too stale,
    |                              round closed, unknown base version. Pull and retrain.
    +-- JobNotFound                the server does not run that job
    +-- LimitExceeded              over one of the server's limits (size, rate)
    +-- ServerUnavailable          the server could not be reached, retries spent
    +-- ProtocolError              the server sent something malformed (a bug, or
                                   not a Tributary server)
    +-- ModelMismatch              the local model does not fit the job's tensors
    +-- CohortAborted              a secure-aggregation cohort could not complete;
    |                              nothing of it was applied: join another one
    +-- NotAuthenticated           no token, or one the server does not accept
    |                              (unknown, replaced, revoked): get a new one
    +-- PermissionDenied           a valid token that may not do this (a job the
                                   client is not enrolled in, another client id,
                                   a client token on an admin call)

Neither auth error is retried: the same call would be refused again.
"""

from __future__ import annotations

import grpc


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
    pass


class ServerUnavailable(TributaryError):
    pass


class ProtocolError(TributaryError):
    pass


class ModelMismatch(TributaryError):
    pass


class CohortAborted(TributaryError):
    pass


class NotAuthenticated(TributaryError):
    pass


class PermissionDenied(TributaryError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[TributaryError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: UpdateRejected,
    grpc.StatusCode.FAILED_PRECONDITION: NotAcceptedNow,
    grpc.StatusCode.NOT_FOUND: JobNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceeded,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: ServerUnavailable,
    grpc.StatusCode.ABORTED: CohortAborted,
    grpc.StatusCode.UNAUTHENTICATED: NotAuthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}

TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
"""Failures worth retrying: the same request may succeed a moment later."""


def status_code(error: grpc.RpcError) -> grpc.StatusCode | None:
    """The status of a failed call. Duck-typed: what the channel raises (and
    what an interceptor raises in its place) has code(), not always grpc.Call."""
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def translate(
    error: grpc.RpcError, doing: str, kinds: dict[grpc.StatusCode, type[TributaryError]] | None = None
) -> TributaryError:
    """The SDK error for a failed call; `kinds` overrides the class for some
    codes (an admin call's NOT_FOUND is about a client, not a job)."""
    code = status_code(error)
    details_fn = getattr(error, "details", None)
    details = details_fn() if callable(details_fn) else str(error)
    table = {**_BY_CODE, **(kinds or {})}
    kind = table.get(code, TributaryError) if code is not None else TributaryError
    translated = kind(f"{doing}: {details}" + (f" ({code.name})" if code is not None else ""))
    translated.code = code
    return translated
