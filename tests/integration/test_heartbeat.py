"""Heartbeats over real gRPC: the ack, the roster they fill, every bad request
refused with a clear status (and nothing changed), and fit()'s heartbeats,
which never fail training."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from client_sdk import Client, ClientState, JobNotFound, LimitExceeded, NotAcceptedNow
from proto import tributary_pb2 as pb
from proto import tributary_pb2_grpc as pb_grpc
from server import JobConfig, StrategyConfig
from server.app import RunningServer
from server.roster import ClientState as RosterState
from server.roster import ClientPresence, Roster

FEDASYNC = StrategyConfig(name="fedasync", alpha=0.5)


@pytest.fixture
def running(serve) -> RunningServer:  # type: ignore[no-untyped-def]
    return serve(JobConfig(strategy=FEDASYNC, heartbeat_interval_s=2.5))


def roster_of(running: RunningServer) -> Roster:
    return running.core.job("default").roster


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_heartbeat_acks_with_version_time_and_interval(running: RunningServer) -> None:
    with Client(running.address, client_id="phone-1", insecure=True) as client:
        before_ms = time.time_ns() // 1_000_000
        reply = client.heartbeat("training")
        after_ms = time.time_ns() // 1_000_000
    assert reply.version == 0
    assert reply.next_heartbeat_s == 2.5
    assert before_ms - 1000 <= reply.server_time_ms <= after_ms + 1000
    entry = roster_of(running).get("phone-1")
    assert entry is not None
    assert (entry.state, entry.base_version, entry.heartbeats) == (RosterState.TRAINING, 0, 1)


def test_heartbeat_reports_new_versions_and_the_pulled_one(running: RunningServer) -> None:
    with Client(running.address, client_id="phone-2", insecure=True) as client:
        pulled = client.pull()
        delta = {name: np.full_like(t, 0.1) for name, t in pulled.tensors.items()}
        client.push(pulled.version, delta)
        reply = client.heartbeat(ClientState.IDLE)
        assert reply.version == 1  # a new model: the client learns it without pulling
        assert roster_of(running).get("phone-2").base_version == 0  # type: ignore[union-attr]
        client.pull()
        client.heartbeat("IDLE")  # states are case-insensitive strings or ClientState
    assert roster_of(running).get("phone-2").base_version == 1  # type: ignore[union-attr]
    assert roster_of(running).connected_clients(roster_of(running).clock(), 60) == 1


def raw_heartbeat(running: RunningServer, request: pb.HeartbeatRequest) -> grpc.RpcError:
    with grpc.insecure_channel(running.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.TributaryStub(channel).Heartbeat(request, timeout=10)
    return caught.value


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ({"client_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "client_id is empty"),
        ({"client_id": "x" * 129}, grpc.StatusCode.INVALID_ARGUMENT, "client_id is 129 characters long; at most 128"),
        ({"job_id": "nope"}, grpc.StatusCode.NOT_FOUND, "no job 'nope' on this server; it runs: default"),
        ({"state": pb.CLIENT_STATE_UNSPECIFIED}, grpc.StatusCode.INVALID_ARGUMENT, "state 0 is not one of IDLE"),
        ({"state": 42}, grpc.StatusCode.INVALID_ARGUMENT, "state 42 is not one of IDLE"),
        ({"base_version": 7}, grpc.StatusCode.FAILED_PRECONDITION, "base version 7 was never published"),
    ],
)
def test_bad_heartbeats_are_refused_and_change_nothing(running: RunningServer, fields: dict[str, object], code: grpc.StatusCode, message: str) -> None:
    request = pb.HeartbeatRequest(job_id="default", client_id="phone", state=pb.CLIENT_STATE_IDLE, base_version=0)
    for name, value in fields.items():
        setattr(request, name, value)
    error = raw_heartbeat(running, request)
    assert error.code() == code
    assert message in (error.details() or "")
    assert len(roster_of(running)) == 0
    with Client(running.address, insecure=True) as client:  # still serving
        assert client.heartbeat().version == 0
    assert len(roster_of(running)) == 1


def test_sdk_heartbeat_errors_are_typed(running: RunningServer) -> None:
    with Client(running.address, job="nope", insecure=True) as client, pytest.raises(JobNotFound, match="heartbeat on job 'nope'"):
        client.heartbeat()
    with Client(running.address, insecure=True) as client:
        with pytest.raises(NotAcceptedNow, match="base version 3 was never published"):
            client.heartbeat(base_version=3)
        with pytest.raises(ValueError, match="state must be one of idle, training, uploading, got 'sleeping'"):
            client.heartbeat("sleeping")
        with pytest.raises(ValueError, match="base_version must be >= 0"):
            client.heartbeat(base_version=-1)
    assert len(roster_of(running)) == 0


def test_full_roster_is_resource_exhausted_for_new_clients_only(serve) -> None:  # type: ignore[no-untyped-def]
    running = serve(JobConfig(strategy=FEDASYNC, roster_max_clients=2))
    with Client(running.address, client_id="a", insecure=True) as a, Client(running.address, client_id="b", insecure=True) as b:
        a.heartbeat()
        b.heartbeat()
        with Client(running.address, client_id="c", insecure=True) as c, pytest.raises(LimitExceeded, match="already tracks 2 clients") as caught:
            c.heartbeat()
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert a.heartbeat("training").version == 0  # known clients keep beating
    assert {c.client_id for c in roster_of(running).clients()} == {"a", "b"}


# -- fit() ---------------------------------------------------------------------------------


def zero_model() -> dict[str, np.ndarray]:
    return {"weight": np.zeros((4, 3), np.float32), "bias": np.zeros(4, np.float32)}


def linear() -> object:
    import torch

    model = torch.nn.Linear(3, 4)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    return model


def state_becomes(running: RunningServer, client_id: str, state: RosterState) -> Callable[[], bool]:
    def check() -> bool:
        entry: ClientPresence | None = roster_of(running).get(client_id)
        return entry is not None and entry.state is state

    return check


def test_fit_reports_training_uploading_then_idle(serve) -> None:  # type: ignore[no-untyped-def]
    running = serve(JobConfig(strategy=FEDASYNC), models={"default": zero_model()})
    seen: list[str] = []

    def train(model, device) -> int:  # type: ignore[no-untyped-def]
        import torch

        wait_for(state_becomes(running, "fitter", RosterState.TRAINING))  # said before training, while it lasts
        seen.append("training")
        with torch.no_grad():
            model.weight.add_(0.01)
        return 4

    def on_push(result) -> None:  # type: ignore[no-untyped-def]
        wait_for(state_becomes(running, "fitter", RosterState.UPLOADING))  # said before the push
        seen.append("uploading")

    with Client(running.address, client_id="fitter", insecure=True) as client:
        summary = client.fit(linear(), train, updates=2, device="cpu", on_push=on_push)
        assert summary.updates_pushed == 2
        entry = roster_of(running).get("fitter")  # fit said IDLE before returning
        assert entry is not None and entry.state is RosterState.IDLE
        assert entry.base_version == client.last_pulled_version
        assert entry.heartbeats >= 5  # at least: start, 2 x (training, uploading), idle
    assert seen == ["training", "uploading"] * 2


def test_fit_keeps_beating_during_a_long_local_round(serve) -> None:  # type: ignore[no-untyped-def]
    running = serve(JobConfig(strategy=FEDASYNC, heartbeat_interval_s=0.05, roster_expiry_s=1.0), models={"default": zero_model()})

    def slow_train(model, device) -> int:  # type: ignore[no-untyped-def]
        wait_for(state_becomes(running, "slow", RosterState.TRAINING))
        first = roster_of(running).get("slow").heartbeats  # type: ignore[union-attr]
        wait_for(lambda: roster_of(running).get("slow").heartbeats >= first + 3)  # type: ignore[union-attr]
        return 1

    with Client(running.address, client_id="slow", insecure=True) as client:
        assert client.fit(linear(), slow_train, updates=1, device="cpu").updates_pushed == 1


def test_fit_trains_on_when_heartbeats_are_refused(serve) -> None:  # type: ignore[no-untyped-def]
    """The roster is full of another client, so every heartbeat of fit() is
    RESOURCE_EXHAUSTED; training and pushing go on as if nothing happened."""
    running = serve(JobConfig(strategy=FEDASYNC, roster_max_clients=1), models={"default": zero_model()})

    def train(model, device) -> int:  # type: ignore[no-untyped-def]
        import torch

        with torch.no_grad():
            model.bias.add_(1.0)
        return 1

    with Client(running.address, client_id="squatter", insecure=True) as squatter:
        squatter.heartbeat()
    with Client(running.address, client_id="refused", insecure=True) as client:
        summary = client.fit(linear(), train, updates=3, device="cpu")
    assert summary.updates_pushed == 3
    assert running.core.job("default").stats.updates_accepted == 3
    assert roster_of(running).get("refused") is None
    assert roster_of(running).refused >= 1


def test_fit_trains_against_a_server_without_heartbeats(caplog: pytest.LogCaptureFixture) -> None:
    """A server from before the Heartbeat RPC answers UNIMPLEMENTED: fit asks
    once, says so in the log, and trains as before."""
    import logging
    from concurrent import futures

    from server.core import AggregationCore, Job
    from server.servicer import TributaryServicer

    class OlderServicer(TributaryServicer):
        Heartbeat = pb_grpc.TributaryServicer.Heartbeat  # the generated default: UNIMPLEMENTED

    core = AggregationCore([Job(JobConfig(strategy=FEDASYNC), zero_model())])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_TributaryServicer_to_server(OlderServicer(core), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with caplog.at_level(logging.INFO, logger="client_sdk._presence"), Client(f"127.0.0.1:{port}", insecure=True) as client:
            summary = client.fit(linear(), lambda model, device: 1, updates=2, device="cpu")
    finally:
        server.stop(0.5).wait()
    assert summary.updates_pushed == 2
    assert core.job("default").stats.updates_accepted == 2
    assert [r.getMessage() for r in caplog.records if "takes no heartbeats" in r.getMessage()] == [
        f"server at 127.0.0.1:{port} takes no heartbeats; training goes on without them"
    ]
