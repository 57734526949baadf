"""Many clients at once against one server: counts add up, pulls only ever see
whole versions, and a push whose ack is lost is counted once when retried."""

from __future__ import annotations

import threading

import grpc
import numpy as np

from client_sdk import Client, RetryPolicy
from server import JobConfig, StalenessConfig, StrategyConfig

ONES = {"w": np.ones(50_000, np.float32), "b": np.ones(7, np.float32)}
ZEROS = {name: np.zeros_like(t) for name, t in ONES.items()}


def test_concurrent_pushes_all_counted(serve) -> None:  # type: ignore[no-untyped-def]
    running = serve(JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=4), staleness=StalenessConfig("constant")), models={"default": ZEROS})
    errors: list[BaseException] = []

    def pusher(index: int) -> None:
        try:
            with Client(running.address, insecure=True, client_id=f"c{index}") as client:
                for _ in range(6):
                    client.push(client.pull().version, ONES)
        except BaseException as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=pusher, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    job = running.core.job("default")
    assert job.stats.updates_accepted == 48
    assert job.snapshot().version == 12
    # constant staleness, count normaliser, server_lr 1: each version adds exactly 1.0
    np.testing.assert_array_equal(job.snapshot().tensors["w"], np.full(50_000, 12.0, np.float32))


def test_pulls_never_see_a_half_applied_version(serve) -> None:  # type: ignore[no-untyped-def]
    """fedasync with alpha 1 and delta 1: version v holds exactly v everywhere."""
    running = serve(JobConfig(strategy=StrategyConfig(name="fedasync", alpha=1.0), staleness=StalenessConfig("constant")), models={"default": ZEROS})
    done = threading.Event()
    seen: list[int] = []
    torn: list[int] = []

    def puller() -> None:
        with Client(running.address, insecure=True) as client:
            while not done.is_set():
                model = client.pull()
                seen.append(model.version)
                for tensor in model.tensors.values():
                    if not np.all(tensor == np.float32(model.version)):
                        torn.append(model.version)

    readers = [threading.Thread(target=puller) for _ in range(3)]
    for reader in readers:
        reader.start()
    with Client(running.address, insecure=True) as client:
        for _ in range(40):
            client.push(client.pull().version, ONES)
    done.set()
    for reader in readers:
        reader.join(30)
    assert torn == []
    assert len(set(seen)) > 1  # the readers really overlapped with the writes


class _AckLost(grpc.RpcError):
    """What the SDK sees when the connection drops after the server answered."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset before the ack arrived"


class _DropFirstAck(grpc.StreamUnaryClientInterceptor):
    """Lets the first push reach the server and be applied, then loses its ack."""

    def __init__(self) -> None:
        self.dropped = 0

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        response = continuation(client_call_details, request_iterator)
        if self.dropped == 0 and client_call_details.method.endswith("/Push"):
            response.result()  # the server has taken the update
            self.dropped += 1
            raise _AckLost()
        return response


def test_retried_push_after_lost_ack_is_counted_once(serve) -> None:  # type: ignore[no-untyped-def]
    running = serve(JobConfig(strategy=StrategyConfig(name="fedasync", alpha=1.0), staleness=StalenessConfig("constant")), models={"default": ZEROS})
    interceptor = _DropFirstAck()
    channel = grpc.intercept_channel(grpc.insecure_channel(running.address), interceptor)
    with Client(running.address, channel=channel, retry=RetryPolicy(initial_backoff_s=0.01)) as client:
        result = client.push(0, ONES)
    assert interceptor.dropped == 1
    assert result.duplicate  # the retry got the first ack back
    assert result.version_after == 1
    job = running.core.job("default")
    assert job.stats.updates_accepted == 1
    assert job.snapshot().version == 1
    np.testing.assert_array_equal(job.snapshot().tensors["w"], ONES["w"])
