"""The shutdown's view of calls in flight, on a real gRPC server."""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any

import grpc
import pytest

from server.interceptors import InFlight


def _echo_server(in_flight: InFlight, entered: threading.Event, release: threading.Event) -> tuple[grpc.Server, str]:
    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        entered.set()
        release.wait(30)
        return request

    handlers = grpc.method_handlers_generic_handler("t.Echo", {"Slow": grpc.unary_unary_rpc_method_handler(slow)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[in_flight])
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_a_call_in_progress_is_waited_for_and_new_calls_after_close_are_refused() -> None:
    in_flight, entered, release = InFlight(), threading.Event(), threading.Event()
    server, address = _echo_server(in_flight, entered, release)
    try:
        with grpc.insecure_channel(address) as channel:
            call: Any = channel.unary_unary("/t.Echo/Slow")
            pending = call.future(b"first", timeout=30)
            assert entered.wait(30)
            in_flight.close()
            assert not in_flight.wait_idle(0.05)  # the first call still runs
            with pytest.raises(grpc.RpcError) as refused:
                call(b"late", timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (refused.value.details() or "")
            release.set()
            assert pending.result() == b"first"
            assert in_flight.wait_idle(30)
    finally:
        release.set()
        server.stop(0)
