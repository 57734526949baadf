"""SIGTERM as an operator sends it: health turns NOT_SERVING, new work is
refused, the push in flight finishes and is acknowledged, the state is written,
the process exits 0 within its grace period, and a restart resumes."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client_sdk import Client, RetryPolicy
from proto import tributary_pb2 as pb
from proto import tributary_pb2_grpc as pb_grpc
from proto.tensors import header_to_pb, iter_chunks, specs_of
from server.models import save_model
from tests.e2e.test_cli import start_server

MODEL = {"w": np.zeros((512, 1024), np.float32)}  # 2 MiB: a push of two chunks


def test_sigterm_drains_in_flight_work_saves_state_and_exits_zero(tmp_path: Path) -> None:
    save_model(tmp_path / "m.safetensors", MODEL)
    state = tmp_path / "state"
    args = ("--insecure", "--initial-model", str(tmp_path / "m.safetensors"), "--buffer-size", "2", "--state-dir", str(state), "--grace-period", "20")
    server, address = start_server(*args)
    release = threading.Event()
    sent_first_chunk = threading.Event()
    ack: list[pb.PushAck] = []
    health_seen: list[int] = []
    try:
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.TributaryStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        health_seen.append(next(watch).status)

        delta = {"w": np.full((512, 1024), 0.5, np.float32)}
        header = pb.UpdateHeader(job_id="default", client_id="slow", idempotency_key="in-flight", base_version=0, num_samples=1, header=header_to_pb(specs_of(delta)))

        def requests() -> Iterator[pb.PushRequest]:
            yield pb.PushRequest(update=header)
            chunks = list(iter_chunks(delta.values()))
            yield pb.PushRequest(chunk=pb.Chunk(data=chunks[0]))
            sent_first_chunk.set()
            release.wait(30)  # the server gets SIGTERM while this stream is open
            for data in chunks[1:]:
                yield pb.PushRequest(chunk=pb.Chunk(data=data))

        pusher = threading.Thread(target=lambda: ack.append(stub.Push(requests(), timeout=60)))
        pusher.start()
        assert sent_first_chunk.wait(30)
        time.sleep(1.0)  # for the header to reach the server, which counts the call from then on
        server.send_signal(signal.SIGTERM)
        health_seen.append(next(watch).status)  # the watch stream in flight hears it first
        with Client(address, retry=RetryPolicy(max_attempts=1), insecure=True) as late, pytest.raises(Exception) as refused:
            late.pull()
        assert getattr(refused.value, "code", None) == grpc.StatusCode.UNAVAILABLE
        release.set()
        pusher.join(30)
        output, _ = server.communicate(timeout=60)
        channel.close()
    finally:
        release.set()
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert health_seen == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
    assert ack and ack[0].version_after == 0 and not ack[0].duplicate  # the in-flight push finished and was acked
    assert server.returncode == 0, output
    assert "shutting down (grace period 20s)" in output and f"state saved in {state}" in output
    assert "grace period of 20s ran out" not in output  # it ended when the work did, not on the clock

    restarted, address = start_server(*args)
    try:
        with Client(address, client_id="slow", insecure=True) as client:
            again = client.push(0, delta, idempotency_key="in-flight")
            assert again.duplicate  # the acknowledged update survived the shutdown
            client.push(0, delta, idempotency_key="second")
            assert client.pull().version == 1
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.communicate(timeout=30)
    assert restarted.returncode == 0
