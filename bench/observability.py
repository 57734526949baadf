"""What watching a server costs: its HTTP endpoint (/metrics, the dashboard's JSON API).

Two parts, each with its reference measured in the same run:

  ingest   the same fedbuff push load as bench/throughput.py (its SDK pushers,
           N clients in a few worker processes, P float32 parameters), in
           interleaved windows of three modes:
             off         a server without an HTTP endpoint: the reference
             watched     a server with the endpoint, a Prometheus-like scraper
                         (GET /metrics every 1 s) and 5 dashboard tabs (each
                         GET /api/jobs/JOB every 1 s)
             aggressive  the same server, 10 dashboard pollers at 10 Hz each
           Rates are medians of each mode's windows; the table gives them
           against `off`. Target: `watched` keeps >= 95 % of `off`'s rate.
  scale    one server whose job roster holds --roster clients (real Heartbeat
           RPCs with device reports) and whose staleness histogram and
           version history were filled by --scale-updates real pushes; then
           GET /metrics, /api/jobs and /api/jobs/JOB are timed (a new
           connection each, as a scraper or a browser's poll makes them),
           against GET /healthz on the same endpoint, in rotating order. The
           server process also times building each response in-process
           (building the snapshot, encoding the JSON) so the table shows where
           a request's time goes.

The watchers run in their own process on the same machine: on a small box
their CPU is taken from the pushers and the server alike, so read the
`watcher CPU` column next to the ratios.

    python -m bench.observability                        # about 2.5 min on 2 cores
    python -m bench.observability --seconds 12 --rounds 3 --roster 200
    python -m bench.observability --params 1M --clients 16 --client-procs 4
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import logging
import multiprocessing.context
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from bench._common import count_label, machine, parse_count
from bench.throughput import (
    JOB_ID,
    LOOPBACK,
    MB,
    SERVER_START_TIMEOUT_S,
    START_DELAY_S,
    TENSOR,
    ClientPool,
    Window,
    WorkerTask,
    _busy_cores,
    _make_delta,
    _receive,
    _split,
)
from client_sdk import Client, DeviceState, RetryPolicy
from server import JobConfig, ServerConfig, StrategyConfig
from server.app import running_server
from server.dashboard import job_snapshot, overview

for _logger in ("tributary.server", "tributary.client"):
    logging.getLogger(_logger).setLevel(logging.ERROR)

OFF = "off"
IDLE = "on-idle"
WATCHED = "watched"
AGGRESSIVE = "aggressive"
MODES = (OFF, IDLE, WATCHED, AGGRESSIVE)
DEFAULT_MODES = (OFF, WATCHED, AGGRESSIVE)
TARGET_MODE = WATCHED
TARGET_RATIO = 0.95

JOB_PATH = f"/api/jobs/{JOB_ID}"
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
JOBS_PATH = "/api/jobs"
SCALE_PATHS = (HEALTH_PATH, METRICS_PATH, JOBS_PATH, JOB_PATH)

WATCHERS: dict[str, tuple[tuple[str, float], ...]] = {
    OFF: (),
    IDLE: (),
    WATCHED: ((METRICS_PATH, 1.0),) + ((JOB_PATH, 1.0),) * 5,
    AGGRESSIVE: ((JOB_PATH, 0.1),) * 10,
}
"""Per mode: (path, period in seconds) of each watcher thread."""
WATCHER_DESCRIPTION = {
    OFF: "no HTTP endpoint",
    IDLE: "endpoint on, nobody watching",
    WATCHED: "/metrics 1/s + 5 dashboard tabs 1/s",
    AGGRESSIVE: "10 dashboard pollers at 10 Hz",
}
WATCH_MARGIN_S = 0.3
"""Watchers start this long before a pushing window and stop this long after its deadline."""
HTTP_TIMEOUT_S = 30.0
WARMUP_S = 1.0
"""One uncounted window per mode before the measured ones."""
HEARTBEAT_THREADS = 8
SCALE_PUSH_THREADS = 8
PROFILE_REPEATS = 30
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "observability.json"
MIB = 1 << 20


# --------------------------------------------------------------------------- #
# Server process                                                               #
# --------------------------------------------------------------------------- #


def _median_ms(fn: Callable[[], object], repeats: int = PROFILE_REPEATS) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def _profile(running: Any) -> dict[str, float]:
    """In-process cost (median ms) of building each response, split into the
    view (snapshot or exposition) and its JSON encoding, and the job lock's
    share: the time `read_stats` holds it for a snapshot's copy."""
    core = running.core
    job = core.job(JOB_ID)
    snapshot = job_snapshot(job)
    jobs = overview(core)
    stats_copy_ms = _median_ms(lambda: job.read_stats(lambda s: (list(s.versions), list(s.recent_accepts), dict(s.staleness))))
    return {
        "metrics_exposition_ms": _median_ms(running.metrics.exposition),
        "job_snapshot_build_ms": _median_ms(lambda: job_snapshot(job)),
        "job_snapshot_encode_ms": _median_ms(lambda: json.dumps(snapshot, allow_nan=False)),
        "jobs_overview_build_ms": _median_ms(lambda: overview(core)),
        "jobs_overview_encode_ms": _median_ms(lambda: json.dumps(jobs, allow_nan=False)),
        "job_stats_copy_under_lock_ms": stats_copy_ms,
    }


class _HttpProbe:
    """Thread CPU and wall time spent serving HTTP requests (each connection in
    its own thread, short-lived or idle between kept-alive requests, so psutil's
    per-thread times would lose them). Counted per request, so a kept-alive
    connection's CPU lands in the window that used it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self.requests = 0

    def install(self) -> None:
        from server import http as endpoint

        handle = endpoint._Handler.handle_one_request
        probe = self

        def timed_handle(handler: Any) -> None:
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                handle(handler)
            finally:
                with probe._lock:
                    probe.cpu_s += time.thread_time() - cpu
                    probe.wall_s += time.perf_counter() - wall
                    probe.requests += 1

        endpoint._Handler.handle_one_request = timed_handle  # type: ignore[method-assign,assignment]

    def read(self) -> tuple[float, float, int]:
        with self._lock:
            return self.cpu_s, self.wall_s, self.requests


def _server_main(conn: Connection, params: int, max_workers: int, http: bool) -> None:
    probe = _HttpProbe()
    probe.install()
    job = JobConfig(job_id=JOB_ID, strategy=StrategyConfig(name="fedbuff"), max_staleness=None)
    config = ServerConfig(
        address=f"{LOOPBACK}:0",
        max_workers=max_workers,
        max_concurrent_streams=max_workers - 1,
        jobs=(job,),
        insecure=True,
        http_address=f"{LOOPBACK}:0" if http else None,
    )
    initial = {JOB_ID: {TENSOR: np.zeros(params, dtype=np.float32)}}
    with running_server(config, initial, grace_s=1.0) as running:
        conn.send((running.address, running.http_address))
        while (command := conn.recv()) != "stop":
            if command == "profile":
                conn.send(_profile(running))
            elif command == "http":
                conn.send(probe.read())


class ServerProcess:
    def __init__(self, context: multiprocessing.context.SpawnContext, name: str, params: int, max_workers: int, http: bool) -> None:
        self.name = name
        self.address = ""
        self.http_address: str | None = None
        self._pipe, theirs = context.Pipe()
        self._process = context.Process(target=_server_main, args=(theirs, params, max_workers, http), name=f"bench-{name}", daemon=True)
        self._process.start()

    def wait_ready(self) -> None:
        self.address, self.http_address = _receive(self._pipe, SERVER_START_TIMEOUT_S)

    def cpu_s(self) -> float:
        assert self._process.pid is not None
        times = psutil.Process(self._process.pid).cpu_times()
        return float(times.user + times.system)

    def http_cpu_s(self) -> float:
        """Thread CPU its HTTP endpoint spent serving connections so far."""
        self._pipe.send("http")
        return float(_receive(self._pipe, 30.0)[0])

    def profile(self) -> dict[str, float]:
        self._pipe.send("profile")
        return _receive(self._pipe, 120.0)  # type: ignore[no-any-return]

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._pipe.send("stop")
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


# --------------------------------------------------------------------------- #
# Watchers: HTTP pollers in their own process                                  #
# --------------------------------------------------------------------------- #


def http_get(connection: http.client.HTTPConnection, path: str) -> tuple[float, int]:
    """(seconds, body bytes) of one GET on `connection`, kept alive between
    polls as a browser tab or Prometheus keeps it (it reconnects by itself
    when the server closed it, e.g. after its keep-alive idle limit)."""
    started = time.perf_counter()
    try:
        connection.request("GET", path)
        response = connection.getresponse()
    except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
        connection.close()  # closed by the server while idle: once more on a new connection
        connection.request("GET", path)
        response = connection.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"GET {path}: HTTP {response.status} {body[:200]!r}")
    return time.perf_counter() - started, len(body)


@dataclass(frozen=True)
class WatchOrder:
    address: str
    watchers: tuple[tuple[str, float], ...]
    begin: float
    end: float


@dataclass
class WatchReport:
    latencies_s: dict[str, list[float]] = field(default_factory=dict)
    body_bytes: dict[str, int] = field(default_factory=dict)
    late: int = 0
    """Polls that started more than one period behind their schedule (the poller could not keep up)."""
    cpu_s: float = 0.0
    errors: list[str] = field(default_factory=list)


def _poll(order: WatchOrder, index: int, path: str, period_s: float, report: WatchReport, lock: threading.Lock) -> None:
    # Fixed-rate schedule, each poller at its own phase, as independent tabs would be.
    due = order.begin + period_s * (index + 0.5) / max(len(order.watchers), 1)
    latencies: list[float] = []
    late, size = 0, 0
    host, _, port = order.address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT_S)
    try:
        while due < order.end:
            time.sleep(max(0.0, due - time.monotonic()))
            if time.monotonic() - due > period_s:
                late += 1
            seconds, size = http_get(connection, path)
            latencies.append(seconds)
            due += period_s
    except Exception as error:  # noqa: BLE001 - reported to the parent, which prints it
        report.errors.append(f"{path}: {error!r}"[:300])
    finally:
        connection.close()
    with lock:
        report.latencies_s.setdefault(path, []).extend(latencies)
        report.body_bytes[path] = max(report.body_bytes.get(path, 0), size)
        report.late += late


def _watcher_main(conn: Connection) -> None:
    conn.send("ready")
    while (order := conn.recv()) is not None:
        report, lock = WatchReport(), threading.Lock()
        cpu = time.process_time()
        threads = [
            threading.Thread(target=_poll, args=(order, i, path, period, report, lock), daemon=True)
            for i, (path, period) in enumerate(order.watchers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        report.cpu_s = time.process_time() - cpu
        conn.send(report)


# --------------------------------------------------------------------------- #
# Part 1: ingest under watching                                                #
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ModeWindow:
    updates: int
    elapsed_s: float
    wall_s: float
    """From the window's announcement to the last report: what the CPU figures are divided by."""
    server_cpu_s: float
    http_cpu_s: float
    """Thread CPU the server's HTTP handler threads used (part of server_cpu_s)."""
    watcher_cpu_s: float
    box_cpu: float
    watch: WatchReport

    @property
    def rate(self) -> float:
        return self.updates / self.elapsed_s


@dataclass
class ModeResult:
    mode: str
    watchers: str
    updates_per_s: float
    mb_per_s: float
    updates_per_s_windows: list[float]
    ratio: float
    """Median rate against off's median rate."""
    paired_ratio: float
    """Median over rounds of this mode's rate against off's in the same round (adjacent windows)."""
    server_cpu: float
    """Cores the server process kept busy."""
    server_cpu_ms_per_update: float
    http_cpu: float
    """Cores the server's HTTP handling kept busy (part of server_cpu)."""
    watcher_cpu: float
    box_cpu: float
    requests_per_s: float
    request_p50_ms: float
    request_p99_ms: float
    late_polls: int
    errors: list[str]


def _measure_mode(
    mode: str, server: ServerProcess, pushers: ClientPool, watcher: Connection, watcher_pid: int, window_s: float, max_updates: int
) -> ModeWindow:
    begin = time.monotonic() + START_DELAY_S + WATCH_MARGIN_S
    window = Window(server.name, begin, window_s, max_updates)
    watching = bool(WATCHERS[mode])
    watcher_process = psutil.Process(watcher_pid)
    watcher_cpu = sum(watcher_process.cpu_times()[:2])
    server_cpu, http_cpu, machine = server.cpu_s(), server.http_cpu_s(), psutil.cpu_times()
    started = time.monotonic()
    if watching:
        assert server.http_address is not None
        watcher.send(WatchOrder(server.http_address, WATCHERS[mode], begin - WATCH_MARGIN_S, begin + window_s + WATCH_MARGIN_S))
    reports = pushers.run_window(window)
    watch = _receive(watcher, window_s + 2 * HTTP_TIMEOUT_S) if watching else WatchReport()
    wall = time.monotonic() - started
    server_cpu, machine_busy = server.cpu_s() - server_cpu, _busy_cores(machine, psutil.cpu_times(), wall)
    http_cpu = server.http_cpu_s() - http_cpu
    watch.errors.extend(e for r in reports for e in r.errors)
    end = max([e for r in reports for e in r.ends] + [begin + 1e-9])
    return ModeWindow(
        updates=sum(len(r.latencies_s) for r in reports),
        elapsed_s=end - begin,
        wall_s=wall,
        server_cpu_s=server_cpu,
        http_cpu_s=http_cpu,
        watcher_cpu_s=sum(watcher_process.cpu_times()[:2]) - watcher_cpu,
        box_cpu=machine_busy,
        watch=watch,
    )


def run_ingest(args: argparse.Namespace, context: multiprocessing.context.SpawnContext) -> tuple[list[ModeResult], dict[str, float]]:
    """Each mode's result, and the in-process cost of each response on the
    watched server at the end (its history as full as the run made it)."""
    max_workers = max(ServerConfig.max_workers, args.clients + 4)
    procs = max(1, min(args.client_procs, args.clients))
    windows: dict[str, list[ModeWindow]] = {mode: [] for mode in args.modes}
    with contextlib.ExitStack() as stack:
        # One server per mode, so each holds only the history its own windows
        # pushed (a server pushed to twice as long has twice the remembered
        # idempotency keys and a fuller history, which slows it on its own).
        servers = {mode: ServerProcess(context, mode, args.params, max_workers, http=mode != OFF) for mode in args.modes}
        for server in servers.values():
            stack.callback(server.stop)
        for server in servers.values():
            server.wait_ready()
        addresses = {s.name: s.address for s in servers.values()}
        tasks = [WorkerTask(addresses, args.params, n, i) for i, n in enumerate(_split(args.clients, procs))]
        pushers = ClientPool(context, len(tasks))  # throughput.py's SDK pushers, one thread each per client
        stack.callback(pushers.close)
        stack.enter_context(pushers.connected(tasks))
        watcher, theirs = context.Pipe()
        watcher_process = context.Process(target=_watcher_main, args=(theirs,), name="bench-watcher", daemon=True)
        watcher_process.start()
        stack.callback(watcher_process.join, 10)
        stack.callback(watcher.send, None)
        assert watcher_process.pid is not None
        _receive(watcher, SERVER_START_TIMEOUT_S)
        window_s = args.seconds / args.rounds
        modes = list(args.modes)
        for mode in modes:  # warm-up, not counted: first connections, first snapshots, allocator growth
            _measure_mode(mode, servers[mode], pushers, watcher, watcher_process.pid, WARMUP_S, args.max_updates)
        for round_ in range(args.rounds):
            shift = round_ % len(modes)  # rotate: no mode always first or last
            for mode in modes[shift:] + modes[:shift]:
                result = _measure_mode(mode, servers[mode], pushers, watcher, watcher_process.pid, window_s, args.max_updates)
                windows[mode].append(result)
                print(
                    f"  round {round_ + 1:>2}/{args.rounds} {mode:<10} {result.rate:7.1f} upd/s  "
                    f"srv {result.server_cpu_s / result.wall_s:.2f}  http {result.http_cpu_s / result.wall_s:.3f}  watcher {result.watcher_cpu_s / result.wall_s:.2f} cores",
                    flush=True,
                )
        profile = servers[WATCHED].profile() if WATCHED in servers else {}
    return _summarize_modes(args, windows), profile


def _summarize_modes(args: argparse.Namespace, windows: dict[str, list[ModeWindow]]) -> list[ModeResult]:
    reference = windows[OFF]
    off_rate = statistics.median(w.rate for w in reference)
    results = []
    for mode, runs in windows.items():
        rates = [w.rate for w in runs]
        rate = statistics.median(rates)
        latencies = np.array([x for w in runs for xs in w.watch.latencies_s.values() for x in xs])
        wall = sum(w.wall_s for w in runs)

        def pct(q: float) -> float:
            return float(np.percentile(latencies, q)) * 1e3 if latencies.size else float("nan")

        results.append(
            ModeResult(
                mode=mode,
                watchers=WATCHER_DESCRIPTION[mode],
                updates_per_s=rate,
                mb_per_s=rate * args.params * 4 / MB,
                updates_per_s_windows=rates,
                ratio=rate / off_rate,
                paired_ratio=statistics.median(w.rate / off.rate for w, off in zip(runs, reference)),
                server_cpu=sum(w.server_cpu_s for w in runs) / wall,
                server_cpu_ms_per_update=sum(w.server_cpu_s for w in runs) / max(sum(w.updates for w in runs), 1) * 1e3,
                http_cpu=sum(w.http_cpu_s for w in runs) / wall,
                watcher_cpu=sum(w.watcher_cpu_s for w in runs) / wall,
                box_cpu=statistics.fmean(w.box_cpu for w in runs),
                requests_per_s=latencies.size / sum(w.elapsed_s for w in runs),
                request_p50_ms=pct(50),
                request_p99_ms=pct(99),
                late_polls=sum(w.watch.late for w in runs),
                errors=[e for w in runs for e in w.watch.errors],
            )
        )
    return results


# --------------------------------------------------------------------------- #
# Part 2: scrape and snapshot cost at scale                                    #
# --------------------------------------------------------------------------- #


@dataclass
class ScaleResult:
    path: str
    requests: int
    p50_ms: float
    p99_ms: float
    body_bytes: int
    ratio_to_healthz: float


@dataclass
class ScaleRun:
    roster: int
    updates: int
    versions: int
    staleness_values: int
    fill_s: float
    paths: list[ScaleResult]
    in_process_ms: dict[str, float]


def _heartbeat_roster(address: str, clients: int) -> None:
    """`clients` distinct clients, each one real Heartbeat RPC with a device report."""
    channel = grpc.insecure_channel(address)
    profiles = ("phone-low", "phone-mid", "phone-high", "tablet", "laptop")
    states = ("idle", "training", "uploading")
    try:

        def beat(index: int) -> None:
            rng = random.Random(index)
            client = Client(address, job=JOB_ID, client_id=f"device-{index:05d}", channel=channel)
            device = DeviceState(
                battery_level=round(rng.random(), 2), charging=rng.random() < 0.5, idle=rng.random() < 0.7,
                unmetered=rng.random() < 0.8, profile=profiles[index % len(profiles)],
            )
            client.heartbeat(states[index % len(states)], base_version=0, device=device)

        with futures.ThreadPoolExecutor(HEARTBEAT_THREADS) as pool:
            list(pool.map(beat, range(clients)))
    finally:
        channel.close()


def _push_history(address: str, params: int, updates: int) -> None:
    """`updates` small pushes from a few clients that pull again only every
    few pushes, so they arrive at a spread of staleness values."""
    delta = {TENSOR: _make_delta(params)}

    def pusher(thread: int) -> None:
        rng = random.Random(thread)
        share = updates // SCALE_PUSH_THREADS + (1 if thread < updates % SCALE_PUSH_THREADS else 0)
        with Client(address, job=JOB_ID, client_id=f"pusher-{thread}", insecure=True, retry=RetryPolicy(max_attempts=1)) as client:
            base, left = client.pull().version, 0
            for _ in range(share):
                if left == 0:
                    base, left = client.pull().version, rng.randint(1, 40)
                client.push(base, delta)
                left -= 1

    with futures.ThreadPoolExecutor(SCALE_PUSH_THREADS) as pool:
        list(pool.map(pusher, range(SCALE_PUSH_THREADS)))


def run_scale(args: argparse.Namespace, context: multiprocessing.context.SpawnContext) -> ScaleRun:
    server = ServerProcess(context, "scale", args.scale_params, ServerConfig.max_workers, http=True)
    try:
        server.wait_ready()
        assert server.http_address is not None
        started = time.monotonic()
        _heartbeat_roster(server.address, args.roster)
        _push_history(server.address, args.scale_params, args.scale_updates)
        fill_s = time.monotonic() - started
        jobs = json.loads(_get_body(server.http_address, JOB_PATH))
        for path in SCALE_PATHS:  # warm up: first imports, first connections
            _fresh_get(server.http_address, path)
        latencies: dict[str, list[float]] = {path: [] for path in SCALE_PATHS}
        sizes: dict[str, int] = {}
        for round_ in range(args.requests):
            shift = round_ % len(SCALE_PATHS)
            for path in SCALE_PATHS[shift:] + SCALE_PATHS[:shift]:
                seconds, sizes[path] = _fresh_get(server.http_address, path)
                latencies[path].append(seconds)
        in_process = server.profile()
    finally:
        server.stop()
    health = statistics.median(latencies[HEALTH_PATH])
    paths = [
        ScaleResult(
            path=path,
            requests=len(xs),
            p50_ms=statistics.median(xs) * 1e3,
            p99_ms=float(np.percentile(xs, 99)) * 1e3,
            body_bytes=sizes[path],
            ratio_to_healthz=statistics.median(xs) / health,
        )
        for path, xs in latencies.items()
    ]
    return ScaleRun(
        roster=jobs["roster"]["total"],
        updates=jobs["counters"]["updates_accepted"],
        versions=jobs["version"],
        staleness_values=len(jobs["staleness"]),
        fill_s=fill_s,
        paths=paths,
        in_process_ms=in_process,
    )


def _fresh_get(address: str, path: str) -> tuple[float, int]:
    """http_get on a new connection (closed after): a request's whole cost, connection included."""
    host, _, port = address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT_S)
    try:
        return http_get(connection, path)
    finally:
        connection.close()


def _get_body(address: str, path: str) -> bytes:
    host, _, port = address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT_S)
    try:
        connection.request("GET", path)
        return connection.getresponse().read()
    finally:
        connection.close()


# --------------------------------------------------------------------------- #
# Reporting and CLI                                                            #
# --------------------------------------------------------------------------- #


def _profile_line(profile: dict[str, float]) -> str:
    return ", ".join(f"{name.removesuffix('_ms').replace('_', ' ')} {value:.2f}" for name, value in profile.items())


def print_report(args: argparse.Namespace, modes: Sequence[ModeResult], ingest_profile: dict[str, float], scale: ScaleRun | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=170)
    if modes:
        table = Table(
            title=f"Ingest while watched: {args.clients} clients pushing {count_label(args.params)} float32 parameters "
            f"(medians of {args.rounds} windows of {args.seconds / args.rounds:g} s per mode; target: {TARGET_MODE} >= {TARGET_RATIO:.0%} of off)"
        )
        for name in (
            "mode", "watchers", "upd/s", "MB/s", "vs off", "paired", "upd/s per window", "HTTP req/s", "req p50 ms", "req p99 ms",
            "srv CPU", "srv CPU ms/upd", "srv HTTP CPU", "watcher CPU", "box CPU",
        ):
            table.add_column(name, justify="right")
        for m in modes:
            verdict = ""
            if m.mode == TARGET_MODE:
                verdict = " met" if m.ratio >= TARGET_RATIO else " NOT met"
            table.add_row(
                m.mode, m.watchers, f"{m.updates_per_s:.1f}", f"{m.mb_per_s:.0f}", f"{m.ratio:.1%}{verdict}", f"{m.paired_ratio:.1%}",
                " ".join(f"{x:.0f}" for x in m.updates_per_s_windows), f"{m.requests_per_s:.1f}",
                f"{m.request_p50_ms:.1f}", f"{m.request_p99_ms:.1f}", f"{m.server_cpu:.2f}", f"{m.server_cpu_ms_per_update:.2f}",
                f"{m.http_cpu:.3f}", f"{m.watcher_cpu:.2f}", f"{m.box_cpu:.2f}",
            )
        console.print(table)
        console.print(f"watched server after the run, in-process median ms: {_profile_line(ingest_profile)}")
        for m in modes:
            for error in m.errors[:3]:
                console.print(f"[red]error[/red] {m.mode}: {error}")
    if scale is not None:
        table = Table(
            title=f"Scrape and snapshot at scale: roster {scale.roster} clients, {scale.updates} updates accepted, "
            f"{scale.versions} versions, {scale.staleness_values} staleness values ({args.requests} requests per path, new connection each)"
        )
        for name in ("path", "p50 ms", "p99 ms", "vs /healthz (p50)", "body bytes"):
            table.add_column(name, justify="right")
        for p in scale.paths:
            table.add_row(p.path, f"{p.p50_ms:.2f}", f"{p.p99_ms:.2f}", f"{p.ratio_to_healthz:.1f}x", f"{p.body_bytes:,}")
        console.print(table)
        console.print(f"in the server process, median ms: {_profile_line(scale.in_process_ms)}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.observability", description="What watching a Tributary server over HTTP costs.")
    parser.add_argument("--params", type=parse_count, default=100_000, help="float32 parameters pushed in the ingest part (default: 100k)")
    parser.add_argument("--clients", type=parse_count, default=8, help="concurrent pushing clients (default: 8)")
    parser.add_argument("--client-procs", type=parse_count, default=2, help="pusher processes (default: 2)")
    parser.add_argument("--seconds", type=float, default=36.0, help="pushing time per mode, split into --rounds windows (default: 36)")
    parser.add_argument("--rounds", type=parse_count, default=12, help="interleaved windows per mode (default: 12)")
    parser.add_argument("--max-updates", type=parse_count, default=100_000, help="pushes per client and window at most (default: 100k)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES), help="ingest modes (default: off watched aggressive; off is the reference)")
    parser.add_argument("--roster", type=parse_count, default=1000, help="clients heartbeating in the scale part (default: 1000)")
    parser.add_argument("--scale-updates", type=parse_count, default=3000, help="pushes filling the scale part's history (default: 3000)")
    parser.add_argument("--scale-params", type=parse_count, default=1000, help="float32 parameters of the scale part's model (default: 1000)")
    parser.add_argument("--requests", type=parse_count, default=200, help="timed requests per path in the scale part (default: 200)")
    parser.add_argument("--skip", choices=("ingest", "scale"), action="append", default=[], help="leave a part out")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results (default: bench/results/observability.json)")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    if "ingest" not in args.skip and OFF not in args.modes:
        parser.error("--modes must include off: it is the reference")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    context = multiprocessing.get_context("spawn")  # grpc does not survive fork
    started = time.monotonic()
    modes: list[ModeResult] = []
    ingest_profile: dict[str, float] = {}
    scale: ScaleRun | None = None
    if "ingest" not in args.skip:
        print("ingest under watching:", flush=True)
        modes, ingest_profile = run_ingest(args, context)
    if "scale" not in args.skip:
        print(f"scale: {args.roster} heartbeating clients, {args.scale_updates} pushes, then {args.requests} GETs per path", flush=True)
        scale = run_scale(args, context)
    print_report(args, modes, ingest_profile, scale)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "observability",
        "command": ["python", "-m", "bench.observability", *(argv if argv is not None else sys.argv[1:])],
        "machine": machine(grpcio=grpc.__version__),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target": {"mode": TARGET_MODE, "ratio": TARGET_RATIO},
        "ingest": [dataclasses.asdict(m) for m in modes],
        "ingest_watched_server_in_process_ms": ingest_profile,
        "scale": dataclasses.asdict(scale) if scale is not None else None,
        "elapsed_s": time.monotonic() - started,
    }
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.json} after {time.monotonic() - started:.0f} s")
    return 1 if any(m.errors for m in modes) else 0


if __name__ == "__main__":
    sys.exit(main())
