"""Federated evaluation with a real server and SDK clients: reports are
aggregated per version (example-weighted), a retry counts once, every bad
report gets its status and changes nothing, and with a state directory the
results survive a restart."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import numpy as np
import pytest

from client_sdk import Client, JobNotFound, NotAcceptedNow, RetryPolicy, TributaryError
from proto import tributary_pb2 as pb
from proto import tributary_pb2_grpc as pb_grpc
from server import JobConfig, ServerConfig, StrategyConfig
from server.app import running_server
from tests.conftest import small_model

FAST = RetryPolicy(max_attempts=2, initial_backoff_s=0.05)


def config(state_dir: Path | None = None) -> ServerConfig:
    job = JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=1))
    return ServerConfig(address="127.0.0.1:0", jobs=(job,), state_dir=state_dir, insecure=True)


def one_update(client: Client) -> int:
    model = client.pull()
    delta = {name: np.full(t.shape, 0.1, dtype=t.dtype) for name, t in model.tensors.items()}
    return client.push(model.version, delta, num_samples=5).version_after


def test_reports_aggregate_per_version_and_bad_ones_change_nothing(tmp_path: Path) -> None:
    with running_server(config(tmp_path), {"default": small_model()}, grace_s=0.5) as running:
        with Client(running.address, "default", client_id="a", insecure=True, retry=FAST) as a, \
                Client(running.address, "default", client_id="b", insecure=True, retry=FAST) as b:  # fmt: skip
            assert one_update(a) == 1
            first = a.report_evaluation(1, {"accuracy": 0.5, "loss": 2.0}, num_examples=10, idempotency_key="a-1")
            assert (first.version, first.reports_for_version, first.duplicate) == (1, 1, False)
            again = a.report_evaluation(1, {"accuracy": 0.5, "loss": 2.0}, num_examples=10, idempotency_key="a-1")
            assert again.duplicate and again.reports_for_version == 1
            assert b.report_evaluation(1, {"accuracy": 0.9, "loss": 1.0}, num_examples=30).reports_for_version == 2
            job = running.core.job("default")
            expected = {"federated_accuracy": 0.8, "federated_loss": 1.25, "federated_clients": 2.0, "federated_examples": 40.0}
            assert job.stats.evaluations[-1][0] == 1
            assert job.stats.evaluations[-1][2] == pytest.approx(expected)
            before = list(job.stats.evaluations)

            with grpc.insecure_channel(running.address) as channel:
                stub = pb_grpc.TributaryStub(channel)

                def code(**fields: object) -> grpc.StatusCode:
                    request = pb.EvaluationReport(
                        **{"job_id": "default", "client_id": "c", "version": 1, "num_examples": 5, "metrics": {"accuracy": 0.1}, "idempotency_key": "x", **fields}
                    )
                    with pytest.raises(grpc.RpcError) as caught:
                        stub.ReportEvaluation(request, timeout=5)
                    assert caught.value.details()
                    return caught.value.code()

                IA = grpc.StatusCode.INVALID_ARGUMENT
                assert code(job_id="nope") == grpc.StatusCode.NOT_FOUND
                assert code(version=2) == grpc.StatusCode.FAILED_PRECONDITION
                assert code(num_examples=0) == IA
                assert code(metrics={"accuracy": math.nan}) == IA
                assert code(metrics={"accuracy": math.inf}) == IA
                assert code(metrics={"accuracy": 1e300}) == IA
                assert code(metrics={}) == IA
                assert code(metrics={f"m{i}": 1.0 for i in range(33)}) == IA
                assert code(metrics={"no spaces": 1.0}) == IA
                assert code(client_id="") == IA
                assert code(client_id="c" * 200) == IA
                assert code(idempotency_key="") == IA
                assert code(client_id="a", idempotency_key="a-1", num_examples=99) == IA  # the key of another report
            assert list(job.stats.evaluations) == before
            with pytest.raises(NotAcceptedNow, match="unknown version"):
                b.report_evaluation(7, {"accuracy": 0.1}, num_examples=1)
            with pytest.raises(ValueError, match="num_examples"):
                b.report_evaluation(1, {"accuracy": 0.1}, num_examples=0)
            with Client(running.address, "nope", client_id="a", insecure=True, retry=FAST) as lost, pytest.raises(JobNotFound):
                lost.report_evaluation(0, {"accuracy": 0.1}, num_examples=1)
            # a later report by the same client replaces its earlier one
            a.report_evaluation(1, {"accuracy": 0.1, "loss": 2.0}, num_examples=10)
            assert job.stats.evaluations[-1][2]["federated_accuracy"] == pytest.approx((0.1 * 10 + 0.9 * 30) / 40)
            assert one_update(b) == 2  # still serving
            body = running.metrics.exposition()[0].decode()
            assert 'tributary_federated_evaluations_total{job="default"} 3.0' in body
            assert 'tributary_model_federated_accuracy{job="default"} 0.7' in body
            stored = list(job.stats.evaluations)

    with running_server(config(tmp_path), {"default": small_model()}, grace_s=0.5) as restarted:
        job = restarted.core.job("default")
        assert list(job.stats.evaluations) == stored
        with Client(restarted.address, "default", client_id="c", insecure=True, retry=FAST) as c:
            assert c.report_evaluation(1, {"accuracy": 0.3}, num_examples=40).reports_for_version == 3
            # a retry of a report taken before the restart still counts once
            with Client(restarted.address, "default", client_id="a", insecure=True, retry=FAST) as a:
                assert a.report_evaluation(1, {"accuracy": 0.5, "loss": 2.0}, num_examples=10, idempotency_key="a-1").duplicate
        assert job.stats.evaluations[-1][2]["federated_accuracy"] == pytest.approx((0.1 * 10 + 0.9 * 30 + 0.3 * 40) / 80)


def test_fit_reports_evaluations_of_the_versions_it_pulls(serve) -> None:  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    running = serve(JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=1)))
    model = torch.nn.Sequential()
    model.add_module("layer", torch.nn.Linear(3, 4))

    def train(m: object, device: object) -> int:
        with torch.no_grad():
            model.layer.weight.add_(0.01)
        return 8

    def evaluate(m: object) -> tuple[int, dict[str, float]]:
        return 20, {"accuracy": float(model.layer.weight.mean())}

    with Client(running.address, "default", client_id="fit", insecure=True, retry=FAST) as client:
        summary = client.fit(model, train, updates=3, evaluate_fn=evaluate, evaluate_every=1)
        with pytest.raises(ValueError, match="evaluate_every"):
            client.fit(model, train, updates=1, evaluate_fn=evaluate, evaluate_every=0)
    assert summary.evaluations_reported >= 3
    evaluated = [(v, m) for v, _, m in running.core.job("default").stats.evaluations if "federated_accuracy" in m]
    assert len(evaluated) == summary.evaluations_reported
    assert all(m["federated_examples"] == 20.0 for _, m in evaluated)
