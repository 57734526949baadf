"""Every kind of bad input gets a clear status and message, changes nothing,
and the server keeps serving. Streams are built by hand with the generated stub
where the SDK would refuse to produce them."""

from __future__ import annotations

import uuid
import grpc
import numpy as np
import pytest

from client_sdk import Client, JobNotFound, NotAcceptedNow, UpdateRejected
from proto import tributary_pb2 as pb
from proto import tributary_pb2_grpc as pb_grpc
from proto.tensors import header_to_pb, iter_chunks, specs_of
from proto.secagg import shamir
from server import JobConfig, ServerConfig, StrategyConfig
from server.app import RunningServer, running_server
from server.config import SecAggConfig, StalenessConfig
from tests.conftest import small_model

FEDASYNC = StrategyConfig(name="fedasync", alpha=0.5)


def good_delta(scale: float = 0.1) -> dict[str, np.ndarray]:
    return {name: np.full(t.shape, scale, dtype=t.dtype) for name, t in small_model().items()}


def state_of(running: RunningServer, job_id: str = "default") -> tuple[int, int, dict[str, np.ndarray]]:
    job = running.core.job(job_id)
    snapshot = job.snapshot()
    return snapshot.version, job.stats.updates_accepted, {k: v.copy() for k, v in snapshot.tensors.items()}


def assert_unchanged(before: tuple[int, int, dict[str, np.ndarray]], running: RunningServer) -> None:
    version, accepted, tensors = state_of(running)
    assert (version, accepted) == before[:2]
    for name, values in before[2].items():
        np.testing.assert_array_equal(tensors[name], values)


def assert_still_serving(running: RunningServer) -> None:
    """A well-formed push after the bad one is accepted and applied."""
    with Client(running.address, insecure=True) as client:
        pulled = client.pull()
        result = client.push(pulled.version, good_delta(), num_samples=1)
    assert result.version_after == pulled.version + 1


def raw_push(running: RunningServer, messages: list[pb.PushRequest]) -> grpc.RpcError:
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.TributaryStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Push(iter(messages), timeout=10)
    return caught.value


def update_message(tensors: dict[str, np.ndarray], *, base_version: int = 0, job_id: str = "default") -> pb.PushRequest:
    return pb.PushRequest(
        update=pb.UpdateHeader(
            job_id=job_id,
            client_id="raw",
            idempotency_key=uuid.uuid4().hex,
            base_version=base_version,
            num_samples=1,
            header=header_to_pb(specs_of(tensors)),
        )
    )


def chunk_messages(tensors: dict[str, np.ndarray], chunk_bytes: int = 16) -> list[pb.PushRequest]:
    return [pb.PushRequest(chunk=pb.Chunk(data=c)) for c in iter_chunks(tensors.values(), chunk_bytes)]


@pytest.fixture
def running(serve) -> RunningServer:  # type: ignore[no-untyped-def]
    return serve(JobConfig(strategy=FEDASYNC, max_staleness=2, max_update_bytes=4096))


def check_refused(running: RunningServer, push, error_type: type[Exception], *fragments: str) -> None:  # type: ignore[no-untyped-def]
    before = state_of(running)
    with Client(running.address, insecure=True) as client, pytest.raises(error_type) as caught:
        push(client)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert_unchanged(before, running)
    assert_still_serving(running)


def test_unknown_tensor_name(running: RunningServer) -> None:
    delta = good_delta() | {"layer.extra": np.zeros(2, np.float32)}
    check_refused(running, lambda c: c.push(0, delta), UpdateRejected, "unknown tensor name", "layer.extra")


def test_missing_tensor(running: RunningServer) -> None:
    delta = {"layer.weight": good_delta()["layer.weight"]}
    check_refused(running, lambda c: c.push(0, delta), UpdateRejected, "lacks tensor", "layer.bias")


def test_tensors_out_of_order(running: RunningServer) -> None:
    delta = dict(reversed(list(good_delta().items())))
    check_refused(running, lambda c: c.push(0, delta), UpdateRejected, "out of order")


def test_wrong_shape(running: RunningServer) -> None:
    delta = good_delta() | {"layer.weight": np.zeros((3, 4), np.float32)}
    check_refused(running, lambda c: c.push(0, delta), UpdateRejected, "'layer.weight' has shape [3, 4]", "[4, 3]")


def test_wrong_dtype(running: RunningServer) -> None:
    delta = good_delta() | {"layer.bias": np.zeros(4, np.float64)}
    check_refused(running, lambda c: c.push(0, delta), UpdateRejected, "dtype float64", "float32")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf(running: RunningServer, bad_value: float) -> None:
    delta = good_delta()
    delta["layer.bias"][2] = bad_value
    check_refused(running, lambda c: c.push(0, delta), UpdateRejected, "'layer.bias'", "NaN or Inf")


def test_truncated_stream(running: RunningServer) -> None:
    before = state_of(running)
    delta = good_delta()
    error = raw_push(running, [update_message(delta), *chunk_messages(delta)[:-1]])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "truncated" in error.details()
    assert_unchanged(before, running)
    assert_still_serving(running)


def test_stream_longer_than_declared(running: RunningServer) -> None:
    before = state_of(running)
    delta = good_delta()
    extra = pb.PushRequest(chunk=pb.Chunk(data=b"\0" * 8))
    error = raw_push(running, [update_message(delta), *chunk_messages(delta), extra])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than the 64 payload bytes" in error.details()
    assert_unchanged(before, running)
    assert_still_serving(running)


def test_chunk_over_one_mib(running: RunningServer) -> None:
    before = state_of(running)
    delta = good_delta()
    huge = pb.PushRequest(chunk=pb.Chunk(data=b"\0" * ((1 << 20) + 1)))
    error = raw_push(running, [update_message(delta), huge])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chunk limit" in error.details()
    assert_unchanged(before, running)
    assert_still_serving(running)


def test_update_over_size_limit(running: RunningServer) -> None:
    """A header promising more than max_update_bytes is refused before any payload is read."""
    before = state_of(running)
    huge = pb.TensorHeader(
        tensors=[pb.TensorSpec(name="layer.weight", dtype=pb.DTYPE_FLOAT32, shape=[1 << 20])],
        payload_bytes=4 << 20,
    )
    message = update_message(good_delta())
    message.update.header.CopyFrom(huge)
    error = raw_push(running, [message])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4194304 bytes exceeds this job's max_update_bytes=4096" in error.details()
    assert_unchanged(before, running)
    assert_still_serving(running)


def test_stream_without_header(running: RunningServer) -> None:
    before = state_of(running)
    error = raw_push(running, chunk_messages(good_delta()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must start with an `update` header" in error.details()
    assert_unchanged(before, running)
    assert_still_serving(running)


def test_second_header_mid_stream(running: RunningServer) -> None:
    before = state_of(running)
    delta = good_delta()
    chunks = chunk_messages(delta)
    error = raw_push(running, [update_message(delta), chunks[0], update_message(delta), *chunks[1:]])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only `chunk` messages" in error.details()
    assert_unchanged(before, running)
    assert_still_serving(running)


def test_header_with_inconsistent_size(running: RunningServer) -> None:
    before = state_of(running)
    message = update_message(good_delta())
    message.update.header.payload_bytes += 4
    error = raw_push(running, [message])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "declares 68 payload bytes but its tensors need 64" in error.details()
    assert_unchanged(before, running)
    assert_still_serving(running)


def test_unknown_job_push(running: RunningServer) -> None:
    before = state_of(running)
    with Client(running.address, insecure=True, job="no-such-job") as client, pytest.raises(JobNotFound) as caught:
        client.push(0, good_delta())
    assert "no job 'no-such-job'" in str(caught.value) and "default" in str(caught.value)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert_unchanged(before, running)
    assert_still_serving(running)


def test_unknown_job_pull_and_info(running: RunningServer) -> None:
    with Client(running.address, insecure=True, job="no-such-job") as client:
        with pytest.raises(JobNotFound):
            client.pull()
        with pytest.raises(JobNotFound):
            client.job_info()
    assert_still_serving(running)


def test_base_version_never_published(running: RunningServer) -> None:
    check_refused(running, lambda c: c.push(7, good_delta()), NotAcceptedNow, "base version 7 was never published", "latest is 0")


def test_update_past_max_staleness(running: RunningServer) -> None:
    with Client(running.address, insecure=True) as client:
        for version in range(3):  # advance the model to version 3 with fresh updates
            client.push(version, good_delta())
    check_refused(running, lambda c: c.push(0, good_delta()), NotAcceptedNow, "3 versions stale", "max_staleness=2")
    assert running.core.job("default").stats.rejected["StaleUpdate"] == 1


def test_duplicate_push_counted_once(running: RunningServer) -> None:
    with Client(running.address, insecure=True) as client:
        first = client.push(0, good_delta(), idempotency_key="update-1")
        before = state_of(running)
        again = client.push(0, good_delta(), idempotency_key="update-1")
    assert not first.duplicate and again.duplicate
    assert (again.version_at_arrival, again.staleness, again.version_after) == (
        first.version_at_arrival,
        first.staleness,
        first.version_after,
    )
    assert_unchanged(before, running)
    assert running.core.job("default").stats.duplicates == 1
    assert_still_serving(running)


def test_idempotency_key_reused_by_other_client(running: RunningServer) -> None:
    with Client(running.address, insecure=True, client_id="a") as client:
        client.push(0, good_delta(), idempotency_key="shared-key")
    with Client(running.address, insecure=True, client_id="b") as other:
        check_refused(running, lambda c: other.push(1, good_delta(), idempotency_key="shared-key"), UpdateRejected, "already used")


def test_overlong_client_id(running: RunningServer) -> None:
    with Client(running.address, insecure=True, client_id="x" * 200) as client:
        check_refused(running, lambda c: client.push(0, good_delta()), UpdateRejected, "client_id is 200 characters")


def test_zero_samples(running: RunningServer) -> None:
    """The SDK refuses this itself; the server must too, for other clients."""
    before = state_of(running)
    message = update_message(good_delta())
    message.update.num_samples = 0
    error = raw_push(running, [message, *chunk_messages(good_delta())])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "num_samples must be between 1 and" in error.details()
    assert_unchanged(before, running)
    assert_still_serving(running)


def test_finite_update_that_would_overflow_the_model(serve) -> None:  # type: ignore[no-untyped-def]
    near_max = {"w": np.full(4, 3e38, np.float32)}
    running = serve(JobConfig(strategy=StrategyConfig(name="fedasync", alpha=1.0)), models={"default": near_max})
    with Client(running.address, insecure=True) as client:
        with pytest.raises(UpdateRejected, match="would overflow tensor 'w'"):
            client.push(0, {"w": np.full(4, 3e38, np.float32)})
        assert client.pull().version == 0
        assert client.push(0, {"w": np.full(4, -1e38, np.float32)}).version_after == 1


def test_unmask_response_naming_a_peer_twice_is_refused_and_kept_nowhere() -> None:
    """Found by tests/fuzz: the server collapsed a peer listed twice in an
    unmasking response (the last blob won), so a response it should refuse
    took the member's place and the cohort aborted. It is now refused with
    INVALID_ARGUMENT before anything is kept, like duplicate sealed shares."""
    from tests.fuzz.cohort import HonestCohort

    model = small_model()
    secure = JobConfig(
        strategy=StrategyConfig(name="fedbuff"),
        staleness=StalenessConfig(kind="constant"),
        secure_aggregation=SecAggConfig(cohort_size=3, forming_timeout_s=30.0, phase_timeout_s=30.0, upload_timeout_s=30.0, clip_bound=64.0),
    )
    size = sum(t.size for t in model.values())
    deltas = [np.random.default_rng(i).uniform(-1, 1, size).astype(np.float32) for i in range(3)]
    config = ServerConfig(address="127.0.0.1:0", jobs=(secure,), insecure=True)
    with running_server(config, {"default": model}, grace_s=0.5) as running, grpc.insecure_channel(running.address) as channel:
        cohort = HonestCohort(channel, "default", 0, deltas, [1, 2, 3])
        while cohort.phase != "unmasking":
            cohort.step()
        own = cohort.refs[0]
        share = pb.SealedShare(peer=own.member, blob=shamir.Share(1, 5).to_bytes())
        for field in ("self_mask_shares", "mask_key_shares"):
            twice = pb.UnmaskResponseMessage(sender=own, **{field: [share, share]})
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.TributaryStub(channel).Unmask(twice, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"member {own.member} appears twice" in caught.value.details()
        cohort.step()  # the member's own answer is still the one that counts
        assert cohort.unmask_outcomes == [1, 1, 1]
        snapshot = running.core.job("default").snapshot()
        for name, expected in cohort.expected_aggregate(model).items():
            np.testing.assert_allclose(snapshot.tensors[name], expected, atol=1e-4)


def test_a_low_order_public_key_is_refused_at_once_and_the_cohort_goes_on() -> None:
    """Found by tests/fuzz: AdvertiseKeys took a low-order X25519 key (32 zero
    bytes), so every neighbour's key agreement failed client-side and the
    cohort died only at its phase deadline. It is now refused on arrival with
    FAILED_PRECONDITION; the member may still advertise a real key."""
    from tests.fuzz.cohort import HonestCohort

    model = small_model()
    secure = JobConfig(
        strategy=StrategyConfig(name="fedbuff"),
        staleness=StalenessConfig(kind="constant"),
        # deadlines far beyond the test: a refusal must come at once, not from a timeout
        secure_aggregation=SecAggConfig(cohort_size=3, forming_timeout_s=30.0, phase_timeout_s=60.0, upload_timeout_s=60.0, clip_bound=64.0),
    )
    size = sum(t.size for t in model.values())
    deltas = [np.random.default_rng(i).uniform(-1, 1, size).astype(np.float32) for i in range(3)]
    config = ServerConfig(address="127.0.0.1:0", insecure=True, jobs=(secure,))
    with running_server(config, {"default": model}, grace_s=0.5) as running, grpc.insecure_channel(running.address) as channel:
        cohort = HonestCohort(channel, "default", 0, deltas, [1, 2, 3])
        cohort.step()  # join
        own = cohort.refs[0]
        real = bytes(range(1, 33))
        for share_key, mask_key, bad in ((bytes(32), real, "share_key"), (real, (1).to_bytes(32, "little"), "mask_key")):
            advert = pb.KeyAdvertMessage(sender=own, share_key=share_key, mask_key=mask_key)
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.TributaryStub(channel).AdvertiseKeys(advert, timeout=5)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"member {own.member}'s {bad} cannot be used: it is a low-order X25519 point" in caught.value.details()
        while not cohort.done:  # the refused adverts took no member's place
            cohort.step()
        assert cohort.unmask_outcomes == [1, 1, 1]
        snapshot = running.core.job("default").snapshot()
        for name, expected in cohort.expected_aggregate(model).items():
            np.testing.assert_allclose(snapshot.tensors[name], expected, atol=1e-4)
