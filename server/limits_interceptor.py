"""Applies the stream limits of server/limits.py to calls, as a gRPC interceptor.

`LimitsInterceptor` wraps the handlers of the RPCs that can hold a thread for
long (server/limits.py lists them and says why those): each takes a stream
slot or is refused with RESOURCE_EXHAUSTED before its handler runs, and the
streams among them are timed message by message:

  Push, UploadMasked  the request iterator the servicer reads is wrapped: each
                      message that arrives after too long a silence, or past
                      the stream's total time, raises StreamDeadlineExceeded
                      (DEADLINE_EXCEEDED with a message); the slot is given
                      back as soon as the client's stream ends.
  Pull                the responses are wrapped the same way: a send that only
                      completes too late ends the call with DEADLINE_EXCEEDED.
  JoinCohort          holds a slot for the whole call; no stream to time.

A peer that goes silent blocks the handler thread inside gRPC (reading the
next message, or sending into a full flow-control window), where none of the
checks above can run. The StreamWatchdog ends such a call from its own
thread with DEADLINE_EXCEEDED and the reason (see `_ender`), which wakes the
handler: it sees the request stream fail or end, and the wrapper turns either
into StreamDeadlineExceeded, so a stream cut off this way is never taken as
complete and nothing of it is applied. The server also logs a warning with
the reason and counts it in `ServerLimits.stats` ("streams_cancelled").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc._cython import cygrpc

from proto import tributary_pb2 as pb
from server.errors import RetryLater, StreamDeadlineExceeded
from server.limits import ServerLimits, StreamClock, StreamSlots
from server.servicer import abort_with_error

LOG = logging.getLogger("tributary.server.limits")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tributary"].full_name
HELD_RPCS = frozenset({"Push", "Pull", "UploadMasked", "JoinCohort"})
"""The methods of SERVICE_NAME that take a stream slot."""


class _Slot:
    """One acquired stream slot, given back exactly once."""

    def __init__(self, slots: StreamSlots) -> None:
        self._slots = slots
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()


class _WatchedRequests:
    """The request iterator a client-streaming handler reads, timed."""

    def __init__(self, requests: Iterator[Any], clock: StreamClock, slot: _Slot, limits: ServerLimits) -> None:
        self._requests = requests
        self._clock = clock
        self._slot = slot
        self._limits = limits
        self._ended = False

    def __iter__(self) -> _WatchedRequests:
        return self

    def __next__(self) -> Any:
        if self._ended:
            raise StopIteration
        self._clock.begin_wait()
        try:
            message = next(self._requests)
        except StopIteration:
            self._ended = True
            self._slot.release()  # the data has arrived; what the handler does next is the server's own time
            self._clock.end_stream()  # raises if the watchdog cut the stream: an early end is not a complete one
            raise
        except grpc.RpcError:
            self._ended = True
            self._slot.release()
            if self._clock.cancelled is not None:
                raise StreamDeadlineExceeded(self._clock.cancelled) from None
            raise
        _end_wait(self._clock, self._limits)
        return message


def _end_wait(clock: StreamClock, limits: ServerLimits) -> None:
    try:
        clock.end_wait()
    except StreamDeadlineExceeded as error:
        if clock.cancelled is None:  # the watchdog already counted the ones it cut
            limits.stats.note("deadline_exceeded")
            LOG.info("refused a late message: %s", error)
        raise


def _ender(context: grpc.ServicerContext) -> Callable[[str], None]:
    """How the watchdog ends `context`'s call: DEADLINE_EXCEEDED with the reason.

    gRPC's public `context.cancel()` can only send CANCELLED, with no message;
    the call object behind a server context can send a status and message of
    our choosing. That object is grpcio's internals, which pyproject.toml pins
    (grpcio==1.85.1) and tests/integration/test_limits.py checks; should they
    change, this falls back to the public cancel."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)

    def end(reason: str) -> None:
        if call is not None:
            try:
                call.cancel(cygrpc.StatusCode.deadline_exceeded, reason)
                return
            except (AttributeError, TypeError) as error:
                LOG.warning("cannot end the call with a status (%s); cancelling it instead", error)
        context.cancel()

    return end


class LimitsInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type stubs
    def __init__(self, limits: ServerLimits) -> None:
        self._limits = limits

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        service, _, method = details.method.lstrip("/").rpartition("/")
        if handler is None or service != SERVICE_NAME or method not in HELD_RPCS:
            return handler
        serializers = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._client_stream(method, handler.stream_unary), **serializers)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._server_stream(method, handler.unary_stream), **serializers)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._long_call(handler.unary_unary), **serializers)
        return handler

    def _acquire(self, context: grpc.ServicerContext) -> _Slot:
        try:
            self._limits.acquire_stream()
        except RetryLater as error:
            abort_with_error(context, error)
        return _Slot(self._limits.streams)

    def _client_stream(self, rpc: str, behaviour: Callable[[Iterator[Any], grpc.ServicerContext], Any]) -> Callable[..., Any]:
        limits = self._limits

        def limited(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            slot = self._acquire(context)
            clock = limits.stream_clock(rpc)
            limits.watchdog.watch(clock, _ender(context), context.peer())
            try:
                return behaviour(_WatchedRequests(requests, clock, slot, limits), context)
            finally:
                limits.watchdog.unwatch(clock)
                slot.release()

        return limited

    def _server_stream(self, rpc: str, behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Any]:
        limits = self._limits

        def limited(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            # Everything happens inside the generator, so a call gRPC never
            # iterates holds nothing; when gRPC stops iterating (the client
            # went away, or the watchdog cancelled), dropping the generator
            # runs the `finally`.
            slot = self._acquire(context)
            clock = limits.stream_clock(rpc)
            limits.watchdog.watch(clock, _ender(context), context.peer())
            try:
                for response in behaviour(request, context):
                    clock.begin_wait()
                    yield response  # gRPC resumes us once the message is sent
                    try:
                        _end_wait(clock, limits)
                    except StreamDeadlineExceeded as error:
                        abort_with_error(context, error)
            finally:
                limits.watchdog.unwatch(clock)
                slot.release()

        return limited

    def _long_call(self, behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def limited(request: Any, context: grpc.ServicerContext) -> Any:
            slot = self._acquire(context)
            try:
                return behaviour(request, context)
            finally:
                slot.release()

        return limited
