"""Server ingest throughput: N concurrent clients pushing P float32 parameters.

Per (P, N) configuration, three servers, each in its own process, on loopback:

  raw-thr    the reference: a generic gRPC handler that only consumes a client
             stream of 1 MiB `BytesValue` chunks, on a threaded `grpc.server`
  raw-aio    the same handler on a `grpc.aio` server
  tributary  `server.app.running_server` with one fedbuff job (no staleness
             bound, so nothing is rejected); every client pulls once and then
             pushes deltas on that version with `client_sdk.Client.push`

All three see the same client side: N streams spread over several client
processes (Python threads in one process share a GIL, so one process cannot
drive N streams), several threads each, the same payload, and the same one
copy per 1 MiB chunk out of a numpy array. Read the ratios to raw-thr: they
hold on a noisy machine, absolute rates do not.

Where the server's time goes is read inside the server process: the CPU of
every thread (psutil), sorted into RPC handler threads, grpc's Python poller
thread (the sync server deserializes every request message there) and grpc
core's native threads; plus the thread CPU spent in `Job.submit` (aggregation:
the NaN/Inf check, the fedbuff accumulate and publishing a version) and the
wall time aggregation holds the job lock.

    python -m bench.throughput                       # default matrix, ~5 min on 2 cores
    python -m bench.throughput --clients 16 --params 1M --seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import multiprocessing as mp
import multiprocessing.context
import platform
import subprocess
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
import psutil
from google.protobuf import wrappers_pb2

from client_sdk import Client, RetryPolicy
from proto.tensors import CHUNK_BYTES, specs_of
from server import JobConfig, ServerConfig, StrategyConfig
from server.app import running_server
from server.core import Job, Update, UpdateHeader
from server.servicer import TributaryServicer
from server.strategies import FedBuff

RAW_THREADED = "raw-thr"
RAW_AIO = "raw-aio"
TRIBUTARY = "tributary"
TARGETS = (RAW_THREADED, RAW_AIO, TRIBUTARY)

JOB_ID = "bench"
TENSOR = "w"
RAW_SERVICE = "bench.Sink"
RAW_METHOD = f"/{RAW_SERVICE}/Consume"
LOOPBACK = "127.0.0.1"

PUSH_TIMEOUT_S = 180.0
"""Per push; 64 streams of 40 MB share two cores, so one push may take seconds."""
START_DELAY_S = 0.3
"""Clients start together this long after the start message, so no process gets a head start."""
RSS_SAMPLE_S = 0.02
SERVER_START_TIMEOUT_S = 60.0
SETUP_TIMEOUT_S = 300.0
"""Connecting and (for tributary) pulling the model: 64 pulls of 40 MB take a while on 2 cores."""
TARGET_RATIO = 0.5
TARGET_CONFIG = (1_000_000, 16)
MB = 1e6
MIB = 1 << 20

T = TypeVar("T")


# --------------------------------------------------------------------------- #
# Server side: runs in its own spawned process                                 #
# --------------------------------------------------------------------------- #


class _Probe:
    """Cumulative counters filled by wrapped server functions, read by snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: collections.Counter[str] = collections.Counter()
        self.handler_tids: set[int] = set()

    def add(self, name: str, cpu_s: float, wall_s: float) -> None:
        with self._lock:
            self.counters[f"{name}_cpu"] += cpu_s
            self.counters[f"{name}_wall"] += wall_s
            self.counters[f"{name}_calls"] += 1

    def note_handler_thread(self) -> None:
        with self._lock:
            self.handler_tids.add(threading.get_native_id())

    def timed(self, name: str, fn: Callable[..., T], *, handler: bool = False) -> Callable[..., T]:
        """`fn`, adding its thread CPU (time spent waiting on a lock or a
        socket costs none) and wall time to the counters `name_*`."""

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
    """Cumulative CPU of a server process at one instant; two of them bound a run."""

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
    # target is `_serve`; it deserializes every request message for every RPC.
    poller = frozenset(t.native_id for t in threading.enumerate() if "_serve" in t.name and t.native_id)
    with probe._lock:
        counters = dict(probe.counters)
        handlers = frozenset(probe.handler_tids)
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


def _install_tributary_probes(probe: _Probe) -> None:
    """Time the server's own functions. Patched on the classes before the server
    is built: `add_TributaryServicer_to_server` binds `Push` at registration."""
    TributaryServicer.Push = probe.timed("push", TributaryServicer.Push, handler=True)  # type: ignore[method-assign]
    Job.submit = probe.timed("submit", Job.submit)  # type: ignore[method-assign]
    # Both run under the job lock: their summed wall time is how long the lock is busy aggregating.
    FedBuff.take = probe.timed("take", FedBuff.take)  # type: ignore[method-assign]
    Job._publish = probe.timed("publish", Job._publish)  # type: ignore[method-assign]


@contextlib.contextmanager
def _tributary_server(params: int, max_workers: int, probe: _Probe) -> Iterator[str]:
    _install_tributary_probes(probe)
    job = JobConfig(job_id=JOB_ID, strategy=StrategyConfig(name="fedbuff"), max_staleness=None)
    config = ServerConfig(address=f"{LOOPBACK}:0", max_workers=max_workers, jobs=(job,))
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
    # Reading `.value` materializes the bytes, as a real receiver must; the count
    # lets the client check that everything arrived.
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
        _tributary_server(params, max_workers, probe)
        if target == TRIBUTARY
        else _raw_threaded_server(max_workers, probe)
    )
    with serving as address:
        _control_loop(conn, address, probe)


# --------------------------------------------------------------------------- #
# Client side: long-lived worker processes, several pushing threads each      #
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class WorkerTask:
    target: str
    address: str
    params: int
    threads: int
    seconds: float
    max_updates: int
    worker: int


@dataclass
class WorkerReport:
    latencies_s: list[float] = field(default_factory=list)
    ended_at: float = 0.0
    """time.monotonic() when this process's last push ended (the clock is system-wide on Linux)."""
    cpu_s: float = 0.0
    errors: list[str] = field(default_factory=list)


class _Pusher(Protocol):
    def push(self) -> None: ...

    def close(self) -> None: ...


class _TributaryPusher:
    def __init__(self, address: str, delta: np.ndarray, client_id: str) -> None:
        # No retries: a failed push must show up as an error, not as a slow push.
        self._client = Client(address, job=JOB_ID, client_id=client_id, timeout_s=PUSH_TIMEOUT_S, retry=RetryPolicy(max_attempts=1))
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
        self._payload = memoryview(delta).cast("B")

    def _requests(self) -> Iterator[wrappers_pb2.BytesValue]:
        # One bytes copy per chunk, exactly what the SDK's chunker does.
        for start in range(0, len(self._payload), CHUNK_BYTES):
            yield wrappers_pb2.BytesValue(value=bytes(self._payload[start : start + CHUNK_BYTES]))

    def push(self) -> None:
        received = self._call(self._requests(), timeout=PUSH_TIMEOUT_S).value
        if received != len(self._payload):
            raise RuntimeError(f"raw server received {received} of {len(self._payload)} bytes")

    def close(self) -> None:
        self._channel.close()


def _open_pusher(task: WorkerTask, delta: np.ndarray, thread: int) -> _Pusher:
    if task.target == TRIBUTARY:
        return _TributaryPusher(task.address, delta, client_id=f"bench-{task.worker}-{thread}")
    return _RawPusher(task.address, delta)


class _StartSignal:
    """Carries the common start time from the worker's main thread to its pushers."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._at = 0.0

    def fire(self, at: float) -> None:
        self._at = at
        self._event.set()

    def wait(self) -> float:
        self._event.wait()
        return self._at


def _push_loop(
    task: WorkerTask, delta: np.ndarray, thread: int, ready: threading.Barrier, start: _StartSignal, report: WorkerReport
) -> None:
    latencies: list[float] = []
    pusher: _Pusher | None = None
    try:
        pusher = _open_pusher(task, delta, thread)
        ready.wait()
        begin = start.wait()
        deadline = begin + task.seconds
        time.sleep(max(0.0, begin - time.monotonic()))
        while time.monotonic() < deadline and len(latencies) < task.max_updates:
            pushed_at = time.perf_counter()
            pusher.push()
            latencies.append(time.perf_counter() - pushed_at)
    except threading.BrokenBarrierError:
        pass  # another thread failed its setup and reported why
    except Exception as error:  # noqa: BLE001 - reported to the orchestrator, which prints it
        report.errors.append(f"{task.target} worker {task.worker} thread {thread}: {error!r}"[:500])
        ready.abort()
    finally:
        if pusher is not None:
            pusher.close()
        report.latencies_s.extend(latencies)  # list.extend is atomic under the GIL
        report.ended_at = max(report.ended_at, time.monotonic())


def _run_task(task: WorkerTask, delta: np.ndarray, conn: Connection) -> WorkerReport:
    report = WorkerReport()
    ready = threading.Barrier(task.threads + 1)
    start = _StartSignal()
    threads = [
        threading.Thread(target=_push_loop, args=(task, delta, i, ready, start, report), daemon=True)
        for i in range(task.threads)
    ]
    for thread in threads:
        thread.start()
    try:
        ready.wait(timeout=SETUP_TIMEOUT_S)
        conn.send("ready")
    except threading.BrokenBarrierError:
        conn.send("failed")
    begin = conn.recv()
    cpu_before = time.process_time()
    start.fire(begin)
    for thread in threads:
        thread.join()
    report.cpu_s = time.process_time() - cpu_before
    return report


def _worker_main(conn: Connection) -> None:
    # One delta per process, reused by every thread and push: 64 clients of 10M
    # parameters would otherwise hold 2.5 GB of identical payloads.
    deltas: dict[int, np.ndarray] = {}
    while (task := conn.recv()) is not None:
        if task.params not in deltas:
            deltas.clear()
            deltas[task.params] = _make_delta(task.params)
        conn.send(_run_task(task, deltas[task.params], conn))


def _make_delta(params: int) -> np.ndarray:
    rng = np.random.default_rng(params)
    return (rng.standard_normal(params, dtype=np.float32) * np.float32(1e-3)).astype(np.float32)


# --------------------------------------------------------------------------- #
# Orchestration: the parent process                                           #
# --------------------------------------------------------------------------- #


class ClientPool:
    """Client processes spawned once and reused by every run: spawning one and
    importing grpc, numpy and the SDK costs about a second."""

    def __init__(self, context: multiprocessing.context.SpawnContext, size: int) -> None:
        self._pipes: list[Connection] = []
        self._processes: list[mp.process.BaseProcess] = []
        for index in range(size):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker_main, args=(theirs,), name=f"bench-client-{index}", daemon=True)
            process.start()
            self._pipes.append(ours)
            self._processes.append(process)
        self._active: list[Connection] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    def prepare(self, tasks: Sequence[WorkerTask]) -> bool:
        """Hand out tasks and wait until every thread is connected (and has
        pulled). False when some thread could not set up."""
        self._active = self._pipes[: len(tasks)]
        for pipe, task in zip(self._active, tasks):
            pipe.send(task)
        return all(_receive(pipe, SETUP_TIMEOUT_S) == "ready" for pipe in self._active)

    def start(self, at: float) -> None:
        for pipe in self._active:
            pipe.send(at)

    def collect(self, timeout_s: float) -> list[WorkerReport]:
        return [_receive(pipe, timeout_s) for pipe in self._active]

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def _receive(pipe: Connection, timeout_s: float) -> Any:
    if not pipe.poll(timeout_s):
        raise TimeoutError(f"no answer from a bench process within {timeout_s:.0f} s")
    return pipe.recv()


class ServerProcess:
    """One server in a spawned process, driven over a pipe."""

    def __init__(self, context: multiprocessing.context.SpawnContext, target: str, params: int, max_workers: int) -> None:
        self._pipe, theirs = context.Pipe()
        self._process = context.Process(
            target=_server_main, args=(theirs, target, params, max_workers), name=f"bench-server-{target}", daemon=True
        )

    def __enter__(self) -> ServerProcess:
        self._process.start()
        self.address: str = _receive(self._pipe, SERVER_START_TIMEOUT_S)
        return self

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    def snapshot(self) -> ServerSnapshot:
        self._pipe.send("snapshot")
        return _receive(self._pipe, 30.0)  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
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
class RunConfig:
    target: str
    params: int
    clients: int
    procs: int
    seconds: float
    max_updates: int

    @property
    def threads_per_proc(self) -> list[int]:
        base, extra = divmod(self.clients, self.procs)
        return [base + (1 if i < extra else 0) for i in range(self.procs)]

    @property
    def payload_bytes(self) -> int:
        return self.params * 4


@dataclass(frozen=True)
class ServerBreakdown:
    """Where the server's time went during a run, each as core-seconds per
    second of server wall time (so 1.0 is one core busy the whole run)."""

    wall_s: float
    cpu: float
    handlers: float
    """RPC handler threads: for tributary, the servicer's Push (copying chunks into the payload buffer, submit)."""
    poller: float
    """grpc's Python poller thread (sync servers): deserializing every message."""
    core: float
    """Everything else: grpc core's native threads (sockets, HTTP/2), the main thread."""
    aggregating: float
    """Thread CPU in Job.submit: NaN/Inf check, fedbuff accumulate, publishing versions."""
    receiving: float
    """cpu - aggregating: receiving, deserializing and assembling the payload."""
    lock_busy: float
    """Fraction of wall time the job lock was held by FedBuff.take and publishing."""


@dataclass(frozen=True)
class RunResult:
    target: str
    params: int
    clients: int
    layout: str
    updates: int
    elapsed_s: float
    updates_per_s: float
    mb_per_s: float
    p50_ms: float
    p99_ms: float
    server_peak_rss_mib: float
    client_cpu: float
    """Core-seconds per second used by all client processes together."""
    server: ServerBreakdown
    errors: list[str]


def _breakdown(before: ServerSnapshot, after: ServerSnapshot) -> ServerBreakdown:
    wall = max(after.at - before.at, 1e-9)

    def threads_cpu(tids: frozenset[int]) -> float:
        return sum(after.thread_cpu_s.get(t, 0.0) - before.thread_cpu_s.get(t, 0.0) for t in tids)

    def counter(name: str) -> float:
        return after.counters.get(name, 0.0) - before.counters.get(name, 0.0)

    cpu = after.cpu_s - before.cpu_s
    handlers = threads_cpu(after.handler_tids)
    poller = threads_cpu(after.poller_tids - after.handler_tids)
    aggregating = counter("submit_cpu")
    return ServerBreakdown(
        wall_s=wall,
        cpu=cpu / wall,
        handlers=handlers / wall,
        poller=poller / wall,
        core=max(cpu - handlers - poller, 0.0) / wall,
        aggregating=aggregating / wall,
        receiving=(cpu - aggregating) / wall,
        lock_busy=(counter("take_wall") + counter("publish_wall")) / wall,
    )


def run_one(config: RunConfig, pool: ClientPool, context: multiprocessing.context.SpawnContext) -> RunResult:
    # Every stream holds a server thread; both threaded servers get the same pool.
    max_workers = max(ServerConfig.max_workers, config.clients + 4)
    with ServerProcess(context, config.target, config.params, max_workers) as server:
        tasks = [
            WorkerTask(config.target, server.address, config.params, threads, config.seconds, config.max_updates, index)
            for index, threads in enumerate(config.threads_per_proc)
        ]
        setup_ok = pool.prepare(tasks)
        with RssSampler(server.pid) as rss:
            before = server.snapshot()
            begin = time.monotonic() + START_DELAY_S
            pool.start(begin)
            reports = pool.collect(config.seconds + 2 * PUSH_TIMEOUT_S)
            after = server.snapshot()
    errors = [e for r in reports for e in r.errors] + ([] if setup_ok else ["some clients failed to connect"])
    return _summarize(config, begin, reports, _breakdown(before, after), rss.peak_bytes, errors)


def _summarize(
    config: RunConfig,
    begin: float,
    reports: Sequence[WorkerReport],
    server: ServerBreakdown,
    peak_rss: int,
    errors: list[str],
) -> RunResult:
    latencies = np.array([x for r in reports for x in r.latencies_s])
    # Every push that started before the deadline is counted whole, so the run
    # ends when the last one does.
    elapsed = max((r.ended_at for r in reports), default=begin) - begin
    elapsed = max(elapsed, 1e-9)
    updates = int(latencies.size)
    percentile = (lambda q: float(np.percentile(latencies, q)) * 1e3) if updates else (lambda q: float("nan"))
    return RunResult(
        target=config.target,
        params=config.params,
        clients=config.clients,
        layout=f"{config.procs}x{max(config.threads_per_proc)}",
        updates=updates,
        elapsed_s=elapsed,
        updates_per_s=updates / elapsed,
        mb_per_s=updates * config.payload_bytes / elapsed / MB,
        p50_ms=percentile(50),
        p99_ms=percentile(99),
        server_peak_rss_mib=peak_rss / MIB,
        client_cpu=sum(r.cpu_s for r in reports) / elapsed,
        server=server,
        errors=errors,
    )


def aggregation_only(params: int, min_seconds: float = 0.5) -> float:
    """MB/s that Job.submit alone sustains on one thread, no gRPC: the ceiling
    aggregation puts on ingest. At least one buffer's worth, so publishing a
    version is included."""
    job_config = JobConfig(job_id=JOB_ID, strategy=StrategyConfig(name="fedbuff"))
    job = Job(job_config, {TENSOR: np.zeros(params, dtype=np.float32)})
    delta = {TENSOR: _make_delta(params)}
    specs = tuple(specs_of(delta))
    count, started = 0, time.perf_counter()
    while count < job_config.strategy.buffer_size or time.perf_counter() - started < min_seconds:
        header = UpdateHeader(JOB_ID, "agg-only", uuid.uuid4().hex, base_version=0, num_samples=1, specs=specs)
        job.submit(Update(header, delta))
        count += 1
    return count * params * 4 / (time.perf_counter() - started) / MB


# --------------------------------------------------------------------------- #
# Reporting                                                                    #
# --------------------------------------------------------------------------- #


def _count(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def _parse_count(text: str) -> int:
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 100000, 100k or 1M, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def comparisons(results: Sequence[RunResult], agg_only: dict[int, float]) -> list[dict[str, Any]]:
    """Per (P, N): tributary and raw-aio against raw-thr, and tributary's server breakdown."""
    by_key = {(r.params, r.clients, r.target): r for r in results}
    rows = []
    for params, clients in dict.fromkeys((r.params, r.clients) for r in results):
        raw = by_key.get((params, clients, RAW_THREADED))
        aio = by_key.get((params, clients, RAW_AIO))
        trib = by_key.get((params, clients, TRIBUTARY))
        ratio = (lambda r: r.mb_per_s / raw.mb_per_s if r and raw and raw.mb_per_s else None)
        rows.append(
            {
                "params": params,
                "clients": clients,
                "tributary_over_raw_threaded": ratio(trib),
                "raw_aio_over_raw_threaded": ratio(aio),
                "tributary_server": dataclasses.asdict(trib.server) if trib else None,
                "aggregation_only_mb_per_s": agg_only.get(params),
            }
        )
    return rows


def print_report(results: Sequence[RunResult], rows: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    runs = Table(title="Ingest: N clients pushing P float32 parameters over loopback gRPC (MB = 10^6 bytes)")
    for name in ("P", "N", "procs x thr", "server", "upd/s", "MB/s", "p50 ms", "p99 ms", "srv peak RSS MiB", "srv CPU", "cli CPU"):
        runs.add_column(name, justify="right")
    for r in results:
        runs.add_row(
            _count(r.params), str(r.clients), r.layout, r.target, f"{r.updates_per_s:.1f}", f"{r.mb_per_s:.0f}",
            f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", f"{r.server_peak_rss_mib:.0f}", f"{r.server.cpu:.2f}", f"{r.client_cpu:.2f}",
        )
    console.print(runs)

    where = Table(title="Tributary vs raw gRPC, and where the tributary server's time goes (core-s per s of wall)")
    for name in ("P", "N", "trib/raw-thr", "aio/raw-thr", "aggregating", "recv+decode", "lock busy", "handlers", "poller", "grpc core", "agg-only MB/s"):
        where.add_column(name, justify="right")
    for row in rows:
        s = row["tributary_server"] or {}
        fmt = (lambda v, spec=".2f": "-" if v is None else format(v, spec))
        where.add_row(
            _count(row["params"]), str(row["clients"]), fmt(row["tributary_over_raw_threaded"], ".0%"),
            fmt(row["raw_aio_over_raw_threaded"], ".0%"), fmt(s.get("aggregating")), fmt(s.get("receiving")),
            fmt(s.get("lock_busy"), ".0%"), fmt(s.get("handlers")), fmt(s.get("poller")), fmt(s.get("core")),
            fmt(row["aggregation_only_mb_per_s"], ".0f"),
        )
    console.print(where)
    for r in results:
        for error in r.errors[:3]:
            console.print(f"[red]error[/red] {error}")
    target = next((row for row in rows if (row["params"], row["clients"]) == TARGET_CONFIG), None)
    if target and target["tributary_over_raw_threaded"] is not None:
        ratio = target["tributary_over_raw_threaded"]
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        console.print(f"target P=1M N=16: tributary moves {ratio:.0%} of raw threaded gRPC (>= {TARGET_RATIO:.0%}): {verdict}")


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    return {
        "cpu_model": model,
        "logical_cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def write_json(path: Path, args: argparse.Namespace, results: Sequence[RunResult], rows: Sequence[dict[str, Any]], agg_only: dict[int, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "throughput",
        "command": [Path(sys.executable).name, "-m", "bench.throughput", *sys.argv[1:]],
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": [dataclasses.asdict(r) for r in results],
        "comparisons": list(rows),
        "aggregation_only_mb_per_s": {str(p): v for p, v in agg_only.items()},
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


# --------------------------------------------------------------------------- #
# CLI                                                                          #
# --------------------------------------------------------------------------- #


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=_parse_count, nargs="+", default=[4, 16, 64], help="concurrent streams N (default: 4 16 64)")
    parser.add_argument("--params", type=_parse_count, nargs="+", default=[100_000, 1_000_000, 10_000_000], help="float32 parameters P (default: 100k 1M 10M)")
    parser.add_argument("--seconds", type=float, default=4.0, help="pushing time per server and configuration (default: 4)")
    parser.add_argument("--max-updates", type=_parse_count, default=10_000, help="pushes per client per run at most (default: 10000)")
    parser.add_argument("--client-procs", type=_parse_count, default=4, help="client processes at most; each runs N/procs threads, at least 2 (default: 4)")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS), help="servers to measure (default: all)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/throughput.json"), help="where to write results")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    return args


def _procs_for(clients: int, max_procs: int) -> int:
    # At least two threads per process where N allows, so every process
    # multiplexes several streams on its channel, as an app's threads would.
    return max(1, min(max_procs, clients // 2))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    context = mp.get_context("spawn")  # grpc does not survive fork
    agg_only = {params: aggregation_only(params) for params in args.params}
    pool = ClientPool(context, max(_procs_for(n, args.client_procs) for n in args.clients))
    results: list[RunResult] = []
    try:
        for params in args.params:
            for clients in args.clients:
                for target in args.targets:
                    config = RunConfig(target, params, clients, _procs_for(clients, args.client_procs), args.seconds, args.max_updates)
                    result = run_one(config, pool, context)
                    print(
                        f"  {_count(params):>5} x{clients:<3} {target:<9} {result.mb_per_s:8.0f} MB/s "
                        f"{result.updates_per_s:8.1f} upd/s  p99 {result.p99_ms:7.1f} ms",
                        flush=True,
                    )
                    results.append(result)
    finally:
        pool.close()
    rows = comparisons(results, agg_only)
    print_report(results, rows)
    write_json(args.json, args, results, rows, agg_only)
    print(f"wrote {args.json}")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
