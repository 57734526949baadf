"""What can go wrong on the server, by whose fault it is.

    ServerError                  a request the server refuses; nothing changed
    +-- InvalidUpdate            the peer sent bad data (names, shapes, NaN, stream)
    +-- JobNotFound              the peer named a job this server does not run
    +-- PreconditionFailed       well-formed, but not acceptable now
    |   +-- StaleUpdate          staleness above max_staleness
    |   +-- UnknownVersion       base version the server never published
    |   +-- RoundClosed          fedavg: the round this update was for is over
    |   +-- NoTrainingSlot       the job caps trainers and the client holds no slot
    +-- LimitExceeded            over a configured size limit; retrying cannot help
    |   +-- RetryLater           over a load limit (rate, concurrent streams); may
    |                            succeed after `retry_after_s`
    +-- StreamDeadlineExceeded   a stream ran past stream_timeout_s or went quiet
    |                            for longer than stream_idle_timeout_s
    +-- IdempotencyConflict      key reused for a different update
    +-- UploadSuperseded         a push stream whose upload a resumed push took over
    +-- NotAuthenticated         no credential, or one the server does not accept
    +-- PermissionDenied         a known credential, not allowed to do this
    +-- ClientAlreadyEnrolled    enrolling an active client without `rotate`
    +-- UnknownClient            revoking a client that was never enrolled
    +-- Unavailable              the server cannot take it now, through no fault
        +-- ShuttingDown         of the peer's: retry (SIGTERM; state not writable)

    ConfigError (ValueError)     bad configuration, raised at start-up

None of these imports grpc: `server.servicer` maps them to status codes in one table.
"""

from __future__ import annotations


class ServerError(Exception):
    """Base of every refusal; the message is shown to the client as is."""


class InvalidUpdate(ServerError):
    pass


class JobNotFound(ServerError):
    pass


class PreconditionFailed(ServerError):
    pass


class StaleUpdate(PreconditionFailed):
    def __init__(self, staleness: int, max_staleness: int) -> None:
        super().__init__(
            f"update is {staleness} versions stale, above max_staleness={max_staleness}; "
            "pull the current model and train again"
        )
        self.staleness = staleness


class UnknownVersion(PreconditionFailed):
    pass


class RoundClosed(PreconditionFailed):
    pass


class NoTrainingSlot(PreconditionFailed):
    pass


class LimitExceeded(ServerError):
    pass


class RetryLater(LimitExceeded):
    """A load limit: the same request may be accepted after `retry_after_s`
    (the servicer passes it on in the `grpc-retry-pushback-ms` trailer)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StreamDeadlineExceeded(ServerError):
    pass


class IdempotencyConflict(InvalidUpdate):
    pass


class UploadSuperseded(ServerError):
    """A resumed push took this stream's upload over (server/uploads.py)."""


class NotAuthenticated(ServerError):
    pass


class PermissionDenied(ServerError):
    pass


class ClientAlreadyEnrolled(ServerError):
    pass


class UnknownClient(ServerError):
    pass


class Unavailable(ServerError):
    pass


class ShuttingDown(Unavailable):
    pass


class StateError(Exception):
    """The state directory cannot be used (corrupt, written by other settings);
    raised at start-up, never to a client."""


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names it."""
