"""What durability costs: push throughput with a state directory (every
accepted update written to SQLite and fsynced before its ack) against the same
server keeping its state in memory, measured side by side in one run; and how
long recovery takes (replaying the update log after the newest checkpoint).

For each parameter count P, two servers run in their own processes on
loopback, one with `--state-dir` and one without; N client threads (the SDK's
`Client.push`) push to one of them at a time, in alternating windows, so a slow
spell on a shared machine hits both. Rates are the median of the windows.
Then the durable server is killed (SIGKILL) after a run with checkpoints
turned off, and the time to start again on its directory is measured: that is
the replay of every logged update, reported per update and against the time a
live push of the same size takes.

    python -m bench.durability                            # 100k and 1M parameters, about 1 min
    python -m bench.durability --params 1M --clients 8 --seconds 6
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench._common import count_label, machine, parse_count
from client_sdk import Client, RetryPolicy

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "durability.json"
NO_RETRY = RetryPolicy(max_attempts=1)


def _serve(params: int, state_dir: str | None, checkpoint_every: int, ready: Connection) -> None:
    """Child process: one fedbuff job serving a float32 model of `params`."""
    logging.disable(logging.WARNING)  # the plaintext warning, once per server
    from server import JobConfig, ServerConfig, StrategyConfig
    from server.app import running_server
    from server.config import RetentionConfig

    config = ServerConfig(
        address="127.0.0.1:0",
        insecure=True,
        state_dir=Path(state_dir) if state_dir else None,
        retention=RetentionConfig(checkpoint_every=checkpoint_every),
        jobs=(JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=10)),),
    )
    started = time.perf_counter()
    with running_server(config, {"default": {"w": np.zeros(params, np.float32)}}, grace_s=1.0) as running:
        stopping = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopping.set())
        ready.send((running.address, time.perf_counter() - started, running.core.job("default").snapshot().version))
        stopping.wait()


def start(params: int, state_dir: str | None, checkpoint_every: int = 10) -> tuple[multiprocessing.Process, str, float, int]:
    receiving, sending = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.get_context("spawn").Process(target=_serve, args=(params, state_dir, checkpoint_every, sending), daemon=True)
    process.start()
    address, startup_s, version = receiving.recv()
    return process, address, startup_s, version


def stop(process: multiprocessing.Process, *, kill: bool = False) -> None:
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
    process.join(60)


def push_window(address: str, params: int, clients: int, seconds: float) -> tuple[int, list[float]]:
    """Every client pushes until the deadline; returns (updates, push latencies)."""
    delta = {"w": np.full(params, 1e-3, np.float32)}
    deadline = time.monotonic() + seconds
    counts = [0] * clients
    latencies: list[list[float]] = [[] for _ in range(clients)]

    def client(index: int) -> None:
        with Client(address, client_id=f"bench-{index}", retry=NO_RETRY, insecure=True) as sdk:
            version = sdk.pull().version
            while time.monotonic() < deadline:
                begun = time.perf_counter()
                sdk.push(version, delta)
                latencies[index].append(time.perf_counter() - begun)
                counts[index] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts), [x for per in latencies for x in per]


def measure(params: int, clients: int, seconds: float, rounds: int, replay_updates: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tributary-bench-") as scratch:
        servers = {"memory": start(params, None), "state-dir": start(params, f"{scratch}/durable")}
        rates: dict[str, list[float]] = {name: [] for name in servers}
        latencies: dict[str, list[float]] = {name: [] for name in servers}
        order = list(servers)
        for round_index in range(rounds):
            for name in order if round_index % 2 == 0 else reversed(order):
                updates, took = push_window(servers[name][1], params, clients, seconds / rounds)
                rates[name].append(updates / (seconds / rounds))
                latencies[name].extend(took)
        for process, *_ in servers.values():
            stop(process)

        # Recovery: a log of `replay_updates` entries after the last checkpoint.
        process, address, _, _ = start(params, f"{scratch}/replay", checkpoint_every=1 << 30)
        delta = {"w": np.full(params, 1e-3, np.float32)}
        with Client(address, client_id="replay", retry=NO_RETRY, insecure=True) as sdk:
            for _ in range(replay_updates):
                sdk.push(0, delta)  # no staleness bound: every push is taken
        stop(process, kill=True)
        process, _, recovery_s, recovered_version = start(params, f"{scratch}/replay", checkpoint_every=1 << 30)
        stop(process)
        process, _, empty_start_s, _ = start(params, None)  # the same start without a log to replay
        stop(process)

    memory, durable = statistics.median(rates["memory"]), statistics.median(rates["state-dir"])
    p50 = {name: statistics.median(values) for name, values in latencies.items()}
    return {
        "params": params,
        "clients": clients,
        "memory_updates_per_s": memory,
        "durable_updates_per_s": durable,
        "durable_vs_memory": durable / memory,
        "memory_push_p50_ms": 1000 * p50["memory"],
        "durable_push_p50_ms": 1000 * p50["state-dir"],
        "replayed_updates": replay_updates,
        "recovered_version": recovered_version,
        "recovery_s": recovery_s,
        "fresh_start_s": empty_start_s,
        "replay_ms_per_update": 1000 * max(0.0, recovery_s - empty_start_s) / replay_updates,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--params", type=parse_count, nargs="+", default=[100_000, 1_000_000], help="float32 parameters per model (100k, 1M)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent pushing clients")
    parser.add_argument("--seconds", type=float, default=6.0, help="pushing time per server and parameter count")
    parser.add_argument("--rounds", type=int, default=3, help="windows the pushing time is cut into (alternating servers)")
    parser.add_argument("--replay-updates", type=int, default=200, help="logged updates replayed in the recovery measurement")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.disable(logging.WARNING)  # the SDK's plaintext warning, once per client
    rows = [measure(p, args.clients, args.seconds, args.rounds, args.replay_updates) for p in args.params]
    print(f"{'params':>7} {'N':>3} {'memory upd/s':>13} {'durable upd/s':>14} {'ratio':>6} {'p50 mem ms':>11} {'p50 dur ms':>11} "
          f"{'replayed':>9} {'recovery s':>11} {'replay ms/upd':>14}")  # fmt: skip
    for r in rows:
        print(
            f"{count_label(r['params']):>7} {r['clients']:>3} {r['memory_updates_per_s']:>13.1f} {r['durable_updates_per_s']:>14.1f} "
            f"{r['durable_vs_memory']:>6.2f} {r['memory_push_p50_ms']:>11.1f} {r['durable_push_p50_ms']:>11.1f} "
            f"{r['replayed_updates']:>9} {r['recovery_s']:>11.2f} {r['replay_ms_per_update']:>14.2f}"
        )
    document = {"settings": vars(args) | {"json": str(args.json)}, "machine": machine(grpcio=grpc.__version__), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
