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
    |   +-- TLSError               the TLS handshake failed: the server's certificate
    |                              is not trusted or does not name the host, or the
    |                              server does not speak TLS. Not retried.
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


class TLSError(ServerUnavailable):
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


def translate(
    error: grpc.RpcError, doing: str, kinds: dict[grpc.StatusCode, type[TributaryError]] | None = None
) -> TributaryError:
    """The SDK error for a failed call; `kinds` overrides the class for some
    codes (an admin call's NOT_FOUND is about a client, not a job)."""
    code = status_code(error)
    details = _details(error)
    table = {**_BY_CODE, **(kinds or {})}
    kind = table.get(code, TributaryError) if code is not None else TributaryError
    translated = kind(f"{doing}: {details}" + (f" ({code.name})" if code is not None else ""))
    translated.code = code
    if isinstance(translated, LimitExceeded):
        translated.retry_after_s = retry_after_s(error)
    return translated


_HANDSHAKE_FAILURES = (
    ("WRONG_VERSION_NUMBER", "the server does not speak TLS (a plaintext server needs insecure=True, `tributary client --insecure`)"),
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the server's certificate is not signed by a CA this client trusts: give the CA that signed it "
        "as ClientTLS(ca_file=...) (`--ca`)",
    ),
    (
        "Hostname Verification",
        "the server's certificate does not name the host in the address: connect by a name or IP address "
        "the certificate holds, or set ClientTLS(server_name=...) to a name it holds",
    ),
)


def tls_failure(error: grpc.RpcError, doing: str) -> TLSError | None:
    """A TLSError when the call failed in the TLS handshake on this side: a
    configuration problem that retrying cannot fix."""
    details = _details(error)
    if status_code(error) != grpc.StatusCode.UNAVAILABLE or not (
        "handshake failed" in details.lower() or "Hostname Verification" in details
    ):
        return None
    reason = next((why for marker, why in _HANDSHAKE_FAILURES if marker in details), "the TLS handshake with the server failed")
    failure = TLSError(f"{doing}: {reason} ({details})")
    failure.code = grpc.StatusCode.UNAVAILABLE
    return failure


def closed_connection_hint(error: grpc.RpcError, transport: str) -> str:
    """Why a server may have closed the connection: it refuses what this client sent.

    A server that rejects a client certificate (or its absence), or a TLS
    server that receives plaintext, closes the connection; the client sees
    only "Socket closed", the same as a server that went away."""
    if "Socket closed" not in _details(error) and "Connection reset" not in _details(error):
        return ""
    if transport == "plaintext":
        return "; this client talks plaintext (insecure=True): if the server serves TLS, give tls=ClientTLS(ca_file=...) instead"
    if transport == "tls":
        return (
            "; if the server requires client certificates (mutual TLS), give ClientTLS(cert_file=..., key_file=...) "
            "signed by the CA the server trusts"
        )
    if transport == "mtls":
        return "; the server may have refused this client's certificate: it must be signed by the CA the server trusts (--tls-client-ca)"
    return ""


def _details(error: grpc.RpcError) -> str:
    details_fn = getattr(error, "details", None)
    details = details_fn() if callable(details_fn) else None
    return details if isinstance(details, str) else str(error)
