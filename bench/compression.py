"""Compression for thin links: bytes per update against accuracy, on the digits task.

For each setting a fresh server runs on loopback (fedbuff, K = --clients, each
update weighted by its sample count, divided by the weight sum: the weighted
mean that secure aggregation computes too), and --clients clients on
Dirichlet(--alpha) shards of the digits train --rounds rounds: every round, each
client pulls the current version, trains one local epoch and pushes, so every
setting makes exactly the same number of updates from the same data, seeds
and initial model. Plaintext clients run one after the other (the buffer fills
on one version, so staleness is 0 everywhere); secure-aggregation members run
together, one cohort per round.

Settings: float32 (the reference, measured in the same run), 8-bit and 4-bit
stochastic quantization, top-k 10% and 1% with error feedback, top-k 1% without
it (to show why it matters), and secure aggregation at full precision (32-bit
ring) and quantized to 8 bits (the ring shrinks to what the cohort's sum needs
and masked inputs travel as uint16).

Bytes per update are the payload bytes a client streams for one update (the
push's encoded payload; for secure aggregation the masked vector, one extra
element for the weight, at the ring's width). Secure aggregation's key
agreement and share exchange (a few hundred bytes per neighbour) are not
counted. Accuracy is the final model's on the held-out test split.

    python -m bench.compression                              # about 4 min on 2 cores
    python -m bench.compression --rounds 6 --json /tmp/c.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bench._common import machine
from client_sdk import Client, Compression, load_into, model_arrays
from client_sdk._secure import SecureRound
from edge.tasks import accuracy, build_model, dirichlet_shards, initial_weights, load_digits_split, make_train_fn
from proto.secagg.quantize import masked_dtype
from server import JobConfig, ServerConfig, StrategyConfig
from server.app import running_server
from server.config import SecAggConfig


@dataclass(frozen=True)
class Setting:
    name: str
    compression: Compression | None = None
    secure: bool = False
    secure_quantize_bits: int | None = None


SETTINGS = (
    Setting("float32"),
    Setting("8-bit", Compression(quantize_bits=8, seed=0)),
    Setting("4-bit", Compression(quantize_bits=4, seed=0)),
    Setting("top-k 10% + EF", Compression(top_k=0.1, seed=0)),
    Setting("top-k 1% + EF", Compression(top_k=0.01, seed=0)),
    Setting("top-k 1%, no EF", Compression(top_k=0.01, error_feedback=False, seed=0)),
    Setting("secure, 32-bit ring", secure=True),
    Setting("secure + 8-bit", secure=True, secure_quantize_bits=8),
)


@dataclass
class Result:
    setting: str
    bytes_per_update: float
    ratio_to_float32: float = 0.0
    accuracy: float = 0.0
    updates: int = 0
    versions: int = 0
    seconds: float = 0.0
    ring_bits: int | None = None
    notes: list[str] = field(default_factory=list)


def run_setting(setting: Setting, args: argparse.Namespace, data: Any, shards: list[np.ndarray]) -> Result:
    strategy = StrategyConfig(name="fedbuff", buffer_size=args.clients, weight_by_samples=True, normalizer="weight_sum")
    secagg = None
    if setting.secure:
        secagg = SecAggConfig(
            cohort_size=args.clients,
            clip_bound=args.weight_bound,
            quantize_bits=setting.secure_quantize_bits,
            value_bound=args.value_bound if setting.secure_quantize_bits else None,
            forming_timeout_s=30.0,
            upload_timeout_s=120.0,
        )
    job = JobConfig(strategy=strategy, staleness=_constant(), secure_aggregation=secagg)
    config = ServerConfig(address="127.0.0.1:0", insecure=True, jobs=(job,), max_workers=32)
    trainers = [
        make_train_fn(data.x_train[shard], data.y_train[shard], epochs=1, batch_size=32, lr=args.lr, seed=args.seed * 1000 + i)
        for i, shard in enumerate(shards)
    ]
    models = [build_model(args.seed) for _ in shards]
    sizes: list[int] = []
    ring: list[int] = []
    started = time.perf_counter()
    with running_server(config, {"default": initial_weights(args.seed)}, grace_s=0.5) as running:
        clients = [Client(running.address, insecure=True, client_id=f"c{i}", timeout_s=120) for i in range(args.clients)]
        names = [spec.name for spec in clients[0].job_info().specs]
        for _ in range(args.rounds):
            if setting.secure:
                _secure_round(clients, models, trainers, names, sizes, ring)
            else:
                for client, model, train in zip(clients, models, trainers):
                    pulled = client.pull()
                    delta, samples = _train(model, train, pulled.tensors, names)
                    result = client.push(pulled.version, delta, num_samples=samples, compression=setting.compression)
                    sizes.append(result.payload_bytes)
        final = clients[0].pull()
        for client in clients:
            client.close()
        job_state = running.core.job("default")
        updates, versions = job_state.stats.updates_accepted, final.version
    model = build_model(args.seed)
    load_into(model, final.tensors)
    return Result(
        setting=setting.name,
        bytes_per_update=float(np.mean(sizes)),
        accuracy=accuracy(model, data.x_test, data.y_test),
        updates=updates,
        versions=versions,
        seconds=time.perf_counter() - started,
        ring_bits=ring[0] if ring else None,
    )


def _constant() -> Any:
    from server.config import StalenessConfig

    return StalenessConfig(kind="constant")


def _train(model: torch.nn.Module, train: Any, pulled: dict[str, np.ndarray], names: list[str]) -> tuple[dict[str, np.ndarray], int]:
    load_into(model, pulled)
    model.train()
    result = train(model, torch.device("cpu"))
    samples = int(result[0] if isinstance(result, tuple) else result)  # (samples, metrics) from make_train_fn
    trained = model_arrays(model, names)
    return {name: trained[name] - pulled[name] for name in names}, samples


def _secure_round(
    clients: list[Client], models: list[torch.nn.Module], trainers: list[Any], names: list[str], sizes: list[int], ring: list[int]
) -> None:
    errors: list[BaseException] = []
    lock = threading.Lock()

    def member(index: int) -> None:
        try:
            client = clients[index]
            pulled = client.pull()
            cohort = SecureRound(client)
            cohort.start()
            delta, samples = _train(models[index], trainers[index], pulled.tensors, names)
            flat = np.concatenate([delta[name].reshape(-1) for name in names])
            cohort.submit(pulled.version, flat, samples)
            plan = cohort._member.plan  # type: ignore[union-attr]  # set by start(); what the upload was sized by
            with lock:
                sizes.append(plan.vector_length * masked_dtype(plan.bits).itemsize)
                ring.append(plan.bits)
        except BaseException as error:  # reported after the round
            errors.append(error)

    threads = [threading.Thread(target=member, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"a secure round failed: {errors[0]!r}") from errors[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10, help="rounds; each client pushes once per round")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew of the shards")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--value-bound", type=float, default=64.0, help="secure + 8-bit: clip each w * delta to +-this")
    parser.add_argument("--weight-bound", type=float, default=1024.0, help="secure: clip_bound (bounds the weight w = n_samples)")
    parser.add_argument("--only", default=None, help="comma-separated setting names to run (float32 always runs)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/compression.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # clients share the cores; one thread each
    grpc_logger_quiet()
    data = load_digits_split(args.seed)
    shards = dirichlet_shards(data.y_train, args.clients, args.alpha, args.seed)
    chosen = [s for s in SETTINGS if args.only is None or s.name == "float32" or s.name in args.only.split(",")]
    console = Console(width=120)
    results: list[Result] = []
    for setting in chosen:
        result = run_setting(setting, args, data, shards)
        results.append(result)
        console.print(f"{result.setting}: {result.bytes_per_update:,.0f} B/update, accuracy {result.accuracy:.3f}, {result.seconds:.1f}s")
    reference = results[0].bytes_per_update
    for result in results:
        result.ratio_to_float32 = result.bytes_per_update / reference
    table = Table(title=f"digits CNN, {args.clients} clients x {args.rounds} rounds, Dirichlet({args.alpha})")
    for column in ("setting", "bytes / update", "vs float32", "test accuracy", "updates", "versions", "ring bits"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for r in results:
        table.add_row(
            r.setting, f"{r.bytes_per_update:,.0f}", f"{r.ratio_to_float32:.3f}", f"{r.accuracy:.3f}", str(r.updates), str(r.versions),
            str(r.ring_bits or ""),
        )
    console.print(table)
    payload = {
        "benchmark": "compression",
        "settings": vars(args) | {"json": str(args.json)},
        "machine": machine(torch=torch.__version__, grpcio=grpc.__version__),
        "results": [asdict(r) for r in results],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {args.json}")


def grpc_logger_quiet() -> None:
    """The server warns once per run that it serves plaintext: on loopback, expected."""
    import logging

    logging.getLogger("tributary.server").setLevel(logging.ERROR)
    logging.getLogger("tributary.client").setLevel(logging.ERROR)


if __name__ == "__main__":
    main()
