"""Several client processes against a real server on loopback, in an arrival
order the test dictates, so the final model can be checked exactly against an
aggregate computed by hand (the formulas are written out here, not imported
from the server)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
from collections.abc import Iterator

import numpy as np
import pytest

from client_sdk import Client
from server import JobConfig, StalenessConfig, StrategyConfig
from server.app import RunningServer
from tests.conftest import small_model

CONTEXT = multiprocessing.get_context("spawn")


def make_delta(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    return {name: rng.standard_normal(t.shape).astype(np.float32) for name, t in small_model().items()}


def client_process(address: str, client_id: str, conn: multiprocessing.connection.Connection) -> None:
    """Obeys commands from the test: ("pull",), ("push", seed, num_samples), ("stop",)."""
    with Client(address, insecure=True, client_id=client_id) as client:
        base = None
        while True:
            command = conn.recv()
            try:
                if command[0] == "pull":
                    base = client.pull().version
                    conn.send(base)
                elif command[0] == "push":
                    result = client.push(base, make_delta(command[1]), num_samples=command[2])
                    conn.send((result.version_at_arrival, result.staleness, result.version_after))
                else:
                    return
            except Exception as error:  # sent back so the test shows it
                conn.send(error)


class Fleet:
    def __init__(self, address: str, names: list[str]) -> None:
        self._pipes = {}
        self._processes = []
        for name in names:
            ours, theirs = CONTEXT.Pipe()
            process = CONTEXT.Process(target=client_process, args=(address, name, theirs), daemon=True)
            process.start()
            self._pipes[name] = ours
            self._processes.append(process)

    def ask(self, name: str, *command: object) -> object:
        self._pipes[name].send(command)
        if not self._pipes[name].poll(60):
            raise TimeoutError(f"client {name} did not answer {command}")
        answer = self._pipes[name].recv()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self) -> None:
        for pipe in self._pipes.values():
            pipe.send(("stop",))
        for process in self._processes:
            process.join(10)
            assert process.exitcode == 0


@pytest.fixture
def fleet_factory() -> Iterator:  # type: ignore[type-arg]
    fleets: list[Fleet] = []

    def make(running: RunningServer, names: list[str]) -> Fleet:
        fleets.append(Fleet(running.address, names))
        return fleets[-1]

    yield make
    for fleet in fleets:
        fleet.close()


def current(running: RunningServer) -> dict[str, np.ndarray]:
    return dict(running.core.job("default").snapshot().tensors)


def test_fedasync_exact_aggregate(serve, fleet_factory) -> None:  # type: ignore[no-untyped-def]
    alpha = 0.5
    running = serve(JobConfig(strategy=StrategyConfig(name="fedasync", alpha=alpha), staleness=StalenessConfig("polynomial", a=0.5)))
    fleet = fleet_factory(running, ["a", "b", "c"])
    x = small_model()
    for name in "abc":
        assert fleet.ask(name, "pull") == 0
    # (client, seed, expected staleness) in arrival order
    arrivals = []
    arrivals.append(("a", 1, 0, fleet.ask("a", "push", 1, 10)))
    arrivals.append(("b", 2, 1, fleet.ask("b", "push", 2, 10)))
    assert fleet.ask("a", "pull") == 2
    arrivals.append(("c", 3, 2, fleet.ask("c", "push", 3, 10)))
    arrivals.append(("a", 4, 1, fleet.ask("a", "push", 4, 10)))
    for index, (_, seed, tau, ack) in enumerate(arrivals):
        assert ack == (index, tau, index + 1)
        weight = (1 + tau) ** -0.5  # polynomial, a = 0.5
        d = make_delta(seed)
        x = {name: x[name] + np.float32(alpha * weight) * d[name] for name in x}
    served = current(running)
    for name in x:
        np.testing.assert_array_equal(served[name], x[name])


def test_fedbuff_exact_aggregate(serve, fleet_factory) -> None:  # type: ignore[no-untyped-def]
    strategy = StrategyConfig(name="fedbuff", buffer_size=2, server_lr=0.8, weight_by_samples=True, normalizer="weight_sum")
    running = serve(JobConfig(strategy=strategy, staleness=StalenessConfig("hinge", a=1.0, b=0.0)))
    fleet = fleet_factory(running, ["a", "b", "c"])
    for name in "abc":
        fleet.ask(name, "pull")
    x = small_model()
    # buffer 1: a (tau 0, 10 samples), b (tau 0, 30 samples) -> version 1
    assert fleet.ask("a", "push", 1, 10) == (0, 0, 0)
    assert fleet.ask("b", "push", 2, 30) == (0, 0, 1)
    buffer = [(1, 1.0 * 10), (2, 1.0 * 30)]
    acc = {n: sum(np.float64(w) * make_delta(s)[n].astype(np.float64) for s, w in buffer) for n in x}
    x = {n: (x[n].astype(np.float64) + (0.8 / 40.0) * acc[n]).astype(np.float32) for n in x}
    # buffer 2: c (base 0, tau 1: hinge s = 1/(1*(1-0)+1) = 0.5, 20 samples), a (fresh pull, tau 0, 5 samples)
    assert fleet.ask("c", "push", 3, 20) == (1, 1, 1)
    assert fleet.ask("a", "pull") == 1
    assert fleet.ask("a", "push", 4, 5) == (1, 0, 2)
    buffer = [(3, 0.5 * 20), (4, 1.0 * 5)]
    acc = {n: sum(np.float64(w) * make_delta(s)[n].astype(np.float64) for s, w in buffer) for n in x}
    x = {n: (x[n].astype(np.float64) + (0.8 / 15.0) * acc[n]).astype(np.float32) for n in x}
    served = current(running)
    for name in x:
        np.testing.assert_array_equal(served[name], x[name])


def test_fedavg_rounds_exact_and_late_update_refused(serve, fleet_factory) -> None:  # type: ignore[no-untyped-def]
    running = serve(JobConfig(strategy=StrategyConfig(name="fedavg", clients_per_round=2)))
    fleet = fleet_factory(running, ["a", "b", "late"])
    for name in ("a", "b", "late"):
        fleet.ask(name, "pull")
    x = small_model()
    assert fleet.ask("a", "push", 1, 10) == (0, 0, 0)
    assert fleet.ask("b", "push", 2, 30) == (0, 0, 1)
    acc = {n: 10 * make_delta(1)[n].astype(np.float64) + 30 * make_delta(2)[n].astype(np.float64) for n in x}
    x = {n: (x[n].astype(np.float64) + (1.0 / 40.0) * acc[n]).astype(np.float32) for n in x}
    with pytest.raises(Exception, match="round 0 closed"):
        fleet.ask("late", "push", 3, 10)
    served = current(running)
    for name in x:
        np.testing.assert_array_equal(served[name], x[name])


def train_tiny(model, device) -> int:  # type: ignore[no-untyped-def]
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    return 8


def fit_process(address: str, client_id: str, updates: int, queue) -> None:  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    model.weight.data.zero_()
    model.bias.data.zero_()
    with Client(address, insecure=True, client_id=client_id) as client:
        summary = client.fit(model, train_tiny, updates=updates, device="cpu")
    queue.put((summary.updates_pushed, summary.updates_refused, summary.last_version))


def test_high_level_fit_in_synchronous_rounds(serve) -> None:  # type: ignore[no-untyped-def]
    """Two processes run client.fit with torch; fedavg rounds of both clients,
    each adding 0.01 to every weight: after 3 rounds the model is 0.03."""
    zeros = {"weight": np.zeros((4, 3), np.float32), "bias": np.zeros(4, np.float32)}
    running = serve(JobConfig(strategy=StrategyConfig(name="fedavg", clients_per_round=2)), models={"default": zeros})
    queue = CONTEXT.Queue()
    processes = [CONTEXT.Process(target=fit_process, args=(running.address, f"c{i}", 3, queue)) for i in range(2)]
    for process in processes:
        process.start()
    results = [queue.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    assert sorted(r[0] for r in results) == [3, 3]
    served = current(running)
    assert running.core.job("default").snapshot().version == 3
    np.testing.assert_allclose(served["weight"], 0.03, rtol=1e-5)
    np.testing.assert_allclose(served["bias"], 0.03, rtol=1e-5)


def test_hundred_million_parameters_both_ways(serve) -> None:
    """400 MB each way through 1 MiB chunks, with gRPC's default 4 MiB limit."""
    count = 100_000_000
    model = {"big": np.zeros(count, np.float32)}
    running = serve(JobConfig(strategy=StrategyConfig(name="fedasync", alpha=1.0), staleness=StalenessConfig("constant")), models={"default": model})
    del model
    with Client(running.address, insecure=True) as client:
        pulled = client.pull()
        assert pulled.tensors["big"].shape == (count,)
        delta = {"big": np.arange(count, dtype=np.float32) % 7}
        del pulled
        result = client.push(0, delta, num_samples=1)
        assert result.version_after == 1
        again = client.pull()
    np.testing.assert_array_equal(again.tensors["big"][:14], np.arange(14, dtype=np.float32) % 7)
    np.testing.assert_array_equal(again.tensors["big"], delta["big"])
