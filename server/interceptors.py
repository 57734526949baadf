"""gRPC interceptors: checks that run before a handler does.

`AuthInterceptor` asks `server.auth.CallGate` whether the call's credential
lets it reach its handler at all. A refused call is answered by a stand-in
handler that aborts at once, without reading a request: a client stream
(a push of gigabytes) is never consumed, and a unary request is not even
parsed. The per-job checks need the request's job id and happen in the
servicer (`server.auth.Authorizer`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc

from server.auth import CallGate
from server.errors import NotAuthenticated, PermissionDenied
from server.servicer import status_code_for


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type hints
    def __init__(self, gate: CallGate) -> None:
        self._gate = gate

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:  # no such method: gRPC answers UNIMPLEMENTED
            return None
        try:
            self._gate.check(details.method, details.invocation_metadata)
        except (NotAuthenticated, PermissionDenied) as error:
            code = status_code_for(error)
            assert code is not None
            return _refusal(handler, code, str(error))
        return handler


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with `code`. No
    request deserializer: whatever the caller sent stays unread bytes."""

    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, details)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class InFlight(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type hints
    """Counts the RPCs in progress, health checks aside, so that a shutdown
    can wait for the work in flight and then end what is left (a load
    balancer's health Watch stream never ends by itself) without sitting out
    the whole grace period.

    A call counts from the moment gRPC picks its handler, not from when a
    worker thread starts it: on a busy machine a call can wait in the pool's
    queue, and a shutdown that looked only at running calls would cancel it.
    Once `close` is called, new calls are refused with UNAVAILABLE, so nothing
    slips in between the health service turning NOT_SERVING and gRPC itself
    refusing calls."""

    def __init__(self) -> None:
        self._count = 0
        self._closed = False
        self._idle = threading.Condition()

    def close(self) -> None:
        with self._idle:
            self._closed = True

    def wait_idle(self, timeout_s: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout=timeout_s)

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith("/grpc.health."):
            return handler
        with self._idle:
            if self._closed:
                return _refusal(handler, grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry once it is back")
            self._count += 1
        return _counted(handler, self)

    def _done(self) -> None:
        with self._idle:
            self._count -= 1
            self._idle.notify_all()


def _counted(handler: grpc.RpcMethodHandler, in_flight: InFlight) -> grpc.RpcMethodHandler:
    """`handler`, telling `in_flight` when its behaviour is over. (A unary
    call whose client gave up before its request arrived never runs: it
    stays counted, and a shutdown then waits out the grace period.)"""

    def unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behaviour(request, context)
            finally:
                in_flight._done()

        return run

    def streaming(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from behaviour(request, context)
            finally:
                in_flight._done()

        return run

    wrap = streaming if handler.response_streaming else unary
    if handler.request_streaming and handler.response_streaming:
        make, behaviour = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    elif handler.request_streaming:
        make, behaviour = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    elif handler.response_streaming:
        make, behaviour = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    else:
        make, behaviour = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    return make(wrap(behaviour), request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
