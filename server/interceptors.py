"""gRPC interceptors: checks that run before a handler does.

`AuthInterceptor` asks `server.auth.CallGate` whether the call's credential
lets it reach its handler at all. A refused call is answered by a stand-in
handler that aborts at once, without reading a request: a client stream
(a push of gigabytes) is never consumed, and a unary request is not even
parsed. The per-job checks need the request's job id and happen in the
servicer (`server.auth.Authorizer`).
"""

from __future__ import annotations

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
