"""Server ingest throughput: N concurrent clients pushing P float32 parameters.

For each (P, N), these servers run side by side, each in its own process, on loopback:

  raw-thr     the reference: a generic gRPC handler that only consumes a client
              stream of 1 MiB `BytesValue` chunks, on a threaded `grpc.server`
  raw-aio     the same handler on a `grpc.aio` server
  tributary   `server.app.running_server` with one fedbuff job (no staleness
              bound, so nothing is rejected); every client pulls once, then
              pushes deltas on that version with `client_sdk.Client.push`
  trib-noagg  an ablation, not a product setting: the same Tributary server with
              `Job.submit` replaced by a stub, so it only receives, decodes and
              assembles; tributary vs trib-noagg is what aggregation costs

All servers see the same client side: N streams spread over several client
processes (Python threads in one process share a GIL, so one process cannot
drive N streams), several threads each, the same payload, and the same single
copy per 1 MiB chunk out of a numpy array. Only one server is pushed to at a
time. The pushing time (--seconds) is cut into --rounds windows per server, and
the windows of the servers interleave, so a slow spell on a shared machine
hits every server about equally. Read the ratios to raw-thr; absolute rates
move between runs.

Where the server's time goes is read inside each server process: the CPU of
every thread (psutil), sorted into RPC handler threads, grpc's Python poller
thread (the sync server deserializes every request message there) and the
rest (grpc core's native threads); for Tributary also the thread CPU spent in
`Job.submit` (aggregation: the NaN/Inf check, the fedbuff accumulate,
publishing a version) and the wall time aggregation holds the job lock.

    python -m bench.throughput                       # default matrix, about 4.5 min on 2 cores
    python bench/throughput.py                       # the same (what `make bench` runs)
    python -m bench.throughput --clients 16 --params 1M --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import logging
import multiprocessing.context
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np

from bench._common import count_label, machine, parse_count
import psutil
from google.protobuf import wrappers_pb2

from client_sdk import Client, RetryPolicy
from proto.tensors import CHUNK_BYTES, specs_of
from server import JobConfig, ServerConfig, StrategyConfig
from server.app import running_server
from server.core import Job, PushOutcome, Update, UpdateHeader
from server.servicer import TributaryServicer
from server.strategies import FedBuff

# Plaintext on loopback on purpose: the raw gRPC references Tributary is measured
# against are plaintext too. The plaintext warnings (one per server and per
# pusher) would only bury the tables.
for _logger in ("tributary.server", "tributary.client"):
    logging.getLogger(_logger).setLevel(logging.ERROR)

RAW_THREADED = "raw-thr"
RAW_AIO = "raw-aio"
TRIBUTARY = "tributary"
TRIBUTARY_NO_AGGREGATION = "trib-noagg"
TARGETS = (RAW_THREADED, RAW_AIO, TRIBUTARY, TRIBUTARY_NO_AGGREGATION)
TRIBUTARY_TARGETS = (TRIBUTARY, TRIBUTARY_NO_AGGREGATION)
RAW_TARGETS = (RAW_THREADED, RAW_AIO)

JOB_ID = "bench"
TENSOR = "w"
RAW_SERVICE = "bench.Sink"
RAW_METHOD = f"/{RAW_SERVICE}/Consume"
LOOPBACK = "127.0.0.1"

PUSH_TIMEOUT_S = 180.0
"""Per push; 64 streams of 40 MB share two cores, so one push can take many seconds."""
START_DELAY_S = 0.2
"""Clients start together this long after the window is announced, so no process gets a head start."""
RSS_SAMPLE_S = 0.02
SERVER_START_TIMEOUT_S = 60.0
SETUP_TIMEOUT_S = 300.0
"""Connecting and pulling the model: 64 pulls of 40 MB take a while on two cores."""
TARGET_RATIO = 0.5
TARGET_CONFIG = (1_000_000, 16)
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "throughput.json"
MB = 1e6
MIB = 1 << 20

T = TypeVar("T")


# --------------------------------------------------------------------------- #
# Server side: each server runs in its own spawned process                    #
# --------------------------------------------------------------------------- #


class _Probe:
    """Cumulative counters filled by wrapped server functions, read by snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._handler_tids: set[int] = set()

    def add(self, name: str, cpu_s: float, wall_s: float) -> None:
        with self._lock:
            self._counters[f"{name}_cpu"] += cpu_s
            self._counters[f"{name}_wall"] += wall_s
            self._counters[f"{name}_calls"] += 1

    def note_handler_thread(self) -> None:
        with self._lock:
            self._handler_tids.add(threading.get_native_id())

    def read(self) -> tuple[dict[str, float], frozenset[int]]:
        with self._lock:
            return dict(self._counters), frozenset(self._handler_tids)

    def timed(self, name: str, fn: Callable[..., T], *, handler: bool = False) -> Callable[..., T]:
        """`fn`, adding its thread CPU (waiting on a lock, the GIL or a socket
        costs none) and its wall time to the counters `name_*`."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            if handler:
                self.note_handler_thread()
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.thread_time() - cpu, time.perf_counter() - wall)

        return wrapper


@dataclass(frozen=True)
class ServerSnapshot:
    """Cumulative CPU of a server process at one instant; two of them bound a window."""

    at: float
    cpu_s: float
    thread_cpu_s: dict[int, float]
    handler_tids: frozenset[int]
    poller_tids: frozenset[int]
    counters: dict[str, float]


def _snapshot(probe: _Probe) -> ServerSnapshot:
    process = psutil.Process()
    times = process.cpu_times()
    # grpc's sync server runs its completion-queue loop in a Python thread whose
    # target is `_serve`; that one thread deserializes every request message.
    poller = frozenset(t.native_id for t in threading.enumerate() if "_serve" in t.name and t.native_id)
    counters, handlers = probe.read()
    return ServerSnapshot(
        at=time.monotonic(),
        cpu_s=times.user + times.system,
        thread_cpu_s={t.id: t.user_time + t.system_time for t in process.threads()},
        handler_tids=handlers,
        poller_tids=poller,
        counters=counters,
    )


def _control_loop(conn: Connection, address: str, probe: _Probe) -> None:
    conn.send(address)
    while (command := conn.recv()) != "stop":
        if command == "snapshot":
            conn.send(_snapshot(probe))


def _submit_stub(job: Job, update: Update) -> PushOutcome:
    return PushOutcome(version_at_arrival=0, staleness=0, staleness_weight=1.0, version_after=0)


def _install_tributary_probes(probe: _Probe, aggregate: bool) -> None:
    """Time the server's own functions. Patched on the classes before the server
    is built: `add_TributaryServicer_to_server` binds `Push` when it registers."""
    TributaryServicer.Push = probe.timed("push", TributaryServicer.Push, handler=True)  # type: ignore[method-assign]
    Job.submit = probe.timed("submit", Job.submit if aggregate else _submit_stub)  # type: ignore[method-assign]
    # Both run under the job lock: their summed wall time is how long aggregation holds it.
    FedBuff.take = probe.timed("take", FedBuff.take)  # type: ignore[method-assign]
    Job._publish = probe.timed("publish", Job._publish)  # type: ignore[method-assign]


@contextlib.contextmanager
def _tributary_server(params: int, max_workers: int, probe: _Probe, aggregate: bool) -> Iterator[str]:
    _install_tributary_probes(probe, aggregate)
    job = JobConfig(job_id=JOB_ID, strategy=StrategyConfig(name="fedbuff"), max_staleness=None)
    # every client keeps a push open: no stream may be refused (the default keeps 16 threads spare)
    config = ServerConfig(
        address=f"{LOOPBACK}:0", max_workers=max_workers, max_concurrent_streams=max_workers - 1, jobs=(job,), insecure=True
    )
    initial = {JOB_ID: {TENSOR: np.zeros(params, dtype=np.float32)}}
    with running_server(config, initial, grace_s=1.0) as running:
        yield running.address


def _raw_handler(behaviour: Callable[..., Any]) -> grpc.GenericRpcHandler:
    method = grpc.stream_unary_rpc_method_handler(
        behaviour,
        request_deserializer=wrappers_pb2.BytesValue.FromString,
        response_serializer=wrappers_pb2.UInt64Value.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(RAW_SERVICE, {"Consume": method})


def _consume(requests: Iterator[wrappers_pb2.BytesValue], context: grpc.ServicerContext) -> wrappers_pb2.UInt64Value:
    # Reading `.value` materializes each chunk's bytes, as any real receiver must;
    # the count lets the client check that everything arrived.
    return wrappers_pb2.UInt64Value(value=sum(len(message.value) for message in requests))


@contextlib.contextmanager
def _raw_threaded_server(max_workers: int, probe: _Probe) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    server.add_generic_rpc_handlers((_raw_handler(probe.timed("push", _consume, handler=True)),))
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    try:
        yield f"{LOOPBACK}:{port}"
    finally:
        server.stop(1.0).wait()


async def _serve_raw_aio(conn: Connection, probe: _Probe) -> None:
    async def consume(requests: Any, context: grpc.aio.ServicerContext) -> wrappers_pb2.UInt64Value:
        probe.note_handler_thread()  # the event loop's thread
        received = 0
        async for message in requests:
            received += len(message.value)
        return wrappers_pb2.UInt64Value(value=received)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_raw_handler(consume),))
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    await server.start()
    # The control pipe blocks; keep it off the event loop.
    await asyncio.to_thread(_control_loop, conn, f"{LOOPBACK}:{port}", probe)
    await server.stop(1.0)


def _server_main(conn: Connection, target: str, params: int, max_workers: int) -> None:
    probe = _Probe()
    if target == RAW_AIO:
        asyncio.run(_serve_raw_aio(conn, probe))
        return
    serving = (
        _tributary_server(params, max_workers, probe, aggregate=target == TRIBUTARY)
        if target in TRIBUTARY_TARGETS
        else _raw_threaded_server(max_workers, probe)
    )
    with serving as address:
        _control_loop(conn, address, probe)


# --------------------------------------------------------------------------- #
# Client side: long-lived worker processes, one pushing thread per stream     #
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class WorkerTask:
    """One client process's share of a configuration: `threads` streams to each server."""

    addresses: dict[str, str]
    params: int
    threads: int
    worker: int


@dataclass(frozen=True)
class Window:
    """Push to `target` from `begin` (time.monotonic(), system-wide on Linux) for `seconds`."""

    target: str
    begin: float
    seconds: float
    max_updates: int
    """Per client; pushes started before the deadline finish and count."""


@dataclass
class WorkerReport:
    latencies_s: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    """time.monotonic() at which each thread's last push ended."""
    cpu_s: float = 0.0
    errors: list[str] = field(default_factory=list)


class _Pusher(Protocol):
    def push(self) -> None: ...

    def close(self) -> None: ...


class _TributaryPusher:
    def __init__(self, address: str, delta: np.ndarray, client_id: str) -> None:
        # No retries: a failed push must show up as an error, not as a slow push.
        self._client = Client(
            address, job=JOB_ID, client_id=client_id, timeout_s=PUSH_TIMEOUT_S, retry=RetryPolicy(max_attempts=1), insecure=True
        )
        self._base_version = self._client.pull().version
        self._delta = {TENSOR: delta}

    def push(self) -> None:
        self._client.push(self._base_version, self._delta)

    def close(self) -> None:
        self._client.close()


class _RawPusher:
    def __init__(self, address: str, delta: np.ndarray) -> None:
        self._channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(self._channel).result(timeout=SETUP_TIMEOUT_S)
        self._call = self._channel.stream_unary(
            RAW_METHOD,
            request_serializer=wrappers_pb2.BytesValue.SerializeToString,
            response_deserializer=wrappers_pb2.UInt64Value.FromString,
        )
        self._payload = delta.data.cast("B")

    def _requests(self) -> Iterator[wrappers_pb2.BytesValue]:
        # One bytes copy per chunk, as the SDK's chunker makes.
        for start in range(0, len(self._payload), CHUNK_BYTES):
            yield wrappers_pb2.BytesValue(value=bytes(self._payload[start : start + CHUNK_BYTES]))

    def push(self) -> None:
        received = self._call(self._requests(), timeout=PUSH_TIMEOUT_S).value
        if received != len(self._payload):
            raise RuntimeError(f"raw server received {received} of {len(self._payload)} bytes")

    def close(self) -> None:
        self._channel.close()


def _open_pushers(task: WorkerTask, delta: np.ndarray, thread: int) -> dict[str, _Pusher]:
    pushers: dict[str, _Pusher] = {}
    for target, address in task.addresses.items():
        if target in RAW_TARGETS:
            pushers[target] = _RawPusher(address, delta)
        else:  # a Tributary server, whatever the bench calls it (bench/observability.py names them by mode)
            pushers[target] = _TributaryPusher(address, delta, client_id=f"bench-{task.worker}-{thread}")
    return pushers


def _push_loop(pusher: _Pusher, window: Window, report: WorkerReport) -> None:
    latencies: list[float] = []
    time.sleep(max(0.0, window.begin - time.monotonic()))
    deadline = window.begin + window.seconds
    try:
        while time.monotonic() < deadline and len(latencies) < window.max_updates:
            pushed_at = time.perf_counter()
            pusher.push()
            latencies.append(time.perf_counter() - pushed_at)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which prints it
        report.errors.append(f"{window.target}: {error!r}"[:500])
    finally:
        # list.extend and list.append are atomic under the GIL.
        report.latencies_s.extend(latencies)
        report.ends.append(time.monotonic())


def _run_window(pushers: Sequence[_Pusher], window: Window) -> WorkerReport:
    report = WorkerReport()
    cpu = time.process_time()
    threads = [threading.Thread(target=_push_loop, args=(p, window, report), daemon=True) for p in pushers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.cpu_s = time.process_time() - cpu
    return report


def _serve_task(task: WorkerTask, delta: np.ndarray, conn: Connection) -> None:
    """Connect every thread to every server (pulling in parallel), then run the
    windows the parent sends until it sends None."""
    pushers: list[dict[str, _Pusher]] = []
    try:
        with futures.ThreadPoolExecutor(max_workers=task.threads) as pool:
            pushers = list(pool.map(lambda thread: _open_pushers(task, delta, thread), range(task.threads)))
        conn.send("ready")
    except Exception as error:  # noqa: BLE001 - the parent raises it
        conn.send(f"worker {task.worker} could not connect: {error!r}")
    try:
        while (window := conn.recv()) is not None:
            conn.send(_run_window([p[window.target] for p in pushers], window))
    finally:
        for by_target in pushers:
            for pusher in by_target.values():
                pusher.close()


def _worker_main(conn: Connection) -> None:
    # One delta per process, reused by every thread and push: 64 clients of 10M
    # parameters would otherwise hold 2.5 GB of identical payloads.
    deltas: dict[int, np.ndarray] = {}
    while (task := conn.recv()) is not None:
        if task.params not in deltas:
            deltas.clear()
            deltas[task.params] = _make_delta(task.params)
        _serve_task(task, deltas[task.params], conn)


def _make_delta(params: int) -> np.ndarray:
    rng = np.random.default_rng(params)
    return rng.standard_normal(params, dtype=np.float32) * np.float32(1e-3)


# --------------------------------------------------------------------------- #
# Orchestration: the parent process                                           #
# --------------------------------------------------------------------------- #


def _receive(pipe: Connection, timeout_s: float) -> Any:
    if not pipe.poll(timeout_s):
        raise TimeoutError(f"no answer from a bench process within {timeout_s:.0f} s")
    return pipe.recv()


class ClientPool:
    """Client processes spawned once and reused by every configuration:
    spawning one and importing grpc, numpy and the SDK costs about a second."""

    def __init__(self, context: multiprocessing.context.SpawnContext, size: int) -> None:
        self._pipes: list[Connection] = []
        self._processes: list[multiprocessing.context.SpawnProcess] = []
        for index in range(size):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker_main, args=(theirs,), name=f"bench-client-{index}", daemon=True)
            process.start()
            self._pipes.append(ours)
            self._processes.append(process)
        self._active: list[Connection] = []

    @contextlib.contextmanager
    def connected(self, tasks: Sequence[WorkerTask]) -> Iterator[None]:
        """Every task's threads connected to every server until the block exits."""
        self._active = self._pipes[: len(tasks)]
        for pipe, task in zip(self._active, tasks):
            pipe.send(task)
        try:
            answers = [_receive(pipe, SETUP_TIMEOUT_S) for pipe in self._active]
            failures = [a for a in answers if a != "ready"]
            if failures:
                raise RuntimeError("; ".join(failures))
            yield
        finally:
            for pipe in self._active:
                pipe.send(None)

    def run_window(self, window: Window) -> list[WorkerReport]:
        for pipe in self._active:
            pipe.send(window)
        return [_receive(pipe, window.seconds + 2 * PUSH_TIMEOUT_S) for pipe in self._active]

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


class ServerProcess:
    """One server in a spawned process, driven over a pipe. Starts at once;
    `wait_ready` lets several start side by side."""

    def __init__(self, context: multiprocessing.context.SpawnContext, target: str, params: int, max_workers: int) -> None:
        self.target = target
        self.address = ""
        self._pipe, theirs = context.Pipe()
        self._process = context.Process(
            target=_server_main, args=(theirs, target, params, max_workers), name=f"bench-server-{target}", daemon=True
        )
        self._process.start()

    def wait_ready(self) -> None:
        self.address = _receive(self._pipe, SERVER_START_TIMEOUT_S)

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    def snapshot(self) -> ServerSnapshot:
        self._pipe.send("snapshot")
        return _receive(self._pipe, 30.0)  # type: ignore[no-any-return]

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._pipe.send("stop")
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


class RssSampler:
    """Peak resident set size of a process, sampled with psutil while the block runs."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak_bytes = 0

    def _sample(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
            if self._stop.wait(RSS_SAMPLE_S):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class WindowResult:
    begin: float
    reports: list[WorkerReport]
    before: ServerSnapshot
    after: ServerSnapshot
    peak_rss_bytes: int
    machine_cores_busy: float

    @property
    def updates(self) -> int:
        return sum(len(r.latencies_s) for r in self.reports)

    @property
    def elapsed_s(self) -> float:
        # Pushes started before the deadline count whole, so the window ends
        # when the last one does.
        return max([e for r in self.reports for e in r.ends] + [self.begin + 1e-9]) - self.begin


@dataclass(frozen=True)
class ServerBreakdown:
    """Where a server's time went, summed over its windows. Rates are core-seconds
    per second of server wall time: 1.0 is one core busy the whole time."""

    wall_s: float
    cpu: float
    handlers: float
    """RPC handler threads; for Tributary the servicer's Push: copying chunks into the payload buffer, submit."""
    poller: float
    """grpc's Python poller thread (threaded servers): deserializing every request message."""
    core: float
    """Everything else: grpc core's native threads (sockets, HTTP/2), the main thread."""
    aggregating: float
    """Thread CPU in Job.submit: NaN/Inf check, fedbuff accumulate, publishing versions."""
    receiving: float
    """cpu - aggregating: receiving, deserializing and assembling payloads."""
    lock_busy: float
    """Fraction of wall time the job lock was held by FedBuff.take and publishing."""
    lock_ms_wall: float
    """Per update, wall time aggregation held the job lock ..."""
    lock_ms_cpu: float
    """... and the CPU it used meanwhile; the difference is time the lock holder waited for the GIL or a core."""
    submit_ms_wall: float
    """Per update, wall time in Job.submit, waiting for the lock included."""


def _breakdown(windows: Sequence[WindowResult]) -> ServerBreakdown:
    def total(part: Callable[[ServerSnapshot, ServerSnapshot], float]) -> float:
        return sum(part(w.before, w.after) for w in windows)

    def threads(pick: Callable[[ServerSnapshot], frozenset[int]]) -> Callable[[ServerSnapshot, ServerSnapshot], float]:
        return lambda b, a: sum(a.thread_cpu_s.get(t, 0.0) - b.thread_cpu_s.get(t, 0.0) for t in pick(a))

    def counter(name: str) -> float:
        return total(lambda b, a: a.counters.get(name, 0.0) - b.counters.get(name, 0.0))

    wall = max(total(lambda b, a: a.at - b.at), 1e-9)
    cpu = total(lambda b, a: a.cpu_s - b.cpu_s)
    handlers = total(threads(lambda s: s.handler_tids))
    poller = total(threads(lambda s: s.poller_tids - s.handler_tids))
    aggregating = counter("submit_cpu")
    takes = max(counter("take_calls"), 1.0)
    return ServerBreakdown(
        wall_s=wall,
        cpu=cpu / wall,
        handlers=handlers / wall,
        poller=poller / wall,
        core=max(cpu - handlers - poller, 0.0) / wall,
        aggregating=aggregating / wall,
        receiving=(cpu - aggregating) / wall,
        lock_busy=(counter("take_wall") + counter("publish_wall")) / wall,
        lock_ms_wall=(counter("take_wall") + counter("publish_wall")) / takes * 1e3,
        lock_ms_cpu=(counter("take_cpu") + counter("publish_cpu")) / takes * 1e3,
        submit_ms_wall=counter("submit_wall") / max(counter("submit_calls"), 1.0) * 1e3,
    )


@dataclass(frozen=True)
class RunResult:
    target: str
    params: int
    clients: int
    layout: str
    """client processes x threads per process (the largest share)."""
    updates: int
    updates_per_s: float
    mb_per_s: float
    """Median over the windows."""
    mb_per_s_windows: list[float]
    p50_ms: float
    p99_ms: float
    server_peak_rss_mib: float
    client_cpu: float
    """Core-seconds per second used by all client processes together."""
    machine_cpu: float
    """Cores the whole machine kept busy (clients, server, kernel), mean over the windows."""
    server: ServerBreakdown
    errors: list[str]


def _summarize(target: str, params: int, clients: int, layout: str, windows: Sequence[WindowResult]) -> RunResult:
    latencies = np.array([x for w in windows for r in w.reports for x in r.latencies_s])
    rates = [w.updates / w.elapsed_s for w in windows]
    elapsed = sum(w.elapsed_s for w in windows)

    def percentile_ms(q: float) -> float:
        return float(np.percentile(latencies, q)) * 1e3 if latencies.size else float("nan")

    return RunResult(
        target=target,
        params=params,
        clients=clients,
        layout=layout,
        updates=int(latencies.size),
        updates_per_s=statistics.median(rates),
        mb_per_s=statistics.median(rates) * params * 4 / MB,
        mb_per_s_windows=[rate * params * 4 / MB for rate in rates],
        p50_ms=percentile_ms(50),
        p99_ms=percentile_ms(99),
        server_peak_rss_mib=max(w.peak_rss_bytes for w in windows) / MIB,
        client_cpu=sum(r.cpu_s for w in windows for r in w.reports) / elapsed,
        machine_cpu=statistics.fmean(w.machine_cores_busy for w in windows),
        server=_breakdown(windows),
        errors=[e for w in windows for r in w.reports for e in r.errors],
    )


@dataclass(frozen=True)
class Settings:
    targets: tuple[str, ...]
    seconds: float
    rounds: int
    max_updates: int
    client_procs: int

    @property
    def window_s(self) -> float:
        return self.seconds / self.rounds


def _procs_for(clients: int, max_procs: int) -> int:
    # At least two threads per process where N allows, so each process
    # multiplexes several streams on its connection, as an app's threads would.
    return max(1, min(max_procs, clients // 2))


def _split(clients: int, procs: int) -> list[int]:
    base, extra = divmod(clients, procs)
    return [base + (1 if i < extra else 0) for i in range(procs)]


def _busy_cores(before: Any, after: Any, wall_s: float) -> float:
    """Cores the whole machine kept busy between two psutil.cpu_times(): on a
    small box the clients, the server and the kernel's loopback share them."""
    idle = (after.idle + getattr(after, "iowait", 0.0)) - (before.idle + getattr(before, "iowait", 0.0))
    return max(psutil.cpu_count() - idle / wall_s, 0.0) if wall_s > 0 else 0.0


def _measure_window(server: ServerProcess, pool: ClientPool, settings: Settings) -> WindowResult:
    with RssSampler(server.pid) as rss:
        before = server.snapshot()
        machine_before = psutil.cpu_times()
        begin = time.monotonic() + START_DELAY_S
        reports = pool.run_window(Window(server.target, begin, settings.window_s, settings.max_updates))
        machine_after = psutil.cpu_times()
        after = server.snapshot()
    busy = _busy_cores(machine_before, machine_after, after.at - before.at)
    return WindowResult(begin, reports, before, after, rss.peak_bytes, busy)


def run_configuration(
    params: int, clients: int, settings: Settings, pool: ClientPool, context: multiprocessing.context.SpawnContext
) -> list[RunResult]:
    # Every open stream holds a thread of a threaded server; both get the same pool.
    max_workers = max(ServerConfig.max_workers, clients + 4)
    threads = _split(clients, _procs_for(clients, settings.client_procs))
    windows: dict[str, list[WindowResult]] = {target: [] for target in settings.targets}
    with contextlib.ExitStack() as stack:
        servers = [ServerProcess(context, target, params, max_workers) for target in settings.targets]
        for server in servers:
            stack.callback(server.stop)
        for server in servers:
            server.wait_ready()
        addresses = {s.target: s.address for s in servers}
        tasks = [WorkerTask(addresses, params, n, index) for index, n in enumerate(threads)]
        with pool.connected(tasks):
            for round_ in range(settings.rounds):
                # Rotate the order so no server always runs first or last.
                shift = round_ % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    windows[server.target].append(_measure_window(server, pool, settings))
    layout = f"{len(threads)}x{max(threads)}"
    return [_summarize(target, params, clients, layout, windows[target]) for target in settings.targets]


def aggregation_only(params: int, min_seconds: float = 0.5) -> float:
    """MB/s that Job.submit alone sustains on one thread, no gRPC: the ceiling
    aggregation puts on ingest. Measured after one warm-up buffer, over whole
    buffers, so publishing versions is included."""
    job_config = JobConfig(job_id=JOB_ID, strategy=StrategyConfig(name="fedbuff"))
    job = Job(job_config, {TENSOR: np.zeros(params, dtype=np.float32)})
    delta = {TENSOR: _make_delta(params)}
    specs = tuple(specs_of(delta))
    buffer_size = job_config.strategy.buffer_size

    def submit() -> None:
        header = UpdateHeader(JOB_ID, "agg-only", uuid.uuid4().hex, base_version=0, num_samples=1, specs=specs)
        job.submit(Update(header, delta))

    for _ in range(buffer_size):
        submit()
    count, started = 0, time.perf_counter()
    while count < 2 * buffer_size or count % buffer_size or time.perf_counter() - started < min_seconds:
        submit()
        count += 1
    return count * params * 4 / (time.perf_counter() - started) / MB


# --------------------------------------------------------------------------- #
# Reporting                                                                    #
# --------------------------------------------------------------------------- #


_count = count_label
_parse_count = parse_count


def comparisons(results: Sequence[RunResult], agg_only: dict[int, float]) -> list[dict[str, Any]]:
    """Per (P, N): every server against raw-thr, and Tributary's server breakdown."""
    by_key = {(r.params, r.clients, r.target): r for r in results}
    rows = []
    for params, clients in dict.fromkeys((r.params, r.clients) for r in results):
        raw = by_key.get((params, clients, RAW_THREADED))
        tributary = by_key.get((params, clients, TRIBUTARY))
        row: dict[str, Any] = {"params": params, "clients": clients}
        for target in (TRIBUTARY, TRIBUTARY_NO_AGGREGATION, RAW_AIO):
            other = by_key.get((params, clients, target))
            ok = other is not None and raw is not None and raw.mb_per_s > 0
            row[f"{target}/{RAW_THREADED}"] = other.mb_per_s / raw.mb_per_s if ok else None  # type: ignore[union-attr]
        row["tributary_server"] = dataclasses.asdict(tributary.server) if tributary else None
        row["aggregation_only_mb_per_s"] = agg_only.get(params)
        rows.append(row)
    return rows


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(results: Sequence[RunResult], rows: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # a log file should not wrap the tables

    runs = Table(title="Ingest: N clients pushing P float32 parameters over loopback gRPC (MB = 10^6 bytes; rates are medians of the windows)")
    for name in ("P", "N", "procs x thr", "server", "upd/s", "MB/s", "p50 ms", "p99 ms", "srv peak RSS MiB", "srv CPU", "cli CPU", "box CPU"):
        runs.add_column(name, justify="right")
    for r in results:
        runs.add_row(
            _count(r.params), str(r.clients), r.layout, r.target, f"{r.updates_per_s:.1f}", f"{r.mb_per_s:.0f}",
            f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", f"{r.server_peak_rss_mib:.0f}", f"{r.server.cpu:.2f}", f"{r.client_cpu:.2f}",
            f"{r.machine_cpu:.2f}",
        )
    console.print(runs)

    where = Table(title="Against raw threaded gRPC, and where the tributary server's time goes (core-seconds per second of wall)")
    for name in (
        "P", "N", "trib/raw", "noagg/raw", "aio/raw", "aggregating", "recv+decode", "lock busy",
        "lock ms/upd wall|cpu", "handlers", "poller", "grpc core", "agg-only MB/s",
    ):
        where.add_column(name, justify="right")
    for row in rows:
        s = row["tributary_server"] or {}
        lock_ms = f"{s['lock_ms_wall']:.1f} | {s['lock_ms_cpu']:.1f}" if s else "-"
        where.add_row(
            _count(row["params"]), str(row["clients"]), _fmt(row[f"{TRIBUTARY}/{RAW_THREADED}"], ".0%"),
            _fmt(row[f"{TRIBUTARY_NO_AGGREGATION}/{RAW_THREADED}"], ".0%"), _fmt(row[f"{RAW_AIO}/{RAW_THREADED}"], ".0%"),
            _fmt(s.get("aggregating")), _fmt(s.get("receiving")), _fmt(s.get("lock_busy"), ".0%"), lock_ms,
            _fmt(s.get("handlers")), _fmt(s.get("poller")), _fmt(s.get("core")), _fmt(row["aggregation_only_mb_per_s"], ".0f"),
        )
    console.print(where)

    for r in results:
        for error in r.errors[:3]:
            console.print(f"[red]error[/red] P={_count(r.params)} N={r.clients}: {error}")
    target = next((row for row in rows if (row["params"], row["clients"]) == TARGET_CONFIG), None)
    if target and target[f"{TRIBUTARY}/{RAW_THREADED}"] is not None:
        ratio = target[f"{TRIBUTARY}/{RAW_THREADED}"]
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        console.print(f"target P=1M N=16: tributary moves {ratio:.0%} of raw threaded gRPC's MB/s (goal >= {TARGET_RATIO:.0%}): {verdict}")


def write_json(
    path: Path, settings: Settings, results: Sequence[RunResult], rows: Sequence[dict[str, Any]], agg_only: dict[int, float]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "throughput",
        "command": ["python", "-m", "bench.throughput", *sys.argv[1:]],
        "machine": machine(grpcio=grpc.__version__),
        "settings": dataclasses.asdict(settings),
        "runs": [dataclasses.asdict(r) for r in results],
        "comparisons": list(rows),
        "aggregation_only_mb_per_s": {str(p): v for p, v in agg_only.items()},
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


# --------------------------------------------------------------------------- #
# CLI                                                                          #
# --------------------------------------------------------------------------- #


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description="Tributary ingest throughput against raw gRPC client streaming, on loopback.",
    )
    parser.add_argument("--clients", type=_parse_count, nargs="+", default=[4, 16, 64], help="concurrent streams N (default: 4 16 64)")
    parser.add_argument("--params", type=_parse_count, nargs="+", default=[100_000, 1_000_000, 10_000_000], help="float32 parameters P (default: 100k 1M 10M)")
    parser.add_argument("--seconds", type=float, default=4.0, help="pushing time per server and configuration, split into --rounds windows (default: 4)")
    parser.add_argument("--rounds", type=_parse_count, default=3, help="interleaved windows per server and configuration (default: 3)")
    parser.add_argument("--max-updates", type=_parse_count, default=10_000, help="pushes per client and window at most (default: 10000)")
    parser.add_argument("--client-procs", type=_parse_count, default=4, help="client processes at most, N/procs threads each (default: 4)")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS), help="servers to measure (default: all)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results (default: bench/results/throughput.json)")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(tuple(dict.fromkeys(args.targets)), args.seconds, args.rounds, args.max_updates, args.client_procs)
    context = multiprocessing.get_context("spawn")  # grpc does not survive fork
    started = time.monotonic()
    agg_only = {params: aggregation_only(params) for params in args.params}
    pool = ClientPool(context, max(_procs_for(n, settings.client_procs) for n in args.clients))
    results: list[RunResult] = []
    try:
        for params in args.params:
            for clients in args.clients:
                for result in run_configuration(params, clients, settings, pool, context):
                    results.append(result)
                    print(
                        f"{_count(params):>5} x{clients:<3} {result.target:<10} {result.mb_per_s:7.0f} MB/s "
                        f"({' '.join(f'{x:.0f}' for x in result.mb_per_s_windows)})  p99 {result.p99_ms:8.1f} ms",
                        flush=True,
                    )
    finally:
        pool.close()
    rows = comparisons(results, agg_only)
    print_report(results, rows)
    write_json(args.json, settings, results, rows, agg_only)
    print(f"wrote {args.json} after {time.monotonic() - started:.0f} s")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
