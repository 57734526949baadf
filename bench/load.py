"""Load: N simulated clients hold one real server busy for minutes.

The server is the real thing, `python -m tributary server`, in its own process
on loopback, with one fedbuff job whose model is one float32 tensor of
--model-params elements (written to a temporary .safetensors file). The
clients are lightweight (no training): --client-procs processes, each running
its share of the N clients as grpc.aio coroutines, every client on its own
channel and TCP connection, as separate devices would be. Each client:

  - sends a heartbeat every --heartbeat-interval seconds (x U(0.8, 1.2)), with
    its state (idle, training, uploading) and the version it holds; the ack
    carries the job's current version;
  - pulls the model when that version is newer than the one it holds, before
    each simulated round of local training;
  - "trains" for --push-interval seconds (x U(0.5, 1.5)), then pushes a small
    random delta (one array per process, reused) on the version it pulled.

Clients start spread over the first seconds of the warm-up, so the first pulls
do not all land at once. Nothing is retried: a call that fails counts as failed,
under its status code, and a call that has no answer when the drain after the
load ends counts as dropped. Calls are timed from the call to the ack (the last
pull chunk); percentiles are over the calls that started after the warm-up.

The reference, measured in the same run before the load starts: one client
alone on the same server, making --baseline-calls heartbeats, pulls and pushes
one after the other (the unloaded latencies); the table shows loaded p99 against
it. While the load runs, the parent samples the server process every second
(RSS, CPU, threads, open files) and the client processes' CPU. RSS after the
warm-up and at the end are medians over 30 s (one sample moves by +-10 MB with
the payloads in flight); growth is between the two, and the least-squares slope
is over the whole window after the warm-up and over its second half.

    python -m bench.load                                     # 500 clients for 5 min (what `make bench` runs)
    python -m bench.load --clients 100 --duration 30 --warmup 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import multiprocessing.context
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import psutil

from bench._common import count_label, machine, parse_count
from proto import tributary_pb2 as pb
from proto import tributary_pb2_grpc as pb_grpc
from proto.tensors import header_to_pb, iter_chunks, specs_of
from server.config import JobConfig

ROOT = Path(__file__).resolve().parent.parent
JOB_ID = "load"
TENSOR = "w"
LOOPBACK = "127.0.0.1"
HEARTBEAT, PULL, PUSH = "heartbeat", "pull", "push"
RPCS = (HEARTBEAT, PULL, PUSH)

HEARTBEAT_TIMEOUT_S = 10.0
TRANSFER_TIMEOUT_S = 60.0
"""Per pull or push; far above any latency a healthy server shows, so a call
that hits it is a real failure."""
DRAIN_S = TRANSFER_TIMEOUT_S + 10.0
"""After the load ends, calls in flight get this long; then they count as dropped."""
RAMP_MAX_S = 10.0
"""Clients start spread over min(this, warm-up / 2) seconds."""
SERVER_START_TIMEOUT_S = 60.0
WORKER_START_TIMEOUT_S = 120.0
SAMPLE_S = 1.0
PROGRESS_S = 10.0
LAG_PROBE_S = 0.05
"""How often each client process checks how late its event loop runs."""
RSS_SPAN_S = 30.0
"""RSS after the warm-up and at the end are medians over this many seconds: a
single sample moves by +-10 MB with the payloads in flight."""
RSS_FLAT_GROWTH = 0.05
"""RSS counts as flat when the end's median is within 5 % of the median after the warm-up."""
KEPT_UP = 0.9
"""Clients kept up when they made at least 90 % of the heartbeats they meant to."""
DEFAULT_JSON = ROOT / "bench" / "results" / "load.json"
MB = 1e6

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    clients: int
    duration_s: float
    warmup_s: float
    model_params: int
    client_procs: int
    heartbeat_interval_s: float
    push_interval_s: float
    buffer_size: int
    max_workers: int | None
    idempotency_window: int | None
    durable: bool
    baseline_calls: int
    seed: int

    @property
    def ramp_s(self) -> float:
        return min(RAMP_MAX_S, self.warmup_s / 2)


# --------------------------------------------------------------------------- #
# Client side: calls, each timed and sorted by outcome                        #
# --------------------------------------------------------------------------- #


@dataclass
class Calls:
    """The calls of one RPC type made by one process."""

    starts: list[float] = field(default_factory=list)
    """time.monotonic() (system-wide on Linux) at which each successful call started."""
    latencies_s: list[float] = field(default_factory=list)
    beside_transfer: list[bool] = field(default_factory=list)
    """Per successful call: whether the same client had a pull or push in flight
    when it started (they share one connection)."""
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    """By status code name (or the client-side exception's name)."""
    dropped: int = 0
    examples: list[str] = field(default_factory=list)

    def merge(self, other: Calls) -> None:
        self.starts += other.starts
        self.latencies_s += other.latencies_s
        self.beside_transfer += other.beside_transfer
        self.failures.update(other.failures)
        self.dropped += other.dropped
        self.examples += other.examples[: max(0, 5 - len(self.examples))]


class Recorder:
    def __init__(self) -> None:
        self.calls = {rpc: Calls() for rpc in RPCS}
        self.pushes_acked = 0
        self.bytes_pulled = 0

    async def timed(self, rpc: str, call: Callable[[], Awaitable[T]], beside_transfer: bool = False) -> T | None:
        """The call's result, or None when it failed (counted)."""
        calls = self.calls[rpc]
        started = time.monotonic()
        try:
            result = await call()
        except asyncio.CancelledError:
            calls.dropped += 1
            raise
        except grpc.aio.AioRpcError as error:
            self._fail(calls, error.code().name, f"{rpc}: {error.code().name}: {error.details()}")
            return None
        except Exception as error:  # noqa: BLE001 - a client-side failure is still a failed call
            self._fail(calls, type(error).__name__, f"{rpc}: {error!r}")
            return None
        calls.starts.append(started)
        calls.latencies_s.append(time.monotonic() - started)
        calls.beside_transfer.append(beside_transfer)
        return result

    @staticmethod
    def _fail(calls: Calls, kind: str, example: str) -> None:
        calls.failures[kind] += 1
        if len(calls.examples) < 5:
            calls.examples.append(example[:300])


class Payload:
    """The push payload of one process: one random delta, cut into chunk
    messages once and reused by every client and push."""

    def __init__(self, params: int, seed: int) -> None:
        delta = {TENSOR: np.random.default_rng(seed).standard_normal(params, dtype=np.float32) * np.float32(1e-4)}
        self.header = header_to_pb(specs_of(delta))
        self.chunks = [pb.PushRequest(chunk=pb.Chunk(data=data)) for data in iter_chunks(delta.values())]


class SimulatedClient:
    def __init__(self, address: str, client_id: str, payload: Payload, recorder: Recorder) -> None:
        # A local subchannel pool gives every client its own TCP connection; by
        # default grpc would share one among a process's channels to the same server.
        self.channel = grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = pb_grpc.TributaryStub(self.channel)
        self.client_id = client_id
        self.payload = payload
        self.recorder = recorder
        self.state = pb.CLIENT_STATE_IDLE
        self.held_version: int | None = None
        self.latest_version = 0
        self.transferring = False

    async def heartbeat(self) -> None:
        request = pb.HeartbeatRequest(
            job_id=JOB_ID, client_id=self.client_id, state=self.state, base_version=self.held_version or 0
        )
        ack = await self.recorder.timed(
            HEARTBEAT, lambda: self.stub.Heartbeat(request, timeout=HEARTBEAT_TIMEOUT_S), beside_transfer=self.transferring
        )
        if ack is not None:
            self.latest_version = max(self.latest_version, ack.version)

    async def pull(self) -> None:
        async def call() -> int:
            version, expected, received = -1, -1, 0
            async for message in self.stub.Pull(pb.PullRequest(job_id=JOB_ID), timeout=TRANSFER_TIMEOUT_S):
                if message.WhichOneof("kind") == "model":
                    version, expected = message.model.version, message.model.header.payload_bytes
                else:
                    received += len(message.chunk.data)
            if version < 0 or received != expected:
                raise ValueError(f"pull of version {version} brought {received} of {expected} bytes")
            return version

        self.transferring = True
        try:
            version = await self.recorder.timed(PULL, call)
        finally:
            self.transferring = False
        if version is not None:
            self.held_version = version
            self.latest_version = max(self.latest_version, version)
            self.recorder.bytes_pulled += self.payload.header.payload_bytes

    async def push(self) -> None:
        assert self.held_version is not None
        header = pb.UpdateHeader(
            job_id=JOB_ID,
            client_id=self.client_id,
            idempotency_key=uuid.uuid4().hex,
            base_version=self.held_version,
            num_samples=1,
            header=self.payload.header,
        )

        def requests() -> Iterator[pb.PushRequest]:
            yield pb.PushRequest(update=header)
            yield from self.payload.chunks

        self.transferring = True
        try:
            ack = await self.recorder.timed(PUSH, lambda: self.stub.Push(requests(), timeout=TRANSFER_TIMEOUT_S))
        finally:
            self.transferring = False
        if ack is not None:
            self.recorder.pushes_acked += 1
            self.latest_version = max(self.latest_version, ack.version_after)

    async def close(self) -> None:
        await self.channel.close()


async def _sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


async def _heartbeats(client: SimulatedClient, interval_s: float, end: float, rng: random.Random) -> None:
    while time.monotonic() < end:
        await client.heartbeat()
        await _sleep_until(min(end, time.monotonic() + interval_s * rng.uniform(0.8, 1.2)))


async def _rounds(client: SimulatedClient, push_interval_s: float, end: float, rng: random.Random) -> None:
    while time.monotonic() < end:
        client.state = pb.CLIENT_STATE_IDLE
        if client.held_version is None or client.latest_version > client.held_version:
            await client.pull()
        if client.held_version is None:  # the pull failed (counted); try again after a pause
            await _sleep_until(min(end, time.monotonic() + 1.0))
            continue
        client.state = pb.CLIENT_STATE_TRAINING
        training_ends = time.monotonic() + push_interval_s * rng.uniform(0.5, 1.5)
        if training_ends >= end:
            await _sleep_until(end)
            break
        await _sleep_until(training_ends)
        client.state = pb.CLIENT_STATE_UPLOADING
        await client.push()
    client.state = pb.CLIENT_STATE_IDLE


async def _simulate(client: SimulatedClient, settings: Settings, begin: float, end: float, rng: random.Random) -> None:
    await _sleep_until(begin + rng.uniform(0, settings.ramp_s))
    try:
        await asyncio.gather(
            _heartbeats(client, settings.heartbeat_interval_s, end, rng),
            _rounds(client, settings.push_interval_s, end, rng),
        )
    finally:
        await client.close()


@dataclass
class WorkerReport:
    worker: int
    calls: dict[str, Calls]
    pushes_acked: int
    bytes_pulled: int
    cpu_s: float
    unfinished_clients: int
    loop_lag: list[tuple[float, float]]
    """(time.monotonic(), seconds late) of each wake-up of a probe sleeping LAG_PROBE_S."""


async def _probe_loop_lag(end: float, lags: list[tuple[float, float]]) -> None:
    """A client's latency includes the time its process's event loop takes to
    get to the answer; this shows how much of it that is."""
    while time.monotonic() < end:
        started = time.monotonic()
        await asyncio.sleep(LAG_PROBE_S)
        lags.append((started, time.monotonic() - started - LAG_PROBE_S))


async def _run_clients(address: str, first: int, count: int, settings: Settings, worker: int, begin: float) -> WorkerReport:
    recorder = Recorder()
    payload = Payload(settings.model_params, settings.seed + worker)
    end = begin + settings.duration_s
    rng = random.Random(settings.seed * 1_000_003 + worker)
    tasks = [
        asyncio.create_task(
            _simulate(SimulatedClient(address, f"sim-{index:05d}", payload, recorder), settings, begin, end, random.Random(rng.random()))
        )
        for index in range(first, first + count)
    ]
    lags: list[tuple[float, float]] = []
    await _sleep_until(begin)
    probe = asyncio.create_task(_probe_loop_lag(end, lags))
    _done, pending = await asyncio.wait(tasks, timeout=max(0.0, end + DRAIN_S - time.monotonic()))
    for task in pending:
        task.cancel()  # its call in flight counts as dropped
    await asyncio.gather(*pending, return_exceptions=True)
    probe.cancel()
    await asyncio.gather(probe, return_exceptions=True)
    times = psutil.Process().cpu_times()
    return WorkerReport(
        worker, recorder.calls, recorder.pushes_acked, recorder.bytes_pulled, times.user + times.system, len(pending), lags
    )


def _worker_main(conn: Connection, address: str, first: int, count: int, settings: Settings, worker: int) -> None:
    conn.send("ready")
    begin = conn.recv()
    conn.send(asyncio.run(_run_clients(address, first, count, settings, worker, begin)))


async def _baseline(address: str, settings: Settings) -> Recorder:
    """One client alone: heartbeat, pull, push, one after the other."""
    recorder = Recorder()
    client = SimulatedClient(address, "baseline", Payload(settings.model_params, settings.seed), recorder)
    try:
        await client.heartbeat()  # connects; not counted below
        recorder.calls = {rpc: Calls() for rpc in RPCS}
        for _ in range(settings.baseline_calls):
            await client.heartbeat()
            await client.pull()
            if client.held_version is not None:
                await client.push()
    finally:
        await client.close()
    return recorder


# --------------------------------------------------------------------------- #
# The server, in its own process                                               #
# --------------------------------------------------------------------------- #


class ServerProcess:
    """`python -m tributary server` on a free loopback port."""

    def __init__(self, model_path: Path, settings: Settings, log_path: Path) -> None:
        # A TOML file, as an operator would write it: idempotency_window has no flag.
        config = log_path.with_name("load-server.toml")
        lines = [
            f'address = "{LOOPBACK}:0"',
            "insecure = true  # loopback; the simulated devices use plaintext channels",
            *([f"max_workers = {settings.max_workers}"] if settings.max_workers is not None else []),
            *([f'state_dir = "{log_path.parent.resolve() / "state"}"'] if settings.durable else []),
            "[[jobs]]",
            f'id = "{JOB_ID}"',
            f'initial_model = "{model_path.resolve()}"',
            'strategy = "fedbuff"',
            f"buffer_size = {settings.buffer_size}",
            *([f"idempotency_window = {settings.idempotency_window}"] if settings.idempotency_window is not None else []),
        ]
        config.write_text("\n".join(lines) + "\n")
        command = [sys.executable, "-m", "tributary", "server", "--config", str(config)]
        self.command = command
        self._log = log_path.open("w")
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.address = self._wait_for_address()
        self.ps = psutil.Process(self.process.pid)
        self.log_path = log_path
        # Keep reading its stdout so the pipe never fills and blocks it.
        threading.Thread(target=self._drain_stdout, daemon=True).start()

    def _wait_for_address(self) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        marker = "listening on "
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            if marker in line:
                return line.split(marker, 1)[1].split()[0]  # "HOST:PORT (plaintext)"
        self.stop()
        raise RuntimeError(f"the server did not start: see {self._log.name}\n{Path(self._log.name).read_text()[-2000:]}")

    def _drain_stdout(self) -> None:
        assert self.process.stdout is not None
        for _ in self.process.stdout:
            pass

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@dataclass(frozen=True)
class Sample:
    t: float
    """Seconds since the load began."""
    server_rss_mb: float
    server_cpu_s: float
    server_threads: int
    server_fds: int
    clients_cpu_s: float
    machine_busy_s: float
    load_average: float


class Sampler:
    def __init__(self, server: psutil.Process, workers: Sequence[psutil.Process], begin: float) -> None:
        self._server = server
        self._workers = workers
        self._begin = begin
        self._stop = threading.Event()
        self.samples: list[Sample] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def take(self) -> Sample:
        server_cpu = self._server.cpu_times()
        clients_cpu = 0.0
        for worker in self._workers:
            with contextlib.suppress(psutil.Error):
                times = worker.cpu_times()
                clients_cpu += times.user + times.system
        box = psutil.cpu_times()
        return Sample(
            t=time.monotonic() - self._begin,
            server_rss_mb=self._server.memory_info().rss / MB,
            server_cpu_s=server_cpu.user + server_cpu.system,
            server_threads=self._server.num_threads(),
            server_fds=self._server.num_fds(),
            clients_cpu_s=clients_cpu,
            machine_busy_s=box.user + box.nice + box.system + box.irq + box.softirq + getattr(box, "steal", 0.0),
            load_average=os.getloadavg()[0],
        )

    def _run(self) -> None:
        next_at = self._begin
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.samples.append(self.take())
            next_at += SAMPLE_S
            self._stop.wait(max(0.0, next_at - time.monotonic()))


# --------------------------------------------------------------------------- #
# Orchestration and summary                                                   #
# --------------------------------------------------------------------------- #


def _write_model(params: int, directory: Path) -> Path:
    from safetensors.numpy import save_file

    path = directory / "model.safetensors"
    save_file({TENSOR: np.zeros(params, dtype=np.float32)}, str(path))
    return path


def _split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _percentiles_ms(latencies_s: Sequence[float]) -> dict[str, float | None]:
    if not latencies_s:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    values = np.asarray(latencies_s) * 1000
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(values.max())}


def summarize_rpcs(calls: dict[str, Calls], baseline: dict[str, Calls], settings: Settings, begin: float) -> list[dict[str, Any]]:
    measured_from, measured_to = begin + settings.warmup_s, begin + settings.duration_s
    window_s = settings.duration_s - settings.warmup_s
    rows = []
    for rpc in RPCS:
        c = calls[rpc]
        starts = np.asarray(c.starts)
        latencies = np.asarray(c.latencies_s)
        beside = np.asarray(c.beside_transfer, dtype=bool)
        measured = (starts >= measured_from) & (starts < measured_to)
        after_warmup = latencies[measured]
        loaded = _percentiles_ms(after_warmup.tolist())
        unloaded = _percentiles_ms(baseline[rpc].latencies_s)
        ratio = loaded["p99"] / unloaded["p99"] if loaded["p99"] is not None and unloaded["p99"] else None
        rows.append(
            {
                "rpc": rpc,
                "ok": len(c.latencies_s),
                "ok_after_warmup": int(after_warmup.size),
                "per_s": after_warmup.size / window_s,
                "failed": sum(c.failures.values()),
                "failures_by_code": dict(c.failures),
                "dropped": c.dropped,
                "examples": c.examples,
                "loaded_ms": loaded,
                "unloaded_ms": unloaded,
                "unloaded_failed": sum(baseline[rpc].failures.values()),
                "p99_loaded_over_unloaded": ratio,
                "beside_transfer": {"calls": int((measured & beside).sum()), "ms": _percentiles_ms(latencies[measured & beside].tolist())},
                "alone": {"calls": int((measured & ~beside).sum()), "ms": _percentiles_ms(latencies[measured & ~beside].tolist())},
            }
        )
    return rows


def summarize_server(samples: Sequence[Sample], settings: Settings) -> dict[str, Any]:
    window = [s for s in samples if settings.warmup_s <= s.t <= settings.duration_s + SAMPLE_S / 2]
    if len(window) < 2:
        raise RuntimeError("too few samples after the warm-up; make --duration longer than --warmup by a few seconds")
    first, last = window[0], window[-1]
    seconds = last.t - first.t
    minutes = np.array([s.t for s in window]) / 60
    rss = np.array([s.server_rss_mb for s in window])
    slope = float(np.polyfit(minutes, rss, 1)[0])
    half = minutes >= (minutes[0] + minutes[-1]) / 2
    slope_last_half = float(np.polyfit(minutes[half], rss[half], 1)[0]) if half.sum() >= 2 else slope
    span = min(RSS_SPAN_S, seconds / 3)
    after_warmup = float(np.median([s.server_rss_mb for s in window if s.t <= first.t + span]))
    end = float(np.median([s.server_rss_mb for s in window if s.t >= last.t - span]))
    growth = end - after_warmup
    return {
        "rss_start_mb": samples[0].server_rss_mb,
        "rss_after_warmup_mb": after_warmup,
        "rss_end_mb": end,
        "rss_span_s": span,
        "rss_peak_mb": max(s.server_rss_mb for s in samples),
        "rss_growth_mb": growth,
        "rss_growth_fraction": growth / after_warmup,
        "rss_slope_mb_per_min": slope,
        "rss_slope_last_half_mb_per_min": slope_last_half,
        "server_cpu_cores": (last.server_cpu_s - first.server_cpu_s) / seconds,
        "clients_cpu_cores": (last.clients_cpu_s - first.clients_cpu_s) / seconds,
        "machine_cpu_cores": (last.machine_busy_s - first.machine_busy_s) / seconds,
        "server_threads_after_warmup": first.server_threads,
        "server_threads_end": last.server_threads,
        "server_fds_end": last.server_fds,
        "load_average_max": max(s.load_average for s in window),
        "window_s": seconds,
    }


def targets(rows: Sequence[dict[str, Any]], server: dict[str, Any], settings: Settings, unfinished: int) -> list[dict[str, Any]]:
    failed = sum(r["failed"] for r in rows)
    dropped = sum(r["dropped"] for r in rows)
    by_code: collections.Counter[str] = collections.Counter()
    for row in rows:
        by_code.update({f"{row['rpc']} {code}": n for code, n in row["failures_by_code"].items()})
    codes = ", ".join(f"{k}: {v}" for k, v in by_code.most_common()) or "none"
    growth, slope = server["rss_growth_fraction"], server["rss_slope_mb_per_min"]
    keys = server["idempotency_keys_end"] - server["idempotency_keys_after_warmup"]
    span = server["rss_span_s"]
    heartbeats = next(r for r in rows if r["rpc"] == HEARTBEAT)
    intended = settings.clients / settings.heartbeat_interval_s
    return [
        {
            "target": "dropped or failed requests",
            "goal": "0",
            "passed": failed == 0 and dropped == 0,
            "detail": f"{failed} failed ({codes}), {dropped} dropped, {unfinished} clients unfinished at the drain deadline",
        },
        {
            "target": "server RSS after warm-up",
            "goal": f"flat: median of the last {span:.0f} s within {RSS_FLAT_GROWTH:.0%} of the first {span:.0f} s after the warm-up",
            "passed": growth <= RSS_FLAT_GROWTH,
            "detail": (
                f"{server['rss_after_warmup_mb']:.1f} -> {server['rss_end_mb']:.1f} MB ({server['rss_growth_mb']:+.1f} MB, "
                f"{growth:+.1%}); least-squares slope {slope:+.2f} MB/min over {server['window_s']:.0f} s, "
                f"{server['rss_slope_last_half_mb_per_min']:+.2f} over its second half; meanwhile the job took {keys} more "
                f"idempotency keys to remember ({server['idempotency_keys_end']} of at most {server['idempotency_window']})"
            ),
        },
        {
            "target": "clients kept up (the load is what was asked for)",
            "goal": f">= {KEPT_UP:.0%} of {intended:.0f} heartbeats/s",
            "passed": heartbeats["per_s"] >= KEPT_UP * intended,
            "detail": f"{heartbeats['per_s']:.0f} heartbeats/s ({heartbeats['per_s'] / intended:.0%})",
        },
    ]


def _job_totals(address: str) -> tuple[int, int]:
    with grpc.insecure_channel(address) as channel:
        info = pb_grpc.TributaryStub(channel).GetJob(pb.GetJobRequest(job_id=JOB_ID), timeout=30)
    return int(info.updates_accepted), int(info.version)


def run(settings: Settings) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")  # grpc does not survive fork
    with tempfile.TemporaryDirectory(prefix="tributary-load-") as tmp:
        server = ServerProcess(_write_model(settings.model_params, Path(tmp)), settings, Path(tmp) / "server.log")
        try:
            return _run_against(server, settings, context)
        finally:
            server.stop()


def _run_against(server: ServerProcess, settings: Settings, context: multiprocessing.context.SpawnContext) -> dict[str, Any]:
    print(f"server {server.address} (pid {server.process.pid}); unloaded reference: {settings.baseline_calls} x heartbeat, pull, push", flush=True)
    baseline = asyncio.run(_baseline(server.address, settings))
    workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    first = 0
    for index, count in enumerate(_split(settings.clients, settings.client_procs)):
        ours, theirs = context.Pipe()
        spawned = context.Process(target=_worker_main, args=(theirs, server.address, first, count, settings, index), daemon=True)
        spawned.start()
        workers.append((spawned, ours))
        first += count
    try:
        for process, conn in workers:
            if not conn.poll(WORKER_START_TIMEOUT_S) or conn.recv() != "ready":
                raise RuntimeError(f"client process {process.name} did not start")
        begin = time.monotonic() + 0.5
        for _, conn in workers:
            conn.send(begin)
        sampler = Sampler(server.ps, [psutil.Process(p.pid) for p, _ in workers if p.pid], begin)
        sampler.start()
        reports = _wait_for_reports(workers, sampler, settings, begin)
        sampler.stop()
    finally:
        for process, _ in workers:
            process.join(5)
            if process.is_alive():
                process.kill()
    accepted, version = _job_totals(server.address)
    calls = {rpc: Calls() for rpc in RPCS}
    for report in reports:
        for rpc in RPCS:
            calls[rpc].merge(report.calls[rpc])
    rows = summarize_rpcs(calls, baseline.calls, settings, begin)
    server_summary = summarize_server(sampler.samples, settings)
    unfinished = sum(r.unfinished_clients for r in reports)
    lags = [lag for r in reports for started, lag in r.loop_lag if begin + settings.warmup_s <= started < begin + settings.duration_s]
    acked = sum(r.pushes_acked for r in reports) + baseline.pushes_acked
    # The job remembers the key of every accepted push, up to its idempotency
    # window: memory that grows until the window is full.
    window = settings.idempotency_window or JobConfig().idempotency_window
    acked_in_warmup = baseline.pushes_acked + sum(1 for t in calls[PUSH].starts if t < begin + settings.warmup_s)
    server_summary.update(
        {
            "updates_accepted": accepted,
            "pushes_acked": acked,
            "final_version": version,
            "pulled_mb": sum(r.bytes_pulled for r in reports) / MB,
            "idempotency_window": window,
            "idempotency_keys_after_warmup": min(window, acked_in_warmup),
            "idempotency_keys_end": min(window, acked),
        }
    )
    client_loop_lag_ms = _percentiles_ms(lags)
    return {
        "rpcs": rows,
        "server": server_summary,
        "client_loop_lag_ms": client_loop_lag_ms,
        "targets": targets(rows, server_summary, settings, unfinished),
        "samples": [dataclasses.asdict(s) for s in sampler.samples],
        "server_command": server.command,
    }


def _wait_for_reports(
    workers: Sequence[tuple[multiprocessing.process.BaseProcess, Connection]], sampler: Sampler, settings: Settings, begin: float
) -> list[WorkerReport]:
    deadline = begin + settings.duration_s + DRAIN_S + 30
    next_progress = begin + PROGRESS_S
    reports: dict[int, WorkerReport] = {}
    while len(reports) < len(workers):
        for index, (process, conn) in enumerate(workers):
            if index not in reports and conn.poll(0):
                reports[index] = conn.recv()
            elif index not in reports and not process.is_alive():
                raise RuntimeError(f"client process {index} died (exit code {process.exitcode})")
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError("client processes did not report in time")
        if now >= next_progress and sampler.samples:
            s = sampler.samples[-1]
            print(
                f"  t={s.t:5.0f} s  server RSS {s.server_rss_mb:6.1f} MB  threads {s.server_threads:3d}  fds {s.server_fds:4d}  "
                f"load avg {s.load_average:4.1f}",
                flush=True,
            )
            next_progress += PROGRESS_S
        time.sleep(0.2)
    return [reports[i] for i in sorted(reports)]


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(result: dict[str, Any], settings: Settings) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=170)
    title = (
        f"{settings.clients} clients for {settings.duration_s:g} s ({settings.warmup_s:g} s warm-up) against one server; "
        f"model {count_label(settings.model_params)} float32; latencies in ms after the warm-up"
    )
    table = Table(title=title)
    for name in ("rpc", "ok (all)", "ok/s measured", "failed", "dropped", "p50", "p95", "p99", "max", "unloaded p50", "unloaded p99", "p99 loaded/unloaded"):
        table.add_column(name, justify="right")
    for r in result["rpcs"]:
        loaded, unloaded = r["loaded_ms"], r["unloaded_ms"]
        table.add_row(
            r["rpc"], str(r["ok"]), f"{r['per_s']:.1f}", str(r["failed"]), str(r["dropped"]),
            _fmt(loaded["p50"]), _fmt(loaded["p95"]), _fmt(loaded["p99"]), _fmt(loaded["max"]),
            _fmt(unloaded["p50"], ".2f"), _fmt(unloaded["p99"], ".2f"), _fmt(r["p99_loaded_over_unloaded"], ".0f") + "x",
        )
    console.print(table)
    s = result["server"]
    server = Table(
        title=f"Server process, sampled every second (RSS after warm-up and end: medians of {s['rss_span_s']:.0f} s; CPU in cores after the warm-up)"
    )
    for name in (
        "RSS start MB", "after warm-up", "end", "peak", "growth MB", "growth", "slope MB/min", "2nd half", "srv CPU", "cli CPU", "box CPU",
        "threads", "fds", "load avg max",
    ):
        server.add_column(name, justify="right")
    server.add_row(
        f"{s['rss_start_mb']:.1f}", f"{s['rss_after_warmup_mb']:.1f}", f"{s['rss_end_mb']:.1f}", f"{s['rss_peak_mb']:.1f}",
        f"{s['rss_growth_mb']:+.1f}", f"{s['rss_growth_fraction']:+.1%}", f"{s['rss_slope_mb_per_min']:+.2f}",
        f"{s['rss_slope_last_half_mb_per_min']:+.2f}",
        f"{s['server_cpu_cores']:.2f}", f"{s['clients_cpu_cores']:.2f}", f"{s['machine_cpu_cores']:.2f}",
        f"{s['server_threads_after_warmup']} -> {s['server_threads_end']}", str(s["server_fds_end"]), f"{s['load_average_max']:.1f}",
    )
    console.print(server)
    console.print(
        f"pushes acked {s['pushes_acked']}, updates the server accepted {s['updates_accepted']} "
        f"({'equal' if s['pushes_acked'] == s['updates_accepted'] else 'DIFFERENT'}), final version {s['final_version']}, "
        f"{s['pulled_mb']:.0f} MB pulled"
    )
    lag = result["client_loop_lag_ms"]
    console.print(
        f"client event loops ran late by p50 {_fmt(lag['p50'], '.1f')} / p99 {_fmt(lag['p99'], '.1f')} / max {_fmt(lag['max'], '.1f')} ms "
        "(part of every loaded latency above)"
    )
    beats = next(r for r in result["rpcs"] if r["rpc"] == HEARTBEAT)
    beside, alone = beats["beside_transfer"], beats["alone"]
    console.print(
        f"heartbeats while the same client's pull or push was in flight on its connection: {beside['calls']}, "
        f"p50 {_fmt(beside['ms']['p50'])} / p99 {_fmt(beside['ms']['p99'])} ms; "
        f"the others: {alone['calls']}, p50 {_fmt(alone['ms']['p50'])} / p99 {_fmt(alone['ms']['p99'])} ms"
    )
    for r in result["rpcs"]:
        for example in r["examples"][:3]:
            console.print(f"[red]failed[/red] {example}")
    for t in result["targets"]:
        console.print(f"{'PASS' if t['passed'] else 'FAIL'}  {t['target']} (goal {t['goal']}): {t['detail']}")


def write_json(path: Path, settings: Settings, result: dict[str, Any], seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "load",
        "command": ["python", "-m", "bench.load", *sys.argv[1:]],
        "machine": machine(grpcio=grpc.__version__),
        "settings": dataclasses.asdict(settings),
        "seconds": seconds,
        **result,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description="N simulated clients against one real Tributary server, for minutes.")
    parser.add_argument("--clients", type=parse_count, default=500, help="simulated clients (default: 500)")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load, the warm-up included (default: 300)")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds at the start not measured (default: 30)")
    parser.add_argument("--model-params", type=parse_count, default=100_000, help="float32 parameters of the job's model (default: 100k, 400 KB)")
    parser.add_argument("--client-procs", type=parse_count, default=4, help="client processes, N/procs clients each (default: 4)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between a client's heartbeats, x U(0.8, 1.2) (default: 1)")
    parser.add_argument("--push-interval", type=float, default=5.0, help="seconds of simulated training before each push, x U(0.5, 1.5) (default: 5)")
    parser.add_argument("--buffer-size", type=parse_count, default=20, help="fedbuff K of the server's job (default: 20)")
    parser.add_argument("--max-workers", type=parse_count, default=None, help="server RPC threads (default: the server's default)")
    parser.add_argument(
        "--idempotency-window",
        type=parse_count,
        default=None,
        help="push keys (and acks) the job remembers (default: the server's, 100k); each costs about 0.5-1 KB until the window is full",
    )
    parser.add_argument(
        "--durable", action="store_true", help="run the server with a state directory (every push fsynced before its ack)"
    )
    parser.add_argument("--baseline-calls", type=parse_count, default=200, help="calls of each RPC for the unloaded reference (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the schedule and the payload (default: 0)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results (default: bench/results/load.json)")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.duration <= args.warmup + 2 * SAMPLE_S:
        parser.error("--duration must exceed --warmup (>= 0) by a few seconds")
    for name in ("heartbeat_interval", "push_interval"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        clients=args.clients,
        duration_s=args.duration,
        warmup_s=args.warmup,
        model_params=args.model_params,
        client_procs=args.client_procs,
        heartbeat_interval_s=args.heartbeat_interval,
        push_interval_s=args.push_interval,
        buffer_size=args.buffer_size,
        max_workers=args.max_workers,
        idempotency_window=args.idempotency_window,
        durable=args.durable,
        baseline_calls=args.baseline_calls,
        seed=args.seed,
    )
    started = time.monotonic()
    result = run(settings)
    print_report(result, settings)
    write_json(args.json, settings, result, time.monotonic() - started)
    print(f"wrote {args.json} after {time.monotonic() - started:.0f} s")
    return 0 if all(t["passed"] for t in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
