"""Devices over real gRPC: training slots (cap, prefer charging, leases,
fedavg rounds), energy per version (and across a restart), eligibility in
`fit`, and bad device inputs refused with the right codes."""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from client_sdk import Client, DeviceState, EligibilityPolicy, NotAcceptedNow, PermissionDenied, RetryPolicy
from proto import tributary_pb2 as pb
from proto import tributary_pb2_grpc as pb_grpc
from proto.tensors import header_to_pb, iter_chunks, specs_of
from server import JobConfig, ServerConfig, StrategyConfig
from server.app import RunningServer, running_server
from server.config import RetentionConfig
from server.store import DATABASE_NAME
from tests.conftest import small_model
from tests.integration.test_auth import ADMIN_TOKEN, auth_server, enrol

FAST = RetryPolicy(max_attempts=2, initial_backoff_s=0.05)
CHARGING = DeviceState(battery_level=0.8, charging=True, idle=True, unmetered=True, profile="phone")
ON_BATTERY = DeviceState(battery_level=0.8, charging=False, idle=True, unmetered=True, profile="phone")


def delta(scale: float = 0.01) -> dict[str, np.ndarray]:
    return {name: np.full(t.shape, scale, dtype=t.dtype) for name, t in small_model().items()}


@contextlib.contextmanager
def clients(running: RunningServer, *ids: str, job: str = "default") -> Iterator[list[Client]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(Client(running.address, job, client_id=i, insecure=True, retry=FAST)) for i in ids]


def slotted(**settings: object) -> JobConfig:
    return JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=1), **settings)  # type: ignore[arg-type]


def test_a_job_without_slots_grants_every_request_and_takes_pushes_without_one(serve: Callable[..., RunningServer]) -> None:
    running = serve(slotted())
    with clients(running, "a") as (a,):
        grant = a.acquire_training_slot(ON_BATTERY)
        assert grant.granted and grant.lease_s == 0.0 and "no training slots" in grant.reason
        assert a.push(0, delta()).version_after == 1
        info = a.job_info()
        assert info.max_concurrent_trainers is None and info.active_trainers == 0


def test_the_cap_holds_among_concurrent_clients_and_a_push_releases_the_slot(serve: Callable[..., RunningServer]) -> None:
    running = serve(slotted(max_concurrent_trainers=2))
    ids = [f"c{i}" for i in range(6)]
    with clients(running, *ids) as connected:
        barrier = threading.Barrier(len(connected))
        granted: dict[str, bool] = {}

        def ask(client: Client) -> None:
            barrier.wait()
            granted[client.client_id] = client.acquire_training_slot(ON_BATTERY).granted

        threads = [threading.Thread(target=ask, args=(c,)) for c in connected]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        holders = sorted(c for c, ok in granted.items() if ok)
        assert len(holders) == 2
        info = connected[0].job_info()
        assert (info.max_concurrent_trainers, info.active_trainers) == (2, 2)
        waiting = next(c for c in connected if c.client_id not in holders)
        with pytest.raises(NotAcceptedNow, match="holds no training slot"):
            waiting.push(0, delta())
        assert running.core.job("default").stats.updates_accepted == 0
        holder = next(c for c in connected if c.client_id == holders[0])
        holder.push(0, delta())
        assert waiting.acquire_training_slot(ON_BATTERY).granted
        assert not holder.acquire_training_slot(ON_BATTERY).granted  # the other two hold the slots


def test_a_refused_push_releases_its_slot(serve: Callable[..., RunningServer]) -> None:
    running = serve(slotted(max_concurrent_trainers=1))
    with clients(running, "a", "b") as (a, b):
        assert a.acquire_training_slot(ON_BATTERY).granted
        bad = delta()
        bad["layer.bias"] = np.full_like(bad["layer.bias"], np.nan)
        with pytest.raises(Exception, match="NaN"):
            a.push(0, bad)
        assert b.acquire_training_slot(ON_BATTERY).granted


def test_fit_keeps_concurrent_trainers_under_the_cap(serve: Callable[..., RunningServer]) -> None:
    pytest.importorskip("torch")
    import torch

    running = serve(slotted(max_concurrent_trainers=2, heartbeat_interval_s=0.5, roster_expiry_s=5.0))
    lock = threading.Lock()
    training = [0]
    most = [0]

    def train(model: torch.nn.Module, device: torch.device) -> int:
        with lock:
            training[0] += 1
            most[0] = max(most[0], training[0])
        time.sleep(0.05)  # overlap the clients' rounds
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01)
        with lock:
            training[0] -= 1
        return 4

    def run(client_id: str) -> None:
        model = torch.nn.Linear(3, 4)
        model.weight.data = torch.from_numpy(small_model()["layer.weight"].copy())
        model.bias.data = torch.from_numpy(small_model()["layer.bias"].copy())
        with Client(running.address, client_id=client_id, insecure=True) as client:
            client.fit(_Named(model), train, updates=3, device="cpu", poll_s=0.02)

    threads = [threading.Thread(target=run, args=(f"f{i}",)) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert running.core.job("default").stats.updates_accepted == 15
    assert 1 <= most[0] <= 2


class _Named:
    """Lazily built wrapper so the model's state_dict names are layer.weight/layer.bias."""

    def __new__(cls, inner: object) -> object:
        import torch

        wrapper = torch.nn.Module()
        wrapper.layer = inner  # type: ignore[assignment]
        return wrapper


def test_charging_devices_waiting_get_the_freed_slot_first(serve: Callable[..., RunningServer]) -> None:
    running = serve(slotted(max_concurrent_trainers=1, prefer_charging=True))
    with clients(running, "holder", "charger", "battery") as (holder, charger, battery):
        assert holder.acquire_training_slot(ON_BATTERY).granted
        assert not charger.acquire_training_slot(CHARGING).granted
        holder.push(0, delta())  # frees the slot
        refused = battery.acquire_training_slot(ON_BATTERY)
        assert not refused.granted and "charging device(s) waiting" in refused.reason and refused.retry_after_s > 0
        assert charger.acquire_training_slot(CHARGING).granted


def test_server_min_battery_turns_low_devices_away(serve: Callable[..., RunningServer]) -> None:
    running = serve(slotted(max_concurrent_trainers=3, min_battery=0.3))
    with clients(running, "low") as (low,):
        grant = low.acquire_training_slot(DeviceState(0.12, charging=False, idle=True, unmetered=True))
        assert not grant.granted and "battery 0.12 below this job's min_battery 0.30" in grant.reason
        assert low.acquire_training_slot(DeviceState(0.12, charging=True, idle=True, unmetered=True)).granted


def test_an_expired_lease_frees_the_slot_and_training_heartbeats_renew_it(serve: Callable[..., RunningServer]) -> None:
    running = serve(slotted(max_concurrent_trainers=1, slot_lease_s=0.6, heartbeat_interval_s=0.1, roster_expiry_s=1.0))
    with clients(running, "a", "b") as (a, b):
        assert a.acquire_training_slot(ON_BATTERY).granted
        for _ in range(5):  # a training client keeps its slot as long as it beats
            assert a.heartbeat("training", device=ON_BATTERY).slot_lease_s > 0
            assert not b.acquire_training_slot(ON_BATTERY).granted
            time.sleep(0.2)
        assert b.heartbeat("idle").slot_lease_s == 0.0
        while not b.acquire_training_slot(ON_BATTERY).granted:  # a fell silent: its lease runs out
            time.sleep(0.1)
        with pytest.raises(NotAcceptedNow, match="holds no training slot"):
            a.push(0, delta())
        assert b.push(0, delta()).version_after == 1


def test_a_fedavg_round_grants_exactly_clients_per_round_and_waits_for_them(serve: Callable[..., RunningServer]) -> None:
    fedavg = JobConfig(strategy=StrategyConfig(name="fedavg", clients_per_round=2), max_concurrent_trainers=10)
    running = serve(fedavg)
    with clients(running, "a", "b", "c") as (a, b, c):
        assert [x.acquire_training_slot(ON_BATTERY).granted for x in (a, b, c)] == [True, True, False]
        a.push(0, delta(), num_samples=1)
        refused = c.acquire_training_slot(ON_BATTERY)
        assert not refused.granted and "round 0 has its 2 clients" in refused.reason  # waits for slow b
        with pytest.raises(NotAcceptedNow, match="holds no training slot"):
            c.push(0, delta())
        assert running.core.job("default").snapshot().version == 0
        b.push(0, delta(), num_samples=1)  # the round closes
        grant = c.acquire_training_slot(ON_BATTERY)
        assert grant.granted and grant.version == 1
        assert a.acquire_training_slot(ON_BATTERY).granted
        assert not b.acquire_training_slot(ON_BATTERY).granted


def test_energy_is_summed_per_version_and_survives_a_restart(tmp_path: Path) -> None:
    job = JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=2))
    config = ServerConfig(address="127.0.0.1:0", jobs=(job,), state_dir=tmp_path, insecure=True, retention=RetentionConfig(checkpoint_every=100))
    with running_server(config, {"default": small_model()}, grace_s=0.5) as running:
        with clients(running, "a") as (a,):
            a.push(0, delta(), energy_joules=1.5)
            a.push(0, delta(), energy_joules=2.5)  # publishes version 1 = 4 J
            a.push(1, delta(), energy_joules=3.0)  # pending
            assert a.job_info().energy_joules_total == pytest.approx(7.0)
            history = a.version_history()
            assert [(r.version, r.energy_joules) for r in history] == [(1, pytest.approx(4.0)), (0, 0.0)]
            assert history[0].published_at >= history[1].published_at > 0
    db = sqlite3.connect(tmp_path / DATABASE_NAME)
    assert db.execute("SELECT version, energy_joules FROM versions ORDER BY version").fetchall() == [(0, 0.0), (1, 4.0)]
    db.close()
    with running_server(config, {"default": small_model()}, grace_s=0.5) as running:
        with clients(running, "a") as (a,):
            assert a.job_info().energy_joules_total == pytest.approx(7.0)  # the pending 3 J came back with the buffer
            a.push(1, delta(), energy_joules=1.0)
            assert [(r.version, r.energy_joules) for r in a.version_history(limit=2)] == [(2, pytest.approx(4.0)), (1, pytest.approx(4.0))]
            assert a.job_info().energy_joules_total == pytest.approx(8.0)


def test_a_schema_1_state_directory_is_migrated(tmp_path: Path) -> None:
    config = ServerConfig(address="127.0.0.1:0", jobs=(slotted(),), state_dir=tmp_path, insecure=True)
    with running_server(config, {"default": small_model()}, grace_s=0.5) as running:
        with clients(running, "a") as (a,):
            a.push(0, delta(), energy_joules=5.0)
    db = sqlite3.connect(tmp_path / DATABASE_NAME)  # make it what a schema-1 server wrote
    db.execute("ALTER TABLE versions DROP COLUMN energy_joules")
    db.execute("ALTER TABLE update_log DROP COLUMN energy_joules")
    db.execute("ALTER TABLE update_log DROP COLUMN wire_bytes")  # schema 3's
    db.execute("DROP TABLE evaluations")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    db.commit()
    db.close()
    with running_server(config, {"default": small_model()}, grace_s=0.5) as running:
        with clients(running, "a") as (a,):
            assert a.job_info().version == 1 and a.job_info().energy_joules_total == 0.0  # unknown before: 0 J
            a.push(1, delta(), energy_joules=2.0)
            assert a.job_info().energy_joules_total == pytest.approx(2.0)
    db = sqlite3.connect(tmp_path / DATABASE_NAME)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("4",)
    db.close()


# -- bad inputs ---------------------------------------------------------------------------


def raw_push(stub: pb_grpc.TributaryStub, energy: float, key: str) -> None:
    tensors = delta()
    header = pb.UpdateHeader(
        job_id="default", client_id="raw", idempotency_key=key, base_version=0, num_samples=1,
        header=header_to_pb(specs_of(tensors)), energy_joules=energy,
    )  # fmt: skip
    requests = [pb.PushRequest(update=header)] + [pb.PushRequest(chunk=pb.Chunk(data=c)) for c in iter_chunks(tensors.values())]
    stub.Push(iter(requests), timeout=10)


@pytest.mark.parametrize("energy", [-1.0, math.nan, math.inf, 1e13])
def test_bad_energy_is_refused_and_changes_nothing(serve: Callable[..., RunningServer], energy: float) -> None:
    running = serve(slotted())
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.TributaryStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            raw_push(stub, energy, "k1")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "energy_joules" in caught.value.details()
        job = running.core.job("default")
        assert (job.snapshot().version, job.stats.updates_accepted, job.energy_joules_total) == (0, 0, 0.0)
        raw_push(stub, 0.5, "k2")  # still serving
        assert job.energy_joules_total == 0.5
    with Client(running.address, insecure=True) as client, pytest.raises(ValueError, match="energy_joules"):
        client.push(0, delta(), energy_joules=-1.0)


def test_bad_slot_requests_get_the_right_codes(serve: Callable[..., RunningServer]) -> None:
    running = serve(slotted(max_concurrent_trainers=1))
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.TributaryStub(channel)

        def code(request: pb.TrainingSlotRequest) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.RpcError) as caught:
                stub.AcquireTrainingSlot(request, timeout=5)
            return caught.value.code(), caught.value.details()

        full = pb.DeviceState(battery_level=1.5, charging=True)
        assert code(pb.TrainingSlotRequest(job_id="default", client_id="x", device=full)) == (
            grpc.StatusCode.INVALID_ARGUMENT, "device battery_level must be in [0, 1] (leave it unset without a battery), got 1.5",
        )  # fmt: skip
        ok = pb.DeviceState(battery_level=0.5)
        assert code(pb.TrainingSlotRequest(job_id="nope", client_id="x", device=ok))[0] == grpc.StatusCode.NOT_FOUND
        assert code(pb.TrainingSlotRequest(job_id="default", client_id="", device=ok))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert "device's state" in code(pb.TrainingSlotRequest(job_id="default", client_id="x"))[1]
        beat = pb.HeartbeatRequest(job_id="default", client_id="x", state=pb.CLIENT_STATE_IDLE, device=full)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Heartbeat(beat, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert running.core.job("default").slots is not None and running.core.job("default").slots.active == 0  # type: ignore[union-attr]
        history = stub.GetVersionHistory(pb.VersionHistoryRequest(job_id="default", limit=5000), timeout=5)
        assert [r.version for r in history.versions] == [0]  # a page size past 1000 is coerced, not refused
    with Client(running.address, insecure=True) as client:
        assert client.acquire_training_slot(ON_BATTERY).granted  # still serving


def test_under_auth_a_client_cannot_take_a_slot_for_another(tmp_path: Path) -> None:
    admin_file = tmp_path / "admin.secret"
    admin_file.write_text(ADMIN_TOKEN + "\n")
    admin_file.chmod(0o600)
    job = JobConfig(job_id="a", strategy=StrategyConfig(name="fedbuff", buffer_size=1), max_concurrent_trainers=1)
    with auth_server(tmp_path / "state", job, admin_token_file=admin_file) as running:
        token = enrol(running, "c1", "a")
        with Client(running.address, "a", client_id="c1", token=token, insecure=True) as c1:
            with pytest.raises(PermissionDenied, match="c2"):
                _as_other(c1)
            assert running.core.job("a").slots.active == 0  # type: ignore[union-attr]
            assert c1.acquire_training_slot(ON_BATTERY).granted


def _as_other(client: Client) -> None:
    """acquire_training_slot under another client id, with this client's token."""
    real = client.client_id
    client.client_id = "c2"
    try:
        client.acquire_training_slot(ON_BATTERY)
    finally:
        client.client_id = real


# -- the SDK's eligibility gate -----------------------------------------------------------


def test_fit_does_not_train_while_the_policy_refuses(serve: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("torch")
    import torch

    running = serve(slotted())
    reads = [0]
    trained_at: list[int] = []

    def state() -> DeviceState:
        reads[0] += 1
        return ON_BATTERY if reads[0] <= 3 else CHARGING  # plugged in at the 4th look

    def train(model: torch.nn.Module, device: torch.device) -> int:
        trained_at.append(reads[0])
        return 1

    model = _Named(torch.nn.Linear(3, 4))
    with Client(running.address, insecure=True) as client, caplog.at_level("INFO", logger="tributary.client"):
        summary = client.fit(model, train, updates=2, device="cpu", device_state=state, policy=EligibilityPolicy(require_charging=True), poll_s=0.01)
    assert trained_at == [4, 5]  # nothing trained before the device was charging
    assert summary.updates_pushed == 2 and summary.stop_reason == "updates"
    assert sum("not charging (require_charging)" in r.getMessage() for r in caplog.records) == 1  # said once, not per poll


def test_fit_stops_after_max_wait_s_on_a_device_that_never_qualifies(serve: Callable[..., RunningServer]) -> None:
    pytest.importorskip("torch")
    import torch

    running = serve(slotted())
    with Client(running.address, insecure=True) as client:
        summary = client.fit(
            _Named(torch.nn.Linear(3, 4)), lambda m, d: 1, updates=1, device="cpu",
            device_state=lambda: ON_BATTERY, policy=EligibilityPolicy(require_charging=True), poll_s=0.01, max_wait_s=0.1,
        )  # fmt: skip
    assert summary.updates_pushed == 0 and summary.stop_reason == "waited max_wait_s"
    assert running.core.job("default").stats.updates_accepted == 0


# -- secure aggregation -------------------------------------------------------------------


def test_cohort_members_join_holding_slots_and_their_energy_is_summed(tmp_path: Path) -> None:
    from client_sdk._secure import SecureRound
    from server.config import SecAggConfig

    secagg = SecAggConfig(cohort_size=3, forming_timeout_s=30.0, phase_timeout_s=10.0, upload_timeout_s=10.0, clip_bound=64.0)
    job = JobConfig(strategy=StrategyConfig(name="fedbuff"), secure_aggregation=secagg, max_concurrent_trainers=3)
    config = ServerConfig(address="127.0.0.1:0", jobs=(job,), state_dir=tmp_path, insecure=True)
    with running_server(config, {"default": small_model()}, grace_s=0.5) as running:
        with grpc.insecure_channel(running.address) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.TributaryStub(channel).JoinCohort(pb.JoinCohortRequest(job_id="default", client_id="x", wait_timeout_ms=10), timeout=5)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "holds no training slot" in caught.value.details()
        errors: list[BaseException] = []

        def member(index: int) -> None:
            try:
                with Client(running.address, client_id=f"m{index}", insecure=True) as client:
                    assert client.acquire_training_slot(CHARGING).granted
                    cohort = SecureRound(client)
                    cohort.start()
                    flat = np.concatenate([a.reshape(-1) for a in delta(0.001 * index).values()])
                    cohort.submit(0, flat, 1, energy_joules=float(index))
            except BaseException as error:  # reported below, on the test's thread
                errors.append(error)

        threads = [threading.Thread(target=member, args=(i,)) for i in (1, 2, 3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        job_state = running.core.job("default")
        assert job_state.snapshot().version == 1 and job_state.energy_joules_total == pytest.approx(6.0)
        assert job_state.slots is not None and job_state.slots.active == 0  # each upload released its member's slot
    with running_server(config, {"default": small_model()}, grace_s=0.5) as running:
        assert running.core.job("default").version_history(5)[0][2] == pytest.approx(6.0)  # the logged cohort's energy
