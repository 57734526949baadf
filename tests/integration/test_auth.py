"""Client authentication and authorization over real gRPC: enrolled clients
with bearer tokens, per-job permissions, revocation, the Admin service.

Every refusal is checked for its status, its message, and that it changed
nothing; after the refusals the server still serves an enrolled client."""

from __future__ import annotations

import contextlib
import hashlib
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client_sdk import (
    AdminClient,
    Client,
    JobNotFound,
    NotAuthenticated,
    PermissionDenied,
    TributaryError,
)
from client_sdk._secure import SecureRound
from proto import tributary_pb2 as pb
from proto import tributary_pb2_grpc as pb_grpc
from proto.tensors import header_to_pb, specs_of
from server import JobConfig, ServerConfig, StrategyConfig
from server.app import RunningServer, running_server
from server.config import SecAggConfig
from tests.conftest import small_model

ADMIN_TOKEN = "trb_admin_" + "k" * 40
FEDBUFF_1 = StrategyConfig(name="fedbuff", buffer_size=1)


def delta(scale: float = 0.1) -> dict[str, np.ndarray]:
    return {name: np.full(t.shape, scale, dtype=t.dtype) for name, t in small_model().items()}


@contextlib.contextmanager
def auth_server(state_dir: Path, *jobs: JobConfig, admin_token_file: Path | None = None) -> Iterator[RunningServer]:
    jobs = jobs or (JobConfig(job_id="a", strategy=FEDBUFF_1), JobConfig(job_id="b", strategy=FEDBUFF_1))
    config = ServerConfig(address="127.0.0.1:0", jobs=jobs, state_dir=state_dir, auth=True, admin_token_file=admin_token_file, insecure=True)
    models: dict[str, Any] = {job.job_id: small_model() for job in jobs}
    with running_server(config, models, grace_s=0.5) as running:
        yield running


@pytest.fixture
def admin_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin.secret"
    path.write_text(ADMIN_TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def running(tmp_path: Path, admin_file: Path) -> Iterator[RunningServer]:
    with auth_server(tmp_path / "state", admin_token_file=admin_file) as server:
        yield server


def enrol(running: RunningServer, client_id: str, *jobs: str, rotate: bool = False) -> str:
    with AdminClient(running.address, ADMIN_TOKEN, insecure=True) as admin:
        return admin.enrol(client_id, list(jobs), rotate=rotate).token


State = dict[str, tuple[int, int, dict[str, int]]]


def state_of(running: RunningServer) -> State:
    return {
        job_id: (job.snapshot().version, job.stats.updates_accepted, dict(job.stats.rejected))
        for job_id, job in running.core.jobs.items()
    }


def assert_still_serving(running: RunningServer) -> None:
    """A newly enrolled client pushes to job a, and its update is applied."""
    client_id = f"healthy-{uuid.uuid4().hex[:6]}"
    token = enrol(running, client_id, "a")
    with Client(running.address, job="a", client_id=client_id, token=token, insecure=True) as client:
        pulled = client.pull()
        assert client.push(pulled.version, delta()).version_after == pulled.version + 1


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def push_request(job_id: str, client_id: str) -> Iterator[pb.PushRequest]:
    header = pb.UpdateHeader(
        job_id=job_id, client_id=client_id, idempotency_key=uuid.uuid4().hex, base_version=0, num_samples=1,
        header=header_to_pb(specs_of(delta())),
    )  # fmt: skip
    yield pb.PushRequest(update=header)
    for name, array in delta().items():
        yield pb.PushRequest(chunk=pb.Chunk(data=array.tobytes()))


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


class CallCounter(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor):  # type: ignore[misc]
    """Counts the calls an SDK client really makes (to see it does not retry)."""

    def __init__(self) -> None:
        self.calls = 0

    def _count(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        self.calls += 1
        return continuation(details, request)

    intercept_unary_unary = intercept_unary_stream = intercept_stream_unary = _count


# -- authentication --------------------------------------------------------------------


def test_calls_without_a_token_are_unauthenticated_and_change_nothing(running: RunningServer) -> None:
    before = state_of(running)
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.TributaryStub(channel)
        calls = [
            lambda: stub.GetJob(pb.GetJobRequest(job_id="a")),
            lambda: list(stub.Pull(pb.PullRequest(job_id="a"))),
            lambda: stub.Push(push_request("a", "c1")),
            lambda: stub.JoinCohort(pb.JoinCohortRequest(job_id="a", client_id="c1")),
            lambda: stub.GetUploadSlot(pb.MemberRef(job_id="a", cohort_id="x", member=1)),
        ]
        for call in calls:
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "this server requires a client token" in error.details()
            assert "tributary admin enrol" in error.details()
        # a malformed authorization entry is no credential either
        error = rpc_error(lambda: stub.GetJob(pb.GetJobRequest(job_id="a"), metadata=[("authorization", "Basic abc")]))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert state_of(running) == before
    assert_still_serving(running)


def test_sdk_raises_not_authenticated_without_retrying(running: RunningServer) -> None:
    counter = CallCounter()
    channel = grpc.intercept_channel(grpc.insecure_channel(running.address), counter)
    with Client(running.address, job="a", channel=channel) as client, pytest.raises(NotAuthenticated) as caught:
        client.pull()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert counter.calls == 1


def test_a_wrong_token_is_unauthenticated(running: RunningServer) -> None:
    enrol(running, "c1", "a")
    before = state_of(running)
    with Client(running.address, job="a", client_id="c1", token="trb_" + "x" * 43, insecure=True) as client:
        with pytest.raises(NotAuthenticated, match="not valid on this server"):
            client.push(0, delta())
        with pytest.raises(NotAuthenticated):
            client.job_info()
    assert state_of(running) == before
    assert_still_serving(running)


def test_a_stream_is_refused_before_its_body_is_read(running: RunningServer) -> None:
    """The interceptor refuses without waiting for the first message: a push
    stream that never sends one is answered at once."""
    release = threading.Event()

    def never_sends() -> Iterator[pb.PushRequest]:
        release.wait(30)
        return
        yield  # a generator that sends nothing until released

    try:
        with grpc.insecure_channel(running.address) as channel:
            error = rpc_error(lambda: pb_grpc.TributaryStub(channel).Push(never_sends(), timeout=20))
    finally:
        release.set()
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_stays_open(running: RunningServer) -> None:
    with grpc.insecure_channel(running.address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


# -- authorization -----------------------------------------------------------------------


def test_a_client_acts_only_in_its_jobs(running: RunningServer) -> None:
    token = enrol(running, "c1", "a")
    before = state_of(running)
    counter = CallCounter()
    channel = grpc.intercept_channel(grpc.insecure_channel(running.address), counter)
    with Client(running.address, job="b", client_id="c1", token=token, channel=channel) as client:
        for call in (lambda: client.push(0, delta()), client.pull, client.job_info):
            with pytest.raises(PermissionDenied) as caught:
                call()
            assert "client 'c1' is not enrolled in job 'b'; ask the operator to enrol it" in str(caught.value)
            assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert counter.calls == 3  # refused once each, never retried
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.TributaryStub(channel)
        error = rpc_error(lambda: stub.JoinCohort(pb.JoinCohortRequest(job_id="b", client_id="c1"), metadata=bearer(token)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        # a job that does not exist is no different: the client learns nothing about it
        error = rpc_error(lambda: stub.GetJob(pb.GetJobRequest(job_id="secret"), metadata=bearer(token)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert state_of(running) == before
    with Client(running.address, job="a", client_id="c1", token=token, insecure=True) as client:
        assert client.push(0, delta()).version_after == 1


def test_a_client_cannot_act_as_another_client(running: RunningServer) -> None:
    token = enrol(running, "c1", "a")
    enrol(running, "c2", "a")
    before = state_of(running)
    with Client(running.address, job="a", client_id="c2", token=token, insecure=True) as client:
        with pytest.raises(PermissionDenied, match="issued to client 'c1'; it cannot act as client 'c2'"):
            client.push(0, delta())
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.TributaryStub(channel)
        error = rpc_error(lambda: stub.JoinCohort(pb.JoinCohortRequest(job_id="a", client_id="c2"), metadata=bearer(token)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert state_of(running) == before
    assert_still_serving(running)


def test_revoking_a_working_client_refuses_its_very_next_call(running: RunningServer) -> None:
    token = enrol(running, "c1", "a")
    with Client(running.address, job="a", client_id="c1", token=token, insecure=True) as client, AdminClient(running.address, ADMIN_TOKEN, insecure=True) as admin:
        pulled = client.pull()
        client.push(pulled.version, delta())
        before = state_of(running)
        assert admin.revoke("c1") is True
        with pytest.raises(NotAuthenticated, match="the token of client 'c1' was revoked at"):
            client.push(pulled.version + 1, delta())
        assert state_of(running) == before
        assert admin.revoke("c1") is False  # already revoked: nothing changes
    assert_still_serving(running)


def test_revoking_during_fit_stops_it_with_not_authenticated(running: RunningServer) -> None:
    """fit() is mid-loop when the operator revokes the client (from its
    on_push hook, so exactly after the second accepted push): the next call,
    a pull, is refused and fit raises instead of retrying."""
    torch = pytest.importorskip("torch")
    model = torch.nn.ModuleDict({"layer": torch.nn.Linear(3, 4)})  # the tensors of small_model()
    token = enrol(running, "c1", "a")
    pushes = []

    def train(model: Any, device: Any) -> int:
        with torch.no_grad():
            model.layer.weight.add_(0.01)
        return 4

    def on_push(result: object) -> None:
        pushes.append(result)
        if len(pushes) == 2:
            with AdminClient(running.address, ADMIN_TOKEN, insecure=True) as admin:
                admin.revoke("c1")

    with Client(running.address, job="a", client_id="c1", token=token, insecure=True) as client:
        with pytest.raises(NotAuthenticated, match="revoked"):
            client.fit(model, train, updates=100, device="cpu", on_push=on_push)
    assert running.core.job("a").stats.updates_accepted == 2


def test_rotating_a_token_retires_the_old_one_at_once(running: RunningServer) -> None:
    old = enrol(running, "c1", "a")
    new = enrol(running, "c1", "a", "b", rotate=True)
    assert new != old
    with Client(running.address, job="b", client_id="c1", token=old, insecure=True) as client, pytest.raises(NotAuthenticated):
        client.pull()
    with Client(running.address, job="b", client_id="c1", token=new, insecure=True) as client:
        assert client.pull().version == 0


# -- the Admin service -----------------------------------------------------------------------


def test_admin_rpcs_need_the_admin_token(running: RunningServer) -> None:
    client_token = enrol(running, "c1", "a")
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.AdminStub(channel)
        cases = [
            (None, grpc.StatusCode.UNAUTHENTICATED, "admin RPCs need the admin token"),
            ("trb_admin_" + "x" * 40, grpc.StatusCode.UNAUTHENTICATED, "the admin token is wrong"),
            (client_token, grpc.StatusCode.PERMISSION_DENIED, "this is a client token"),
        ]
        for token, code, message in cases:
            metadata = bearer(token) if token else None
            for call in (
                lambda: stub.Status(pb.ServerStatusRequest(), metadata=metadata),
                lambda: stub.EnrolClient(pb.EnrolClientRequest(client_id="evil", job_ids=["a"]), metadata=metadata),
                lambda: stub.RevokeClient(pb.RevokeClientRequest(client_id="c1"), metadata=metadata),
                lambda: stub.ListClients(pb.ListClientsRequest(), metadata=metadata),
            ):
                error = rpc_error(call)
                assert error.code() == code, (token, error.details())
                assert message in error.details()
    with AdminClient(running.address, client_token, insecure=True) as admin, pytest.raises(PermissionDenied):
        admin.status()
    # nothing was enrolled or revoked by the refused calls
    assert [(c.client_id, c.active) for c in running.registry.clients()] == [("c1", True)]  # type: ignore[union-attr]


def test_the_admin_token_cannot_act_as_a_client(running: RunningServer) -> None:
    with grpc.insecure_channel(running.address) as channel:
        error = rpc_error(lambda: pb_grpc.TributaryStub(channel).GetJob(pb.GetJobRequest(job_id="a"), metadata=bearer(ADMIN_TOKEN)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "the admin token cannot act as a client" in error.details()


def test_enrol_revoke_status_and_clients(running: RunningServer) -> None:
    with AdminClient(running.address, ADMIN_TOKEN, insecure=True) as admin:
        first = admin.enrol("c1", ["a", "b", "a"])
        assert first.token.startswith("trb_") and first.job_ids == ("a", "b")
        admin.enrol("c2", ["b"])
        with pytest.raises(TributaryError, match="client 'c1' is already enrolled") as caught:
            admin.enrol("c1", ["a"])
        assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(JobNotFound, match="no job 'nope' on this server; it runs: a, b"):
            admin.enrol("c3", ["nope"])
        with pytest.raises(TributaryError, match="at least one job") as caught:
            admin.enrol("c3", [])
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(TributaryError, match="client id 'bad id' must be"):
            admin.enrol("bad id", ["a"])
        with pytest.raises(TributaryError, match="no client 'ghost' was ever enrolled") as caught:
            admin.revoke("ghost")
        assert caught.value.code == grpc.StatusCode.NOT_FOUND and not isinstance(caught.value, JobNotFound)

        with Client(running.address, job="a", client_id="c1", token=first.token, insecure=True) as client:
            client.push(0, delta())
        assert admin.revoke("c2") is True
        status = {job.job_id: job for job in admin.status()}
        assert (status["a"].strategy, status["a"].version, status["a"].updates_accepted, status["a"].pending_updates) == ("fedbuff", 1, 1, 0)
        assert (status["a"].enrolled_clients, status["b"].enrolled_clients) == (1, 1)  # c2 revoked
        clients = {c.client_id: c for c in admin.clients()}
        assert clients["c1"].job_ids == ("a", "b") and not clients["c1"].revoked
        assert clients["c2"].revoked and clients["c2"].revoked_at is not None
        assert clients["c2"].revoked_at >= clients["c2"].enrolled_at
        # a revoked client may be enrolled again, with a new token
        again = admin.enrol("c2", ["a"])
        with Client(running.address, job="a", client_id="c2", token=again.token, insecure=True) as client:
            assert client.pull().version == 1
    assert "c3" not in {c.client_id for c in running.registry.clients()}  # type: ignore[union-attr]


def test_admin_service_is_absent_with_auth_off(serve) -> None:  # type: ignore[no-untyped-def]
    running = serve()
    with AdminClient(running.address, ADMIN_TOKEN, insecure=True) as admin, pytest.raises(TributaryError, match="start it with --auth") as caught:
        admin.status()
    assert caught.value.code == grpc.StatusCode.UNIMPLEMENTED
    with Client(running.address, insecure=True) as client:  # no token needed
        client.push(0, delta())


# -- state --------------------------------------------------------------------------------


def test_registry_and_generated_admin_token_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with auth_server(state) as first:
        assert first.admin_token_generated and first.admin_token_file == state / "admin.token"
        assert stat.S_IMODE(first.admin_token_file.stat().st_mode) == 0o600
        admin_token = first.admin_token_file.read_text().strip()
        with AdminClient(first.address, admin_token, insecure=True) as admin:
            kept = admin.enrol("kept", ["a"]).token
            gone = admin.enrol("gone", ["a"]).token
            admin.revoke("gone")
    with auth_server(state) as second:
        assert not second.admin_token_generated
        assert second.admin_token_file is not None and second.admin_token_file.read_text().strip() == admin_token
        with Client(second.address, job="a", client_id="kept", token=kept, insecure=True) as client:
            client.push(0, delta())
        with Client(second.address, job="a", client_id="gone", token=gone, insecure=True) as client, pytest.raises(NotAuthenticated, match="revoked"):
            client.pull()
        with AdminClient(second.address, admin_token, insecure=True) as admin:
            assert {c.client_id: c.revoked for c in admin.clients()} == {"kept": False, "gone": True}


def test_tokens_are_stored_only_as_digests(running: RunningServer, tmp_path: Path) -> None:
    tokens = [enrol(running, f"c{i}", "a") for i in range(3)]
    stored = b"".join(path.read_bytes() for path in (tmp_path / "state").glob("tributary.db*"))
    assert stored, "the registry wrote nothing to the state directory"
    for token in tokens:
        assert token.encode() not in stored
        assert token[4:].encode() not in stored  # nor without its prefix
        assert hashlib.sha256(token.encode()).digest() in stored
    assert ADMIN_TOKEN.encode() not in stored


# -- secure aggregation -------------------------------------------------------------------------

SECURE = JobConfig(
    job_id="secure",
    strategy=StrategyConfig(name="fedbuff"),
    secure_aggregation=SecAggConfig(cohort_size=3, forming_timeout_s=1.0, phase_timeout_s=5.0, upload_timeout_s=5.0, clip_bound=64.0),
)


def test_enrolled_clients_complete_a_cohort_and_others_are_refused(tmp_path: Path, admin_file: Path) -> None:
    with auth_server(tmp_path / "state", SECURE, JobConfig(job_id="plain"), admin_token_file=admin_file) as running:
        tokens = {f"m{i}": enrol(running, f"m{i}", "secure") for i in range(3)}
        outsider = enrol(running, "outsider", "plain")
        size = running.core.job("secure").vector_length
        results: dict[str, object] = {}

        def member(client_id: str) -> None:
            with Client(running.address, job="secure", client_id=client_id, token=tokens[client_id], insecure=True) as client:
                cohort = SecureRound(client)
                cohort.start()
                try:
                    results[client_id] = cohort.submit(0, np.full(size, 0.5, np.float32), 10)
                except Exception as error:  # kept for the assertion
                    results[client_id] = error

        threads = [threading.Thread(target=member, args=(client_id,)) for client_id in tokens]
        for thread in threads:
            thread.start()
        # meanwhile, a client enrolled elsewhere, and one with no token, try to take part
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.TributaryStub(channel)
            join = pb.JoinCohortRequest(job_id="secure", client_id="outsider", wait_timeout_ms=100)
            error = rpc_error(lambda: stub.JoinCohort(join, metadata=bearer(outsider)))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "client 'outsider' is not enrolled in job 'secure'" in error.details()
            ref = pb.MemberRef(job_id="secure", cohort_id="any", member=1)
            error = rpc_error(lambda: stub.AdvertiseKeys(pb.KeyAdvertMessage(sender=ref), metadata=bearer(outsider)))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            error = rpc_error(lambda: stub.Unmask(pb.UnmaskResponseMessage(sender=ref)))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            # a member's token cannot join under another member's name
            error = rpc_error(
                lambda: stub.JoinCohort(pb.JoinCohortRequest(job_id="secure", client_id="m1"), metadata=bearer(tokens["m0"]))
            )
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        for thread in threads:
            thread.join(60)
        assert all(not isinstance(r, Exception) for r in results.values()), results
        job = running.core.job("secure")
        assert job.snapshot().version == 1 and job.stats.cohorts_applied == 1
        np.testing.assert_allclose(job.snapshot().tensors["layer.bias"], small_model()["layer.bias"] + 0.5, atol=1e-3)


def test_a_revoked_member_gets_not_authenticated_not_an_endless_retry(tmp_path: Path, admin_file: Path) -> None:
    """A cohort setup refused for auth is not a cohort abort (which fit would
    answer by joining another cohort, forever)."""
    with auth_server(tmp_path / "state", SECURE, admin_token_file=admin_file) as running:
        token = enrol(running, "m0", "secure")
        with AdminClient(running.address, ADMIN_TOKEN, insecure=True) as admin:
            admin.revoke("m0")
        with Client(running.address, job="secure", client_id="m0", token=token, insecure=True) as client:
            cohort = SecureRound(client)
            cohort.start()
            with pytest.raises(NotAuthenticated, match="revoked"):
                cohort.submit(0, np.zeros(running.core.job("secure").vector_length, np.float32), 1)


def test_sdk_refuses_unusable_tokens_before_connecting() -> None:
    with pytest.raises(ValueError, match="pass client_id= the id it was enrolled as"):
        Client("127.0.0.1:1", token="trb_abc")
    for bad in ("", "two words", "trb_\u00e9t\u00e9"):
        with pytest.raises(ValueError, match="one word of printable ASCII"):
            Client("127.0.0.1:1", client_id="c1", token=bad)
        with pytest.raises(ValueError, match="one word of printable ASCII"):
            AdminClient("127.0.0.1:1", bad)


def test_heartbeats_need_enrolment_in_the_job_and_the_clients_own_id(running: RunningServer) -> None:
    token = enrol(running, "beater", "a")
    with Client(running.address, job="a", client_id="beater", token=token, insecure=True) as client:
        assert client.heartbeat("idle").version == 0
    with Client(running.address, job="b", client_id="beater", token=token, insecure=True) as client, pytest.raises(PermissionDenied, match="not enrolled in job 'b'"):
        client.heartbeat("idle")
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.TributaryStub(channel)
        as_other = pb.HeartbeatRequest(job_id="a", client_id="someone-else", state=pb.CLIENT_STATE_IDLE)
        assert rpc_error(lambda: stub.Heartbeat(as_other, metadata=(("authorization", f"Bearer {token}"),))).code() == grpc.StatusCode.PERMISSION_DENIED
        assert rpc_error(lambda: stub.Heartbeat(as_other)).code() == grpc.StatusCode.UNAUTHENTICATED
    roster = running.core.job("a").roster
    assert [c.client_id for c in roster.clients()] == ["beater"]
