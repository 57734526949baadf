"""Kill the server with SIGKILL at chosen and at random moments while clients
work, restart it on the same state directory, and check that nothing
acknowledged was lost, nothing counted twice, versions only went up, and the
final model is the one an uninterrupted server builds from the same arrivals.

The server is the real `tributary server` process. Crash points come from
server/faults.py (TRIBUTARY_CRASH_AT=point:n makes the process SIGKILL itself
the n-th time it reaches the point), which is how a test stops it exactly
between logging an update and applying it, or half way through a checkpoint;
the "random" plans are SIGKILLs sent from here after a random delay. Clients
are threads using the SDK as an app would: they only retry, and they learn
nothing from the test about the crashes.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from client_sdk import Client, RetryPolicy
from client_sdk._errors import CohortAborted, NotAcceptedNow
from client_sdk._secure import SecureRound
from server import JobConfig, StrategyConfig
from server.core import Job, Update, UpdateHeader
from server.models import load_model, save_model
from server.store import DATABASE_NAME
from proto.tensors import specs_of

pytestmark = pytest.mark.slow

TRIBUTARY = [sys.executable, "-m", "tributary"]
PATIENT = RetryPolicy(max_attempts=60, initial_backoff_s=0.1, max_backoff_s=1.0)
PLAIN_POINTS = ("push.receiving", "push.logged", "aggregate.mid", "push.acking", "checkpoint.written", "checkpoint.renamed")
SECURE_POINTS = ("secagg.joined", "secagg.advertise", "secagg.share", "secagg.upload", "secagg.unmask", "secagg.logged")


def plaintext_model() -> dict[str, np.ndarray]:
    """1.2 MB: a push takes two chunks, so a crash can land between them."""
    rng = np.random.default_rng(7)
    return {"w": rng.standard_normal((600, 500)).astype(np.float32), "b": rng.standard_normal(500).astype(np.float32)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Supervisor:
    """Starts the server, lets it crash (or kills it) per plan, restarts it."""

    args: list[str]
    port: int
    crashes: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    def start(self, crash_at: str | None = None) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != "TRIBUTARY_CRASH_AT"}
        if crash_at:
            env["TRIBUTARY_CRASH_AT"] = crash_at
        self.process = subprocess.Popen(
            [*TRIBUTARY, "server", "--address", f"127.0.0.1:{self.port}", "--insecure", *self.args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        return self.process

    def run_plans(self, plans: list[str], rng: random.Random, errors: list[BaseException]) -> None:
        for plan in plans:
            if plan == "random":
                process = self.start()
                time.sleep(rng.uniform(1.5, 4.0))  # start-up takes about a second; then clients are mid-work
                process.send_signal(signal.SIGKILL)
            else:
                process = self.start(plan)
            try:
                output = process.communicate(timeout=60)[0].decode()
            except subprocess.TimeoutExpired:
                process.kill()
                output = process.communicate()[0].decode()
                raise AssertionError(f"crash point {plan} was never reached within 60 s; clients: {errors}; the server said:\n{output}") from None
            assert process.returncode == -signal.SIGKILL, f"{plan}: server exited with {process.returncode}:\n{output}"
            self.crashes.append(plan)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.communicate()
        self.crashes.append("random")

    def stop_gracefully(self) -> str:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, output.decode()
        return output.decode()


def watch_versions(address: str, stop: threading.Event, seen: list[int]) -> None:
    """What a client polling the job sees, restarts included."""
    with Client(address, retry=PATIENT, timeout_s=5, insecure=True) as client:
        while not stop.is_set():
            seen.append(client.job_info().version)
            time.sleep(0.05)


STRATEGIES = {
    # strategy: (its flags, its settings for the reference run, how many times each crash point is hit)
    "fedbuff": (["--strategy", "fedbuff", "--buffer-size", "3"], StrategyConfig(name="fedbuff", buffer_size=3), (1, 3, 2)),
    "fedasync": (["--strategy", "fedasync"], StrategyConfig(name="fedasync"), (2,)),
    "fedavg": (["--strategy", "fedavg", "--clients-per-round", "3"], StrategyConfig(name="fedavg", clients_per_round=3), (1,)),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_plaintext_sigkill_anywhere_loses_no_ack_and_counts_none_twice(tmp_path: Path, strategy: str) -> None:
    flags, reference_strategy, repeats = STRATEGIES[strategy]
    synchronous = strategy == "fedavg"
    initial = plaintext_model()
    save_model(tmp_path / "initial.safetensors", initial)
    state = tmp_path / "state"
    port = free_port()
    address = f"127.0.0.1:{port}"
    supervisor = Supervisor(
        ["--state-dir", str(state), "--initial-model", str(tmp_path / "initial.safetensors"),
         *flags, "--checkpoint-every", "2", "--keep-checkpoints", "2"],
        port,
    )  # fmt: skip
    rng = random.Random(2026)
    plans = [f"{point}:{n}" for n in repeats for point in PLAIN_POINTS] + ["random"] * (4 if len(repeats) > 1 else 2)
    rng.shuffle(plans)

    stop = threading.Event()
    acked: dict[str, tuple[str, int, int, dict[str, np.ndarray]]] = {}  # key -> (client, base, samples, delta)
    acked_lock = threading.Lock()
    errors: list[BaseException] = []

    def client_loop(index: int) -> None:
        try:
            with Client(address, client_id=f"c{index}", retry=PATIENT, timeout_s=20, insecure=True) as client:
                for n in range(10_000):
                    if stop.is_set():
                        return
                    pulled = client.pull()
                    gen = np.random.default_rng((index, n))
                    delta = {name: (0.01 * gen.standard_normal(a.shape)).astype(np.float32) for name, a in pulled.tensors.items()}
                    key = f"c{index}-{n}"
                    samples = 1 + index
                    try:
                        client.push(pulled.version, delta, num_samples=samples, idempotency_key=key)
                    except NotAcceptedNow:  # fedavg: the round closed while this client was cut off
                        assert synchronous
                        continue
                    with acked_lock:
                        acked[key] = (f"c{index}", pulled.version, samples, delta)
                    while synchronous and not stop.is_set() and client.pull(min_version=pulled.version + 1, wait_s=2).version <= pulled.version:
                        pass  # a synchronous round: train again only on the next version
        except BaseException as error:  # reported by the test
            errors.append(error)

    versions_seen: list[int] = []
    supervisor.start()
    clients = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
    watcher = threading.Thread(target=watch_versions, args=(address, stop, versions_seen))
    for thread in [*clients, watcher]:
        thread.start()
    try:
        time.sleep(1.0)
        supervisor.kill()  # the first, plain-running server dies too
        supervisor.run_plans(plans, rng, errors)
        supervisor.start()
        time.sleep(2.0)  # a little work on a server that does not crash
    finally:
        stop.set()
        for thread in [*clients, watcher]:
            thread.join(120)
    assert not errors, errors
    output = supervisor.stop_gracefully()
    assert "state saved" in output
    assert len(supervisor.crashes) == 1 + len(plans)

    db = sqlite3.connect(state / DATABASE_NAME)
    logged = db.execute("SELECT idempotency_key, client_id, base_version, num_samples FROM update_log WHERE kind = 'update' ORDER BY seq").fetchall()
    keys = [row[0] for row in logged]
    assert len(keys) == len(set(keys)), "an update was counted twice"
    assert set(acked) <= set(keys), f"acknowledged but lost: {sorted(set(acked) - set(keys))}"
    assert set(keys) <= set(acked), "logged updates the clients never saw acknowledged"
    for key, client_id, base, samples in logged:
        assert (client_id, base, samples) == acked[key][:3]
    versions = [v for (v,) in db.execute("SELECT version FROM versions WHERE job_id = 'default' ORDER BY seq, version")]
    assert versions == list(range(len(versions))), "versions must go up by one, in log order"
    assert all(a <= b for a, b in zip(versions_seen, versions_seen[1:])), "a client saw the version go back"
    db.close()

    # An uninterrupted server given the same arrivals, in the same order.
    reference = Job(JobConfig(strategy=reference_strategy), load_model(tmp_path / "initial.safetensors"))
    for key in keys:
        client_id, base, samples, delta = acked[key]
        header = UpdateHeader("default", client_id, key, base, samples, tuple(specs_of(delta)))
        reference.submit(Update(header, delta))
    supervisor.start()  # once more: the recovered model is what clients pull
    with Client(address, retry=PATIENT, insecure=True) as client:
        final = client.pull()
        info = client.job_info()
    supervisor.stop_gracefully()
    expected = reference.snapshot()
    assert final.version == expected.version == versions[-1]
    assert info.updates_accepted == len(keys)
    for name in initial:
        np.testing.assert_array_equal(final.tensors[name], expected.tensors[name])


SECURE_SIZE = 3_000


def test_secure_cohorts_cut_by_sigkill_abort_and_members_retry(tmp_path: Path) -> None:
    save_model(tmp_path / "initial.safetensors", {"w": np.zeros(SECURE_SIZE, np.float32)})
    state = tmp_path / "state"
    port = free_port()
    address = f"127.0.0.1:{port}"
    supervisor = Supervisor(
        ["--state-dir", str(state), "--initial-model", str(tmp_path / "initial.safetensors"),
         "--strategy", "fedbuff", "--secure-aggregation", "--cohort-size", "3", "--min-survivors", "3",
         "--clip-bound", "64", "--forming-timeout", "1", "--phase-timeout", "3", "--upload-timeout", "3",
         "--checkpoint-every", "2"],
        port,
    )  # fmt: skip
    stop = threading.Event()
    completed: list[int] = []
    aborted: list[str] = []
    errors: list[BaseException] = []

    def member_loop(index: int) -> None:
        try:
            with Client(address, client_id=f"m{index}", retry=PATIENT, timeout_s=10, insecure=True) as client:
                n = 0
                while not stop.is_set():
                    pulled = client.pull()
                    cohort = SecureRound(client, join_timeout_s=60)
                    cohort.start()
                    delta = np.random.default_rng((index, n)).uniform(-1, 1, SECURE_SIZE).astype(np.float32)
                    n += 1
                    try:
                        completed.append(cohort.submit(pulled.version, delta, 5).version)
                    except CohortAborted as error:
                        aborted.append(str(error))
        except BaseException as error:  # reported by the test
            errors.append(error)

    members = [threading.Thread(target=member_loop, args=(i,)) for i in range(3)]
    for thread in members:
        thread.start()
    try:
        supervisor.run_plans([f"{point}:{n}" for n in (1, 2) for point in SECURE_POINTS] + ["random"], random.Random(5), errors)
        supervisor.start()
        deadline = time.monotonic() + 60
        before = len(completed)
        while len(completed) < before + 3 and time.monotonic() < deadline:  # cohorts complete again after the last restart
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in members:
            thread.join(120)
    supervisor.stop_gracefully()
    assert not errors, errors
    assert len(supervisor.crashes) == 13
    assert aborted, "crashes mid-cohort must surface to members as aborted cohorts"
    assert len(completed) >= 3, completed

    db = sqlite3.connect(state / DATABASE_NAME)
    cohorts = db.execute("SELECT cohort_id, version_after, contributors FROM update_log WHERE kind = 'cohort' ORDER BY seq").fetchall()
    versions = [v for (v,) in db.execute("SELECT version FROM versions WHERE job_id = 'default' ORDER BY seq, version")]
    db.close()
    assert len({c for c, _, _ in cohorts}) == len(cohorts), "a cohort was applied twice"
    assert [v for _, v, _ in cohorts] == list(range(1, len(cohorts) + 1))
    assert versions == list(range(len(versions)))
    assert all(n == 3 for _, _, n in cohorts)
    # Every member of every applied cohort was told so (a member whose answer
    # was lost in a crash asks again, and the server answers from its log), and
    # no member heard of a cohort that was not applied.
    told: dict[int, int] = {}
    for version in completed:
        told[version] = told.get(version, 0) + 1
    assert told == {version: 3 for _, version, _ in cohorts}
