"""Secure aggregation: what one SecAgg+ cohort costs, against plaintext aggregation.

One cohort of n members, each holding m float32 parameters, runs the whole
protocol in this process: a `server.secagg.CohortCoordinator` and n
`client_sdk._secagg.CohortMember` objects, every message handed from one to
the other by hand, in the same order as tests/unit/test_secagg_protocol.py's
`run` (advertise keys, share keys, receive shares + masked input, unmask,
finish). There is no gRPC: this isolates the cost of the protocol (quantizing,
AES-CTR mask expansion, X25519, Shamir, AES-GCM) from the transport, which
bench/throughput.py measures.

A share `--dropout` of the members, drawn at random, vanishes after sharing
keys and before uploading: the costly case for the server, which must rebuild
each dropped member's mask key from its neighbours' shares and remove the
pairwise masks it shared with every surviving neighbour. `max` drops as many
as the default t tolerates with certainty (n - default_min_survivors); t
itself is set to a majority, the lowest the server allows, so that random
dropouts beyond that decide by themselves whether the cohort completes. A cohort the protocol
aborts (too few survivors, a secret that cannot be rebuilt) is reported as
aborted, with what it cost up to the abort.

Per cohort: wall time (everything sequential in one process) and the critical
path if members ran in parallel (server CPU + the slowest member of each
phase); client CPU per member, masking (`CohortMember.masked_input`)
separately from the rest of the protocol; server CPU (every coordinator call)
and `finish()` alone; bytes each member sends against the plaintext update
(4 bytes x m). The reference, measured in the same run on the same updates:
the weighted float64 sum a plaintext fedbuff server computes (blocked
multiply-add through a scratch buffer, like `server.strategies._Accumulator`).
Every secure sum is checked against it (within one quantization step per summand).

Each configuration runs in a freshly spawned interpreter (see
`run_in_fresh_process` for why).

    python -m bench.secagg                          # default matrix, about 4.5 min on 2 cores
    python bench/secagg.py --n 100 --params 1M --dropout 0.1
    python -m bench.secagg --n 100 --params 1M --dropout 0.1 --neighbours 20 --json /tmp/s.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cryptography
import numpy as np

from bench._common import count_label, machine, parse_count
from rich.console import Console
from rich.table import Table

from client_sdk._secagg import CohortMember
from proto.secagg.protocol import (
    default_min_survivors,
    KeyAdvert,
    MaskedInput,
    SealedShares,
    UnmaskResponse,
    default_neighbour_count,
)
from proto.secagg.quantize import FixedPoint
from server.secagg import CohortAborted, CohortCoordinator

BITS = 32
BOUND = 8.0
"""Clipping bound of w * delta; the updates below stay far inside it."""
UPDATE_STD = 0.05
WEIGHT_RANGE = (0.5, 2.0)
"""w = s(tau) * n_samples, normalised: what a member multiplies its update by."""
ID_BYTES = 8
"""A member id on the wire (the cohort id is counted as its UTF-8 bytes)."""
FLOAT32_BYTES = 4
RING_BYTES = 4
BIG_COHORT = 200 * 1_000_000
"""n x m above this runs once (--repeats applies up to it; n=200, m=1M takes ~10 s a cohort here)."""
MAX_DROPOUT = None
"""--dropout max: as many as the default t tolerates with certainty, n - default_min_survivors."""

TARGET_MASKING_MS_PER_M = 30.0
TARGET_SERVER_S = 1.0
TARGET_BYTES_RATIO = 1.1
TARGET_N = 100
TARGET_SERVER_CONFIG = (100, 1_000_000, 0.1)

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "secagg.json"

T = TypeVar("T")
Dropout = float | None
"""A share of n in [0, 1), or MAX_DROPOUT."""


# --------------------------------------------------------------------------- #
# Timing                                                                       #
# --------------------------------------------------------------------------- #

_RUSAGE_WHO = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)  # per thread on Linux


def _minor_faults() -> int:
    return resource.getrusage(_RUSAGE_WHO).ru_minflt


class CpuClock:
    """Sums the thread CPU time (user + system) of the calls it wraps, and the
    minor page faults they take (first touches of fresh memory, a large part
    of the cost of allocating big temporaries). The protocol is single-threaded
    (numpy ufuncs and OpenSSL here do not spawn threads), so a call's thread
    CPU time is its whole cost."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.faults = 0

    def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        faults = _minor_faults()
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.thread_time() - start
            self.faults += _minor_faults() - faults


@dataclass
class MemberCost:
    """CPU seconds per protocol phase, and bytes sent, for one member."""

    setup_advertise_s: float = 0.0  # CohortMember(plan) (two X25519 key pairs) + advertise
    share_keys_s: float = 0.0  # Shamir split x2, X25519 + HKDF and AES-GCM per neighbour
    receive_shares_s: float = 0.0  # X25519 + HKDF and AES-GCM open per neighbour
    masking_s: float = 0.0  # masked_input: quantize + self mask + pairwise masks
    masking_faults: int = 0
    unmask_s: float = 0.0
    bytes_sent: int = 0

    @property
    def rest_s(self) -> float:
        return self.setup_advertise_s + self.share_keys_s + self.receive_shares_s + self.unmask_s


# --------------------------------------------------------------------------- #
# Wire sizes: what a member sends, counted from the message objects            #
# --------------------------------------------------------------------------- #


def _header_bytes(cohort_id: str) -> int:
    return len(cohort_id.encode()) + ID_BYTES


def advert_bytes(advert: KeyAdvert) -> int:
    return _header_bytes(advert.cohort_id) + len(advert.share_key) + len(advert.mask_key)


def sealed_bytes(shares: SealedShares) -> int:
    return _header_bytes(shares.cohort_id) + sum(ID_BYTES + len(blob) for blob in shares.sealed.values())


def input_bytes(masked: MaskedInput) -> int:
    return _header_bytes(masked.cohort_id) + RING_BYTES * masked.vector.size


def unmask_bytes(response: UnmaskResponse) -> int:
    shares = [*response.self_mask_shares.values(), *response.mask_key_shares.values()]
    return _header_bytes(response.cohort_id) + sum(ID_BYTES + len(share) for share in shares)


# --------------------------------------------------------------------------- #
# One cohort                                                                   #
# --------------------------------------------------------------------------- #


@dataclass
class CohortRun:
    neighbours: int  # k, as built (smallest degree of the graph)
    threshold: int  # shares needed to rebuild a member's secret
    min_survivors: int  # as the coordinator set it (it may raise the one asked for)
    dropped: int
    survivors: int  # members that uploaded
    aborted: str | None  # why the coordinator aborted the cohort, or None if it completed
    wall_s: float
    critical_path_s: float  # server CPU + the slowest member of each phase
    server_s: float
    server_faults: int
    finish_s: float  # 0 when the cohort aborted before finish()
    plaintext_s: float
    masking_s: list[float]  # uploading members
    masking_faults: list[int]
    rest_s: list[float]  # uploading members
    bytes_sent: list[int]  # uploading members
    dropped_bytes_sent: list[int]
    max_error: float  # |secure - plaintext|, NaN when aborted
    error_bound: float

    @property
    def ok(self) -> bool:
        return self.aborted is not None or self.max_error <= self.error_bound


def plaintext_sum(updates: np.ndarray, weights: np.ndarray, rows: Sequence[int], clock: CpuClock) -> tuple[np.ndarray, float]:
    """sum(w_i * delta_i) in float64 the way the fedbuff accumulator does it:
    the first update multiplied into a new float64 buffer, the others
    multiplied in 64k-element blocks through a scratch buffer that stays in
    cache and added in place. Only the summing is timed."""
    block = 1 << 16

    def accumulate() -> tuple[np.ndarray, float]:
        scratch = np.empty(block, np.float64)
        sums = np.multiply(updates[rows[0]], weights[rows[0]], dtype=np.float64)
        weight_sum = float(weights[rows[0]])
        for row in rows[1:]:
            flat, weight = updates[row], float(weights[row])
            for start in range(0, flat.size, block):
                stop = min(start + block, flat.size)
                part = scratch[: stop - start]
                np.multiply(flat[start:stop], weight, out=part, dtype=np.float64)
                sums[start:stop] += part
            weight_sum += weight
        return sums, weight_sum

    return clock(accumulate)


def run_cohort(
    cohort_id: str, updates: np.ndarray, weights: np.ndarray, dropout: Dropout, rng: np.random.Generator, neighbours: int
) -> CohortRun:
    """Drive one cohort like tests/unit/test_secagg_protocol.py's `run`; a
    random set of members vanishes after sharing keys (before uploading)."""
    n, m = updates.shape
    ids = list(range(1, n + 1))
    server = CpuClock()
    finish = CpuClock()
    costs = {member: MemberCost() for member in ids}

    def member_call(member: int, attribute: str, fn: Callable[..., T], *args: Any) -> T:
        clock = CpuClock()
        result = clock(fn, *args)
        setattr(costs[member], attribute, getattr(costs[member], attribute) + clock.seconds)
        if attribute == "masking_s":
            costs[member].masking_faults += clock.faults
        return result

    fixed_point = FixedPoint.for_cohort(bits=BITS, bound=BOUND, max_summands=n)
    started = time.perf_counter()
    coordinator = server(
        CohortCoordinator,
        cohort_id,
        ids,
        neighbours=neighbours,
        min_survivors=n // 2 + 1,  # the lowest t the server config allows: random dropouts decide
        fixed_point=fixed_point,
        vector_length=m + 1,
    )
    plans = server(coordinator.plans)
    degree = min(map(len, coordinator.graph.values()))
    drop_count = n - default_min_survivors(n, degree) if dropout is MAX_DROPOUT else round(dropout * n)
    dropped = frozenset(int(x) for x in rng.choice(ids, size=drop_count, replace=False))

    members: dict[int, CohortMember] = {}
    for member in ids:
        members[member] = member_call(member, "setup_advertise_s", CohortMember, plans[member])
        advert = member_call(member, "setup_advertise_s", members[member].advertise)
        costs[member].bytes_sent += advert_bytes(advert)
        server(coordinator.receive_advert, advert)
    adverts = server(coordinator.close_advertising)
    for member in ids:
        sealed = member_call(member, "share_keys_s", members[member].share_keys, adverts[member])
        costs[member].bytes_sent += sealed_bytes(sealed)
        server(coordinator.receive_shares, sealed)
    sealed_for = server(coordinator.close_sharing)
    uploaders = [member for member in ids if member not in dropped]  # the dropped vanish here
    for member in uploaders:
        member_call(member, "receive_shares_s", members[member].receive_shares, sealed_for[member])
        rounding = np.random.default_rng(member)
        masked = member_call(member, "masking_s", members[member].masked_input, updates[member - 1], float(weights[member - 1]), rounding)
        costs[member].bytes_sent += input_bytes(masked)
        server(coordinator.receive_input, masked)
    aborted: str | None = None
    try:
        request = server(coordinator.close_input)
        for member in uploaders:
            response = member_call(member, "unmask_s", members[member].unmask, request)
            costs[member].bytes_sent += unmask_bytes(response)
            server(coordinator.receive_unmask, response)
        result = server(finish, coordinator.finish)
        server(coordinator.complete)
    except CohortAborted as abort:
        aborted = str(abort)
    wall = time.perf_counter() - started
    # members in parallel: each phase waits for its slowest member, then the server
    slowest = [
        max(c.setup_advertise_s for c in costs.values()),
        max(c.share_keys_s for c in costs.values()),
        max(costs[u].receive_shares_s + costs[u].masking_s for u in uploaders),
        max(costs[u].unmask_s for u in uploaders),
    ]
    degree, threshold, min_survivors = min(map(len, coordinator.graph.values())), coordinator.threshold, coordinator.min_survivors
    del coordinator, members  # free the masked inputs before the reference runs

    plain = CpuClock()
    rows = [member - 1 for member in uploaders]
    expected, expected_weight = plaintext_sum(updates, weights, rows, plain)
    error = math.nan
    if aborted is None:
        error = max(float(np.max(np.abs(result.weighted_sum - expected))), abs(result.weight_sum - expected_weight))
    up = [costs[member] for member in uploaders]
    return CohortRun(
        neighbours=degree,
        threshold=threshold,
        min_survivors=min_survivors,
        dropped=len(dropped),
        survivors=len(uploaders),
        aborted=aborted,
        wall_s=wall,
        critical_path_s=server.seconds + sum(slowest),
        server_s=server.seconds,
        server_faults=server.faults,
        finish_s=finish.seconds,
        plaintext_s=plain.seconds,
        masking_s=[c.masking_s for c in up],
        masking_faults=[c.masking_faults for c in up],
        rest_s=[c.rest_s for c in up],
        bytes_sent=[c.bytes_sent for c in up],
        dropped_bytes_sent=[costs[member].bytes_sent for member in sorted(dropped)],
        max_error=error,
        error_bound=len(uploaders) * fixed_point.resolution,
    )


# --------------------------------------------------------------------------- #
# A configuration: several cohorts, summarised                                 #
# --------------------------------------------------------------------------- #


@dataclass
class ConfigResult:
    n: int
    params: int
    dropout: str  # as asked: "10%", or "max"
    neighbours: int
    threshold: int
    min_survivors: int
    dropped: int
    survivors: int
    repeats: int
    aborted: int  # cohorts the coordinator aborted, of `repeats`
    abort_reason: str | None
    wall_s: float  # medians over the repeats
    critical_path_s: float
    server_s: float
    finish_s: float
    plaintext_s: float
    masking_ms_median: float  # over members, then median over repeats
    masking_ms_max: float
    masking_faults_median: float  # minor page faults in one masked_input call
    rest_ms_median: float
    rest_ms_max: float
    server_faults: float
    bytes_per_client_max: int  # the busiest uploading member
    dropped_bytes_per_client_max: int  # a member that vanished after sharing keys
    plaintext_bytes: int
    max_error: float  # largest |secure - plaintext| over the completed repeats
    error_bound: float
    ok: bool
    runs: list[CohortRun] = field(default_factory=list)

    @property
    def completed(self) -> bool:
        return self.aborted == 0

    @property
    def masking_ms_per_million(self) -> float:
        return self.masking_ms_median * 1e6 / self.params

    @property
    def secure_over_plain(self) -> float:
        return self.server_s / self.plaintext_s if self.plaintext_s > 0 else math.inf

    @property
    def bytes_ratio(self) -> float:
        return self.bytes_per_client_max / self.plaintext_bytes


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _dropout_label(dropout: Dropout) -> str:
    return "max" if dropout is MAX_DROPOUT else f"{dropout:.0%}"


def make_updates(n: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n distinct float32 updates of m values (one row each) and their weights."""
    rng = np.random.default_rng(seed)
    updates = rng.standard_normal((n, m), dtype=np.float32)
    updates *= np.float32(UPDATE_STD)
    return updates, rng.uniform(*WEIGHT_RANGE, size=n)


def run_configuration(n: int, params: int, dropout: Dropout, repeats: int, neighbours: int) -> ConfigResult:
    """`repeats` cohorts of one configuration, after a small warm-up cohort
    (imports, OpenSSL and numpy initialisation), on updates drawn from a seed
    that depends on n and m only, so every dropout sees the same updates."""
    warm_updates, warm_weights = make_updates(5, 1_000, seed=0)
    run_cohort("warm-up", warm_updates, warm_weights, 0.0, np.random.default_rng(0), default_neighbour_count(5))
    updates, weights = make_updates(n, params, seed=n)
    rng = np.random.default_rng([n, params, 1000 if dropout is MAX_DROPOUT else round(dropout * 1000)])
    label = _dropout_label(dropout)
    runs = [run_cohort(f"bench-n{n}-m{params}-d{label}-r{rep}", updates, weights, dropout, rng, neighbours) for rep in range(repeats)]
    done = [r for r in runs if r.aborted is None]
    first = runs[0]
    return ConfigResult(
        n=n,
        params=params,
        dropout=label,
        neighbours=first.neighbours,
        threshold=first.threshold,
        min_survivors=first.min_survivors,
        dropped=first.dropped,
        survivors=first.survivors,
        repeats=repeats,
        aborted=len(runs) - len(done),
        abort_reason=next((r.aborted for r in runs if r.aborted is not None), None),
        wall_s=_median([r.wall_s for r in runs]),
        critical_path_s=_median([r.critical_path_s for r in runs]),
        server_s=_median([r.server_s for r in runs]),
        finish_s=_median([r.finish_s for r in done]),
        plaintext_s=_median([r.plaintext_s for r in runs]),
        masking_ms_median=1e3 * _median([_median(r.masking_s) for r in runs]),
        masking_ms_max=1e3 * _median([max(r.masking_s) for r in runs]),
        masking_faults_median=_median([_median(r.masking_faults) for r in runs]),
        rest_ms_median=1e3 * _median([_median(r.rest_s) for r in runs]),
        rest_ms_max=1e3 * _median([max(r.rest_s) for r in runs]),
        server_faults=_median([r.server_faults for r in runs]),
        bytes_per_client_max=max(max(r.bytes_sent) for r in runs),
        dropped_bytes_per_client_max=max((max(r.dropped_bytes_sent, default=0) for r in runs), default=0),
        plaintext_bytes=FLOAT32_BYTES * params,
        max_error=max((r.max_error for r in done), default=math.nan),
        error_bound=min(r.error_bound for r in runs),
        ok=all(r.ok for r in runs),
        runs=runs,
    )


def run_in_fresh_process(n: int, params: int, dropout: Dropout, repeats: int, neighbours: int) -> ConfigResult:
    """`run_configuration` in a newly spawned interpreter. The allocator state a
    configuration leaves behind changes the next one's numbers: glibc raises
    its mmap threshold after big frees, and whether a 4 MB temporary then comes
    back as fresh pages (page faults) or reused ones decides a third of
    masked_input's time (n = 100, m = 1M: ~7000 minor faults and 33-37 ms per
    member alone, ~1000 faults and 22 ms after the 100k rows). A fresh process
    per configuration makes each row independent of which rows ran before."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_configuration, n, params, dropout, repeats, neighbours).result()


# --------------------------------------------------------------------------- #
# Targets                                                                      #
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Verdict:
    name: str
    goal: str
    measured: str
    passed: bool | None  # None: the configuration it needs was not run, or could not complete


def _masking_verdict(results: Sequence[ConfigResult]) -> Verdict:
    goal = f"<= {TARGET_MASKING_MS_PER_M:.0f} ms per 1M parameters at n = {TARGET_N} (median member)"
    rows = [r for r in results if r.n == TARGET_N and r.params >= 1_000_000]
    if not rows:
        return Verdict("client masking", goal, "not run (needs n = 100, m >= 1M)", None)
    worst = max(rows, key=lambda r: r.masking_ms_per_million)
    measured = f"{worst.masking_ms_per_million:.1f} ms per 1M (m = {_count(worst.params)}, dropout {worst.dropout}; worst such row)"
    return Verdict("client masking", goal, measured, worst.masking_ms_per_million <= TARGET_MASKING_MS_PER_M)


def _server_verdict(results: Sequence[ConfigResult]) -> Verdict:
    n, params, dropout = TARGET_SERVER_CONFIG
    goal = f"<= {TARGET_SERVER_S:g} s CPU at n = {n}, m = {_count(params)}, {dropout:.0%} dropout"
    row = next((r for r in results if (r.n, r.params, r.dropout) == (n, params, _dropout_label(dropout))), None)
    if row is None:
        return Verdict("server per cohort", goal, f"not run (needs n = {n}, m = {_count(params)}, dropout {dropout:g})", None)
    if not row.completed:
        fallback = next((r for r in results if (r.n, r.params, r.dropout) == (n, params, "max") and r.completed), None)
        also = f"; at the most dropouts it tolerates ({fallback.dropped}): {fallback.server_s:.3f} s" if fallback else ""
        return Verdict("server per cohort", goal, f"cohort aborted ({row.abort_reason}){also}", None)
    return Verdict("server per cohort", goal, f"{row.server_s:.3f} s (finish {row.finish_s:.3f} s)", row.server_s <= TARGET_SERVER_S)


def _bytes_verdict(results: Sequence[ConfigResult]) -> Verdict:
    goal = f"<= {TARGET_BYTES_RATIO:g}x the plaintext update (every completed row, busiest member)"
    rows = [r for r in results if r.completed]
    if not rows:
        return Verdict("bytes per client", goal, "no cohort completed", None)
    worst = max(rows, key=lambda r: r.bytes_ratio)
    measured = f"{worst.bytes_ratio:.4f}x at worst (n = {worst.n}, m = {_count(worst.params)}, dropout {worst.dropout})"
    return Verdict("bytes per client", goal, measured, worst.bytes_ratio <= TARGET_BYTES_RATIO)


def verdicts(results: Sequence[ConfigResult]) -> list[Verdict]:
    return [_masking_verdict(results), _server_verdict(results), _bytes_verdict(results)]


# --------------------------------------------------------------------------- #
# Reporting                                                                    #
# --------------------------------------------------------------------------- #


_count = count_label
_parse_count = parse_count


def _parse_dropout(text: str) -> Dropout:
    if text.lower() == "max":
        return MAX_DROPOUT
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share like 0.1 or 10%, or max, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"dropout must be in [0, 1), got {text!r}")
    return value


def _cohort_size(text: str) -> int:
    value = _parse_count(text)
    if value < 3:
        raise argparse.ArgumentTypeError(f"a cohort needs at least 3 members, got {value}")
    return value


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{1e3 * seconds:.1f}"


def print_report(console: Console, results: Sequence[ConfigResult], checks: Sequence[Verdict]) -> None:
    cost = Table(
        title="One SecAgg+ cohort in process (no gRPC): n members x m float32 parameters, members dropping after sharing keys. "
        "CPU times, medians over repeats; per member: median | max over the members",
    )
    for name in (
        "n", "m", "drop", "k|t", "reps", "wall s", "crit s", "mask ms", "mask ms/1M", "mask faults", "rest ms",
        "server ms", "finish ms", "plain ms", "secure/plain",
    ):
        cost.add_column(name, justify="right")
    for r in results:
        cost.add_row(
            str(r.n), _count(r.params), f"{r.dropout} ({r.dropped})", f"{r.neighbours}|{r.threshold}", str(r.repeats),
            f"{r.wall_s:.2f}", f"{r.critical_path_s:.3f}", f"{r.masking_ms_median:.1f} | {r.masking_ms_max:.1f}",
            f"{r.masking_ms_per_million:.1f}", f"{r.masking_faults_median:.0f}", f"{r.rest_ms_median:.2f} | {r.rest_ms_max:.2f}",
            _ms(r.server_s) + ("" if r.completed else " [red](abort)[/red]"), _ms(r.finish_s), _ms(r.plaintext_s),
            f"{r.secure_over_plain:.1f}x" if r.completed else "-",
        )
    console.print(cost)

    traffic = Table(title="Bytes each member sends (against the plaintext update, 4 B x m); how the cohort ended")
    for name in (
        "n", "m", "drop", "min surv", "survivors", "bytes/client", "plaintext B", "xplain", "dropped member B",
        "max err", "bound", "outcome",
    ):
        traffic.add_column(name, justify="right")
    for r in results:
        outcome = "completed, sum ok" if r.completed and r.ok else ("[red]WRONG SUM[/red]" if r.completed else f"[red]aborted {r.aborted}/{r.repeats}[/red]")
        traffic.add_row(
            str(r.n), _count(r.params), f"{r.dropout} ({r.dropped})", str(r.min_survivors), str(r.survivors),
            f"{r.bytes_per_client_max:,}", f"{r.plaintext_bytes:,}", f"{r.bytes_ratio:.4f}", f"{r.dropped_bytes_per_client_max:,}",
            "-" if math.isnan(r.max_error) else f"{r.max_error:.1e}", f"{r.error_bound:.1e}", outcome,
        )
    console.print(traffic)
    for reason in dict.fromkeys(r.abort_reason for r in results if r.abort_reason):
        console.print(f"aborted: {reason}")
    for check in checks:
        status = "n/a " if check.passed is None else ("[green]PASS[/green]" if check.passed else "[red]FAIL[/red]")
        console.print(f"{status}  {check.name}: {check.goal}; measured {check.measured}")


def _result_json(r: ConfigResult) -> dict[str, Any]:
    document = asdict(r)
    document.update(
        completed=r.completed,
        masking_ms_per_million=r.masking_ms_per_million,
        secure_over_plain=r.secure_over_plain if r.completed else None,
        bytes_ratio=r.bytes_ratio,
    )
    for run, raw in zip(r.runs, document["runs"]):
        raw["ok"] = run.ok
    return document


def write_json(path: Path, args: argparse.Namespace, results: Sequence[ConfigResult], checks: Sequence[Verdict], elapsed_s: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "secagg",
        "command": ["python", "-m", "bench.secagg", *sys.argv[1:]],
        "machine": machine(cryptography=cryptography.__version__),
        "settings": {
            "n": args.n, "params": args.params, "dropout": [_dropout_label(d) for d in args.dropout],
            "neighbours": args.neighbours or "default_neighbour_count(n)", "repeats": args.repeats,
            "repeats_above": f"1 when n x m > {BIG_COHORT:,}", "bits": BITS, "bound": BOUND,
            "min_survivors_asked": "n // 2 + 1", "update_std": UPDATE_STD, "weight_range": WEIGHT_RANGE,
            "fresh_process_per_configuration": not args.same_process,
        },
        "elapsed_s": elapsed_s,
        "results": [_result_json(r) for r in results],
        "targets": [asdict(v) for v in checks],
    }
    path.write_text(json.dumps(_without_nan(document), indent=2, allow_nan=False) + "\n")


def _without_nan(value: Any) -> Any:
    """NaN (a median of nothing, the error of an aborted cohort) as JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(item) for item in value]
    return value


# --------------------------------------------------------------------------- #
# CLI                                                                          #
# --------------------------------------------------------------------------- #


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.secagg",
        description="Cost of one SecAgg+ cohort (coordinator and members in process, no gRPC) against plaintext aggregation.",
    )
    parser.add_argument("--n", type=_cohort_size, nargs="+", default=[10, 50, 100, 200], help="cohort sizes (default: 10 50 100 200)")
    parser.add_argument("--params", type=_parse_count, nargs="+", default=[100_000, 1_000_000], help="float32 parameters per update (default: 100k 1M)")
    parser.add_argument(
        "--dropout", type=_parse_dropout, nargs="+", default=[0.0, 0.1, 0.3, MAX_DROPOUT],
        help="share of members that vanish after sharing keys, or max: as many as the coordinator tolerates (default: 0 0.1 0.3 max)",
    )
    parser.add_argument("--neighbours", type=_parse_count, default=None, help="SecAgg+ neighbours k (default: proto.secagg.protocol.default_neighbour_count(n))")
    parser.add_argument("--repeats", type=_parse_count, default=3, help=f"cohorts per configuration; 1 when n x m > {BIG_COHORT:,} (default: 3)")
    parser.add_argument(
        "--same-process", action="store_true",
        help="run every configuration in this process instead of a fresh one each (for profiling; rows then depend on the rows before)",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results (default: bench/results/secagg.json)")
    args = parser.parse_args(argv)
    for name in ("n", "params", "dropout"):
        setattr(args, name, list(dict.fromkeys(getattr(args, name))))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log file should not wrap the tables
    started = time.monotonic()
    results: list[ConfigResult] = []
    for params in args.params:
        for n in args.n:
            repeats = 1 if n * params > BIG_COHORT else args.repeats
            neighbours = args.neighbours if args.neighbours is not None else default_neighbour_count(n)
            for dropout in args.dropout:
                run = run_configuration if args.same_process else run_in_fresh_process
                r = run(n, params, dropout, repeats, neighbours)
                results.append(r)
                outcome = "completed" if r.completed else f"ABORTED {r.aborted}/{r.repeats}"
                print(
                    f"n={n:<4} m={_count(params):<5} drop={r.dropout:<4} ({r.dropped:>2})  wall {r.wall_s:6.2f} s  "
                    f"server {1e3 * r.server_s:7.1f} ms  mask {r.masking_ms_median:6.1f} ms  plain {1e3 * r.plaintext_s:6.1f} ms  {outcome}",
                    flush=True,
                )
    checks = verdicts(results)
    print_report(console, results, checks)
    elapsed = time.monotonic() - started
    write_json(args.json, args, results, checks, elapsed)
    print(f"wrote {args.json} after {elapsed:.0f} s")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
