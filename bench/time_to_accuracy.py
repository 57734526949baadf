"""Time to accuracy: asynchronous (fedbuff, fedasync) against synchronous fedavg
under slow devices, with and without secure aggregation.

Every variant runs the same task (digits, Dirichlet(0.5) label skew over 50
devices, logistic regression), the same partition and the same fleet
(heavy-tailed speeds: the slowest 10% over 10x slower than the median; the
measured ratio is printed), for several seeds (fedavg runs three times as long
as the others so that its final accuracy is its plateau too),
through `tributary simulate`'s runner (a real server on loopback, devices in
worker processes). The synchronous baseline is FedAvg as the papers run it:
each round grants exactly `clients_per_round` training slots (the server's
`max_concurrent_trainers`), so it samples 10 devices and waits for all 10.

It reports, per variant, the median and spread (min-max) over seeds of the
emulated wall time to reach the target test accuracy and of the final
accuracy (the mean of the last 10% of the run's evaluations: one evaluation
is noisy), fedavg's time over each asynchronous variant's (median and per
seed), the final-accuracy gap in points at the runs' ends, and the
asynchronous variant's accuracy at fedavg's last version (fedbuff and fedavg
both publish one version per 10 updates: equal numbers of updates). It writes
JSON and a PNG of accuracy against emulated wall time to --out.

    python -m bench.time_to_accuracy                      # about 20 minutes on 2 cores
    python -m bench.time_to_accuracy --seeds 0 --variants fedbuff fedavg
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from bench._common import machine

BASE: dict[str, Any] = {
    "devices": 50,
    "data": {"name": "digits", "dirichlet_alpha": 0.5},
    "model": {"kind": "logistic"},
    "training": {"epochs": 2, "batch_size": 8, "lr": 0.1},
    "fleet": {"builtin": "heavy_tailed", "median_seconds_per_sample": 0.05, "sigma": 1.9},
    # time_scale 0.02: 3000 emulated s in 60 real s. The emulation adds the real CPU time
    # of everything (training, gRPC, cohort cryptography) on 2 shared cores to each device's
    # emulated delays, scaled up by 1/time_scale; at 0.01 that overstated secure aggregation's
    # cost by about 1.6x (a cohort variant took 384 emulated s to 90% at 0.01, 237 s at 0.02)
    "run": {"duration_s": 3000, "time_scale": 0.02, "target_accuracy": 0.9},
}
LONGER_RUNS: dict[str, dict[str, Any]] = {
    # synchronous rounds are slower: fedavg runs three times as long so that its final
    # accuracy is its plateau too, and the final accuracies compare like with like
    "fedavg": {"duration_s": 9000},
}
FEDBUFF: dict[str, Any] = {
    # concurrency: every device (no cap), well above K as in the FedBuff paper; server_lr 2
    # makes up for the staleness weights (mean s(tau) = (1 + 4)^-0.5 = 0.45 at this fleet's tau ~ 4)
    "strategy": "fedbuff", "buffer_size": 10, "staleness": "polynomial", "staleness_a": 0.5, "server_lr": 2.0,
}  # fmt: skip
SLOTS: dict[str, Any] = {
    # a lease of 6 real s is 300 emulated s at time_scale 0.02: about twice the slowest device's
    # round, and the synchronous round's deadline for a device that drops out holding a slot;
    # devices working on a slot heartbeat every lease / 3 (2 real s), so a slow one never loses it
    "slot_lease_s": 6.0, "heartbeat_interval_s": 1.5,
}  # fmt: skip
VARIANTS: dict[str, dict[str, Any]] = {
    "fedbuff": FEDBUFF,
    "fedasync": {"strategy": "fedasync", "alpha": 0.3, "staleness": "polynomial", "staleness_a": 0.5},
    # synchronous FedAvg: 10 slots per round, the round waits for the 10 devices it granted
    "fedavg": {"strategy": "fedavg", "clients_per_round": 10, "max_concurrent_trainers": 10, **SLOTS},
    # cohorts of 10 are one buffered aggregate each, divided by the weight sum (the staleness
    # weights cancel in it, hence server_lr 1 rather than plaintext fedbuff's 2: at 1.5 the
    # accuracy swung by tens of points from version to version, and seed 0 took 483 s to 90%
    # against 204 s at 1); a cohort waits
    # for its slowest member up to the upload deadline, 1.6 real s = 80 emulated s (about 25x the
    # median device's round), then completes with the 7 or more that uploaded
    "fedbuff+secagg": {
        **FEDBUFF, "server_lr": 1.0, "secure_aggregation": True, "cohort_size": 10, "min_survivors": 7,
        "forming_timeout_s": 1.0, "upload_timeout_s": 1.6, "clip_bound": 4096.0,
    },
    # NOT the synchronous baseline (an extra, off by default): every device trains on every round,
    # the round closes on the first 10 updates on its version, so stragglers never hold it up
    "fedavg-first-10": {"strategy": "fedavg", "clients_per_round": 10},
}  # fmt: skip
DEFAULT_VARIANTS = ["fedbuff", "fedasync", "fedavg", "fedbuff+secagg"]
ASYNC_VARIANTS = ("fedbuff", "fedasync", "fedbuff+secagg")


def fleet_tail_ratio(seed: int) -> float:
    """The fleet's heavy tail: the fastest of its slowest 10% over the median (seconds per sample)."""
    from edge.simulate import Experiment
    from edge.simulate.worker import experiment_fleet

    speeds = sorted(p.seconds_per_sample for p in experiment_fleet(Experiment.from_mapping({**BASE, "seed": seed})).profiles)
    return speeds[len(speeds) - math.ceil(0.1 * len(speeds))] / statistics.median(speeds)


def final_accuracy(history: list[dict[str, float]], duration_s: float) -> float:
    tail = [p["accuracy"] for p in history if p["emulated_s"] >= 0.9 * duration_s]
    return statistics.fmean(tail) if tail else history[-1]["accuracy"]


def spread(values: list[float | None]) -> dict[str, Any]:
    known = [v for v in values if v is not None]
    if len(known) < len(values) or not known:
        return {"median": None, "min": min(known, default=None), "max": max(known, default=None), "missed": len(values) - len(known)}
    return {"median": statistics.median(known), "min": min(known), "max": max(known), "missed": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/time_to_accuracy"))
    args = parser.parse_args()

    from edge.simulate import Experiment, LocalBackend
    from tributary._simulate_cmd import run_experiment

    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    started = time.monotonic()
    for seed in args.seeds:
        for variant in args.variants:
            run = {**BASE["run"], **LONGER_RUNS.get(variant, {})}
            experiment = Experiment.from_mapping({**BASE, "run": run, "name": variant, "seed": seed, "server": VARIANTS[variant]})
            result = run_experiment(experiment, LocalBackend())
            history = [p.__dict__ for p in result.history]
            summary = result.summary()
            summary["final_accuracy_tail"] = final_accuracy(history, experiment.run.duration_s)
            runs[variant].append({"summary": summary, "history": history})
            reached = summary["emulated_s_to_target"]
            print(
                f"seed {seed} {variant:15s} to {BASE['run']['target_accuracy']:.0%}: "
                f"{'not reached' if reached is None else f'{reached:7.0f} s'}  final {summary['final_accuracy_tail']:.2%}  "
                f"versions {summary['final_version']}  updates {summary['updates_accepted']}  ({time.monotonic() - started:.0f}s)",
                flush=True,
            )
    tail = {seed: fleet_tail_ratio(seed) for seed in args.seeds}
    table = {
        variant: {
            "time_to_target_s": spread([r["summary"]["emulated_s_to_target"] for r in results]),
            "final_accuracy": spread([r["summary"]["final_accuracy_tail"] for r in results]),
            "versions": statistics.median(r["summary"]["final_version"] for r in results),
            "updates": statistics.median(r["summary"]["updates_accepted"] for r in results),
        }
        for variant, results in runs.items()
    }
    ratios = _ratios(runs, table, args.seeds)
    _print_table(table, ratios, tail)
    result = {
        "setup": {**BASE, "longer_runs": LONGER_RUNS, "variants": {v: VARIANTS[v] for v in args.variants}, "seeds": args.seeds},
        "fleet_slowest_10pct_over_median": tail,
        "machine": machine(),
        "table": table,
        "ratios": ratios,
        "runs": runs,
        "bench_seconds": round(time.monotonic() - started, 1),
    }
    (args.out / "time_to_accuracy.json").write_text(json.dumps(result, indent=1, default=str))
    _plot(runs, args.out / "time_to_accuracy.png")
    print(f"written: {args.out}/time_to_accuracy.json, time_to_accuracy.png")


def _accuracy_at_version(history: list[dict[str, float]], version: int) -> float:
    """Test accuracy of the newest evaluated version <= `version`."""
    return max((p for p in history if p["version"] <= version), key=lambda p: p["version"])["accuracy"]


def _ratios(runs: dict[str, list[dict[str, Any]]], table: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """fedavg's time to target over each asynchronous variant's (medians, and
    seed by seed), the final-accuracy gap in points (asynchronous minus fedavg)
    at equal emulated time, and at equal numbers of updates (the asynchronous
    variant's accuracy at fedavg's last version; fedbuff only: one version per
    10 updates in both)."""
    ratios: dict[str, Any] = {}
    for sync in ("fedavg", "fedavg-first-10"):
        if sync not in table:
            continue
        for variant in ASYNC_VARIANTS:
            if variant not in table:
                continue
            slow, fast = table[sync]["time_to_target_s"]["median"], table[variant]["time_to_target_s"]["median"]
            gap = table[variant]["final_accuracy"]["median"] - table[sync]["final_accuracy"]["median"]
            per_seed = {}
            equal_updates = {}
            for seed, sync_run, async_run in zip(seeds, runs[sync], runs[variant], strict=True):
                a, b = sync_run["summary"]["emulated_s_to_target"], async_run["summary"]["emulated_s_to_target"]
                per_seed[seed] = None if a is None or b is None else a / b
                if variant == "fedbuff":
                    at = _accuracy_at_version(async_run["history"], sync_run["summary"]["final_version"])
                    equal_updates[seed] = 100 * (at - sync_run["summary"]["final_accuracy_tail"])
            ratios[f"{sync}/{variant}"] = {
                "time_ratio": None if slow is None or fast is None else slow / fast,
                "time_ratio_per_seed": per_seed,
                "final_accuracy_gap_points": 100 * gap,
                "gap_at_equal_updates_points": equal_updates or None,
            }
    return ratios


def _print_table(table: dict[str, Any], ratios: dict[str, Any], tail: dict[int, float]) -> None:
    def fmt(s: dict[str, Any], scale: float = 1.0, digits: int = 0) -> str:
        if s["median"] is None:
            return f"not reached in {s['missed']} run(s)"
        return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f})"

    tails = ", ".join(f"{ratio:.1f}x (seed {seed})" for seed, ratio in tail.items())
    print(f"\nfleet: heavy_tailed, the slowest 10% at least {tails} slower than the median device")
    print(f"| variant | time to {BASE['run']['target_accuracy']:.0%}, emulated s: median (min-max) | final accuracy % | versions | updates |")
    print("| --- | --- | --- | --- | --- |")
    for variant, row in table.items():
        print(f"| {variant} | {fmt(row['time_to_target_s'])} | {fmt(row['final_accuracy'], 100, 1)} | {row['versions']:.0f} | {row['updates']:.0f} |")
    print("\n| comparison | time ratio (sync / async), median | per seed | final accuracy gap, points (async - sync) | at equal updates, per seed |")
    print("| --- | --- | --- | --- | --- |")
    for name, ratio in ratios.items():
        time_ratio = "n/a" if ratio["time_ratio"] is None else f"{ratio['time_ratio']:.1f}x"
        per_seed = ", ".join("n/a" if r is None else f"{r:.1f}x" for r in ratio["time_ratio_per_seed"].values())
        equal = ratio["gap_at_equal_updates_points"]
        equal_text = "" if equal is None else ", ".join(f"{g:+.1f}" for g in equal.values())
        print(f"| {name} | {time_ratio} | {per_seed} | {ratio['final_accuracy_gap_points']:+.1f} | {equal_text} |")


def _plot(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, (variant, results) in zip(colours, runs.items(), strict=False):
        for i, run in enumerate(results):
            history = run["history"]
            axes.plot(
                [p["emulated_s"] for p in history], [p["accuracy"] for p in history],
                color=colour, alpha=0.8 if i == 0 else 0.35, linewidth=1.2, label=variant if i == 0 else None,
            )  # fmt: skip
    axes.axhline(BASE["run"]["target_accuracy"], color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("emulated wall time (s)")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0, 1)
    axes.set_title("digits, 50 heavy-tailed devices: accuracy against wall time (one line per seed)")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
