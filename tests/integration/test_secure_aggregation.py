"""Secure aggregation over real gRPC on loopback: members are SDK clients in
threads, the server runs with a test-only hook that records every vector it
holds during the protocol."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from client_sdk import Client, CohortAborted, NotAcceptedNow
from client_sdk._secure import SecureRound
from proto import tributary_pb2 as pb
from proto import tributary_pb2_grpc as pb_grpc
from server import JobConfig, ServerConfig, StrategyConfig
from server.app import RunningServer, running_server
from proto.secagg.quantize import FixedPoint
from server.config import SecAggConfig

SIZE = 2_000
MODEL = {"w": np.zeros(SIZE - 2, np.float32), "b": np.zeros(2, np.float32)}


def secure_job(**secagg: object) -> JobConfig:
    settings = {"cohort_size": 5, "phase_timeout_s": 3.0, "upload_timeout_s": 3.0, "forming_timeout_s": 1.0, "clip_bound": 64.0}
    settings.update(secagg)
    return JobConfig(strategy=StrategyConfig(name="fedbuff"), secure_aggregation=SecAggConfig(**settings))  # type: ignore[arg-type]


def update_of(member: int) -> np.ndarray:
    return np.random.default_rng(member).uniform(-1, 1, SIZE).astype(np.float32)


def run_members(running: RunningServer, count: int, behaviour: Callable[[int, SecureRound], object]) -> dict[int, object]:
    results: dict[int, object] = {}

    def member(index: int) -> None:
        with Client(running.address, insecure=True, client_id=f"m{index}") as client:
            cohort = SecureRound(client)
            try:
                cohort.start()
                results[index] = behaviour(index, cohort)
            except Exception as error:  # kept for the test to inspect
                results[index] = error

    threads = [threading.Thread(target=member, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def upload(samples: Callable[[int], int] = lambda i: 10 + i) -> Callable[[int, SecureRound], object]:
    return lambda i, cohort: cohort.submit(0, update_of(i), samples(i))


def expected_model(members: list[int], samples: Callable[[int], int] = lambda i: 10 + i) -> np.ndarray:
    """fedbuff over one cohort: x + server_lr * sum(w_i d_i) / sum(w_i), w_i = n_i (fresh updates)."""
    weights = {i: float(samples(i)) for i in members}
    return sum(weights[i] * update_of(i).astype(np.float64) for i in members) / sum(weights.values())


def flat_model(running: RunningServer) -> np.ndarray:
    snapshot = running.core.job("default").snapshot()
    return np.concatenate([snapshot.tensors["w"], snapshot.tensors["b"]]).astype(np.float64)


def test_server_only_ever_holds_masked_vectors_and_gets_the_sum_right() -> None:
    recorded: list[tuple[str, np.ndarray]] = []
    config = ServerConfig(address="127.0.0.1:0", insecure=True, jobs=(secure_job(),))
    with running_server(config, {"default": MODEL}, grace_s=0.5, secagg_observer=lambda label, v: recorded.append((label, v.copy()))) as running:
        results = run_members(running, 5, upload())
        assert all(not isinstance(r, Exception) for r in results.values()), results
        job = running.core.job("default")
        assert job.snapshot().version == 1
        assert job.stats.cohorts_applied == 1
        np.testing.assert_allclose(flat_model(running), expected_model(list(range(5))), atol=1e-4)
    assert [label for label, _ in recorded].count("sum") == 1
    assert len(recorded) == 6  # five masked inputs and the sum
    # No vector the server held is close to any member's update: decoded the way
    # the server decodes the sum, none is within 50% of an update (relative
    # distance), and no masked input even correlates with one.
    fixed = FixedPoint.for_cohort(bits=32, bound=64.0, max_summands=5)
    for label, vector in recorded:
        decoded = fixed.decode(vector)
        for member in range(5):
            update = update_of(member).astype(np.float64)
            for weight in (decoded[-1], 10.0 + member, 1.0):
                candidate = decoded[:-1] / weight if weight else decoded[:-1]
                distance = np.linalg.norm(candidate - update) / np.linalg.norm(update)
                assert distance > 0.5, f"{label} is close to member {member}'s update"
            if label != "sum":
                assert abs(float(np.corrcoef(decoded[:-1], update)[0, 1])) < 0.1, f"{label} correlates with member {member}"


def test_members_dropping_before_upload_leave_the_survivors_sum() -> None:
    config = ServerConfig(address="127.0.0.1:0", insecure=True, jobs=(secure_job(min_survivors=3),))
    with running_server(config, {"default": MODEL}, grace_s=0.5) as running:

        def behaviour(index: int, cohort: SecureRound) -> object:
            if index in (1, 3):
                cohort._setup.join()  # type: ignore[union-attr]  # set up keys, then vanish before uploading
                return "dropped"
            return cohort.submit(0, update_of(index), 10 + index)

        results = run_members(running, 5, behaviour)
        survivors = [i for i in range(5) if i not in (1, 3)]
        assert all(not isinstance(results[i], Exception) for i in survivors), results
        np.testing.assert_allclose(flat_model(running), expected_model(survivors), atol=1e-4)
        assert running.core.job("default").stats.updates_accepted == 3


def test_too_few_survivors_abort_apply_nothing_and_members_rejoin() -> None:
    config = ServerConfig(address="127.0.0.1:0", insecure=True, jobs=(secure_job(min_survivors=4),))
    with running_server(config, {"default": MODEL}, grace_s=0.5) as running:

        def behaviour(index: int, cohort: SecureRound) -> object:
            if index in (0, 1):
                cohort._setup.join()  # type: ignore[union-attr]
                return "dropped"
            return cohort.submit(0, update_of(index), 10)

        results = run_members(running, 5, behaviour)
        for index in (2, 3, 4):
            assert isinstance(results[index], CohortAborted), results[index]
            assert "only 3 members uploaded a masked input; the cohort needs 4" in str(results[index])
        job = running.core.job("default")
        assert job.snapshot().version == 0
        assert job.stats.updates_accepted == 0
        assert sum(job.stats.cohorts_aborted.values()) == 1
        # the members are told why and join a later cohort, which completes
        again = run_members(running, 5, upload(lambda i: 10))
        assert all(not isinstance(r, Exception) for r in again.values()), again
        assert job.snapshot().version == 1


def test_plain_push_to_a_secure_job_is_refused() -> None:
    config = ServerConfig(address="127.0.0.1:0", insecure=True, jobs=(secure_job(),))
    with running_server(config, {"default": MODEL}, grace_s=0.5) as running, Client(running.address, insecure=True) as client:
        with pytest.raises(NotAcceptedNow, match="runs secure aggregation"):
            client.push(0, {k: np.zeros_like(v) for k, v in MODEL.items()})
        assert client.job_info().secure_aggregation


def test_cohort_rpcs_with_a_wrong_token_or_length_are_refused() -> None:
    config = ServerConfig(address="127.0.0.1:0", insecure=True, jobs=(secure_job(cohort_size=3, forming_timeout_s=30.0),))
    with running_server(config, {"default": MODEL}, grace_s=0.5) as running:
        plans: dict[int, pb.CohortPlanMessage] = {}

        def join(i: int) -> None:
            with grpc.insecure_channel(running.address) as channel:
                plans[i] = pb_grpc.TributaryStub(channel).JoinCohort(pb.JoinCohortRequest(job_id="default", client_id=f"c{i}", wait_timeout_ms=10_000))

        threads = [threading.Thread(target=join, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        plan = plans[0]
        assert plan.formed
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.TributaryStub(channel)
            forged = pb.MemberRef(job_id="default", cohort_id=plan.cohort_id, member=plan.member, token=b"x" * 16)
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetUploadSlot(forged)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "did not present its token" in caught.value.details()
            ref = pb.MemberRef(job_id="default", cohort_id=plan.cohort_id, member=plan.member, token=plan.token)
            short = pb.MaskedInputRequest()
            short.chunk.data = bytes(40)
            with pytest.raises(grpc.RpcError) as caught:
                stub.UploadMasked(iter([pb.MaskedInputRequest(header=ref), short]))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"masked input must be {SIZE + 1} uint32 values" in caught.value.details()
            with pytest.raises(grpc.RpcError) as caught:
                stub.Unmask(pb.UnmaskResponseMessage(sender=ref))
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "unmask_response is not accepted in phase advertise_keys" in caught.value.details()
        assert running.core.job("default").snapshot().version == 0


def test_high_level_fit_trains_under_secure_aggregation() -> None:
    """The same client.fit call as in plaintext; three clients, cohorts of 3."""
    import torch

    config = ServerConfig(address="127.0.0.1:0", insecure=True, jobs=(secure_job(cohort_size=3, clip_bound=64.0),))
    zeros = {"weight": np.zeros((4, 3), np.float32), "bias": np.zeros(4, np.float32)}

    def train(model: torch.nn.Module, device: torch.device) -> int:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01)
        return 8

    summaries = {}
    with running_server(config, {"default": zeros}, grace_s=0.5) as running:

        def client_loop(i: int) -> None:
            model = torch.nn.Linear(3, 4)
            with Client(running.address, insecure=True, client_id=f"f{i}") as client:
                summaries[i] = client.fit(model, train, updates=2, device="cpu")

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(s.updates_pushed for s in summaries.values()) == [2, 2, 2]
        snapshot = running.core.job("default").snapshot()
        assert snapshot.version == 2
        np.testing.assert_allclose(snapshot.tensors["weight"], 0.02, atol=1e-4)


def test_member_vanishing_during_key_setup_is_left_out() -> None:
    """A client joins, is placed in the cohort, and never advertises keys: the
    key phase closes at its deadline without it and the others complete."""
    config = ServerConfig(address="127.0.0.1:0", insecure=True, jobs=(secure_job(cohort_size=4, min_survivors=3, phase_timeout_s=2.0),))
    with running_server(config, {"default": MODEL}, grace_s=0.5) as running:
        silent: dict[str, pb.CohortPlanMessage] = {}

        def silent_joiner() -> None:
            with grpc.insecure_channel(running.address) as channel:
                silent["plan"] = pb_grpc.TributaryStub(channel).JoinCohort(
                    pb.JoinCohortRequest(job_id="default", client_id="silent", wait_timeout_ms=20_000)
                )

        joiner = threading.Thread(target=silent_joiner)
        joiner.start()
        results = run_members(running, 3, upload())
        joiner.join(30)
        assert silent["plan"].formed
        assert all(not isinstance(r, Exception) for r in results.values()), results
        np.testing.assert_allclose(flat_model(running), expected_model([0, 1, 2]), atol=1e-4)


def _status_of(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_bad_cohort_requests_get_clear_statuses_and_change_nothing() -> None:
    plain = JobConfig(job_id="plain", strategy=StrategyConfig(name="fedbuff"))
    config = ServerConfig(address="127.0.0.1:0", insecure=True, jobs=(secure_job(cohort_size=3, forming_timeout_s=30.0), plain))
    with running_server(config, {"default": MODEL, "plain": MODEL}, grace_s=0.5) as running:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.TributaryStub(channel)
            cases = [
                (lambda: stub.JoinCohort(pb.JoinCohortRequest(job_id="plain", client_id="c")), grpc.StatusCode.FAILED_PRECONDITION, "does not run secure aggregation"),
                (lambda: stub.JoinCohort(pb.JoinCohortRequest(job_id="nope", client_id="c")), grpc.StatusCode.NOT_FOUND, "no job 'nope'"),
                (lambda: stub.JoinCohort(pb.JoinCohortRequest(job_id="default", client_id="")), grpc.StatusCode.INVALID_ARGUMENT, "client_id is empty"),
                (lambda: stub.GetUploadSlot(pb.MemberRef(job_id="default", cohort_id="ghost", member=1)), grpc.StatusCode.ABORTED, "no cohort 'ghost'"),
                (lambda: stub.UploadMasked(iter([])), grpc.StatusCode.INVALID_ARGUMENT, "must start with a `header`"),
            ]  # fmt: skip
            for call, code, message in cases:
                error = _status_of(call)
                assert error.code() == code, (message, error.details())
                assert message in error.details()

            plans: dict[int, pb.CohortPlanMessage] = {}

            def join(i: int) -> None:
                plans[i] = stub.JoinCohort(pb.JoinCohortRequest(job_id="default", client_id=f"c{i}", wait_timeout_ms=10_000))

            threads = [threading.Thread(target=join, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            plan = plans[0]
            ref = pb.MemberRef(job_id="default", cohort_id=plan.cohort_id, member=plan.member, token=plan.token)
            cases = [
                (lambda: stub.AdvertiseKeys(pb.KeyAdvertMessage(sender=ref, share_key=b"short", mask_key=bytes(32))), "32-byte X25519 keys"),
                (lambda: stub.GetUploadSlot(ref), "uploads are not open"),
                (lambda: stub.ShareKeys(pb.SealedSharesMessage(sender=ref)), "sealed_shares is not accepted in phase advertise_keys"),
            ]
            for call, message in cases:
                error = _status_of(call)
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
                assert message in error.details()
            duplicate = pb.SealedSharesMessage(sender=ref, shares=[pb.SealedShare(peer=2, blob=b"a"), pb.SealedShare(peer=2, blob=b"b")])
            error = _status_of(lambda: stub.ShareKeys(duplicate))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "each receiver may appear once" in error.details()
        assert running.core.job("default").snapshot().version == 0
        # the same server still runs a whole cohort afterwards
        results = run_members(running, 3, upload())
        assert all(not isinstance(r, Exception) for r in results.values()), results
        assert running.core.job("default").snapshot().version == 1
