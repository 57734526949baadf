"""Aggregation rules on numpy arrays. No gRPC, no locking: `server.core.Job`
calls these under its lock, one update at a time, in arrival order.

A strategy never mutates the arrays it is given (they belong to immutable
snapshots that clients may be reading); it returns fresh arrays when a new
version is due. Arithmetic is spelled out so a test can reproduce it exactly:
fedasync works in the model's dtype; fedbuff and fedavg accumulate in float64
and cast the result back to the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from server.config import StrategyConfig
from server.errors import InvalidUpdate, PreconditionFailed, RoundClosed

Params = Mapping[str, np.ndarray]


class Strategy(Protocol):
    synchronous: bool

    def admit(self, client_id: str, base_version: int, version: int) -> None:
        """Refuse (raise) an update this strategy cannot take at `version`."""

    def take(self, params: Params, delta: Params, *, staleness_weight: float, num_samples: int, client_id: str) -> dict[str, np.ndarray] | None:
        """Take one admitted update; return the next model when a version is due."""

    @property
    def pending(self) -> int:
        """Updates taken but not yet part of a published version."""

    @property
    def publishes_on_next(self) -> bool:
        """Whether the next `take` returns a new model (known before it runs,
        so a durable log entry can say which version the update will be in)."""


class FedAsync:
    """Xie, Koyejo, Gupta (2019): x <- x + alpha * s(tau) * delta on each arrival."""

    synchronous = False

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def admit(self, client_id: str, base_version: int, version: int) -> None:
        return None

    def take(self, params: Params, delta: Params, *, staleness_weight: float, num_samples: int, client_id: str) -> dict[str, np.ndarray]:
        scale = self.alpha * staleness_weight
        new = {}
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked by _require_finite
            for name, x in params.items():
                step = np.multiply(delta[name], x.dtype.type(scale))  # the new array; x + step == step + x exactly
                step += x
                new[name] = step
        return _require_finite(new)

    @property
    def pending(self) -> int:
        return 0

    @property
    def publishes_on_next(self) -> bool:
        return True


def all_finite(array: np.ndarray) -> bool:
    """True when `array` holds no NaN or Inf. One float64 sum instead of
    np.isfinite(...).all(): no temporary array, one pass. Any NaN or Inf makes
    the sum non-finite, and finite float16/32 values cannot overflow a float64
    sum (3.4e38 * 2^64 elements is far below 1.8e308)."""
    if array.dtype == np.float64:
        return bool(np.isfinite(array).all())  # a float64 sum of finite values could overflow
    return math.isfinite(np.add.reduce(array, axis=None, dtype=np.float64))


def _require_finite(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A finite update can still push the model past its dtype's range; such a
    model would poison every later update, so the update is refused instead."""
    for name, x in params.items():
        if not all_finite(x):
            raise InvalidUpdate(
                f"applying this update would overflow tensor {name!r} of the model to Inf or NaN "
                f"in {x.dtype.name}; nothing was applied"
            )
    return params


class _Accumulator:
    """sum(w_i * delta_i) in float64, plus sum(w_i) and the count. float64
    cannot overflow here: deltas are finite and weights are bounded (s <= 1,
    num_samples <= 2^32).

    This runs under the job lock for every update and is bound by memory
    traffic, so it allocates nothing after the first update and multiplies in
    blocks through a small scratch buffer that stays in cache: reading the
    delta and updating the sums in place is all the traffic there is."""

    BLOCK = 1 << 16  # float64 elements: a 512 KiB scratch buffer

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}  # flat float64, one per tensor
        self._scratch = np.empty(self.BLOCK, np.float64)
        self.weight_sum = 0.0
        self.count = 0

    def add(self, delta: Params, weight: float) -> None:
        for name, d in delta.items():
            flat = d.reshape(-1)
            sums = self.sums.get(name)
            if sums is None:
                self.sums[name] = np.multiply(flat, weight, dtype=np.float64)
            elif weight == 1.0:
                sums += flat  # float64(d) * 1.0 == float64(d): same result, less work
            else:
                for start in range(0, flat.size, self.BLOCK):
                    stop = min(start + self.BLOCK, flat.size)
                    part = self._scratch[: stop - start]
                    np.multiply(flat[start:stop], weight, out=part, dtype=np.float64)
                    sums[start:stop] += part
        self.weight_sum += weight
        self.count += 1

    def reset(self) -> None:
        """Empty the buffer, keeping its arrays for the next round."""
        for sums in self.sums.values():
            sums.fill(0.0)
        self.weight_sum = 0.0
        self.count = 0

    def apply_with(self, params: Params, last: Params, last_weight: float, scale: float) -> dict[str, np.ndarray]:
        """params + scale * (sums + last_weight * last), cast back to each
        tensor's dtype, without touching the buffer: if the result overflows,
        the last update is refused and the buffer still holds the others."""
        new = {}
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked by _require_finite
            for name, x in params.items():
                total = np.multiply(last[name], last_weight, dtype=np.float64)  # the one temporary
                if name in self.sums:
                    total += self.sums[name].reshape(total.shape)
                total *= scale
                total += x
                new[name] = total.astype(x.dtype)
        return _require_finite(new)


class FedBuff:
    """Nguyen et al. (2022): buffer K updates weighted by w_i = s(tau_i) (times
    n_i if configured), then x <- x + eta_g * sum(w_i delta_i) / N, where N is K
    ("count", as in the paper: stale updates shrink the step) or sum(w_i)
    ("weight_sum": a weighted mean of the buffered deltas)."""

    synchronous = False

    def __init__(self, buffer_size: int, server_lr: float, weight_by_samples: bool, normalizer: str) -> None:
        self.buffer_size = buffer_size
        self.server_lr = server_lr
        self.weight_by_samples = weight_by_samples
        self.normalizer = normalizer
        self._buffer = _Accumulator()

    def admit(self, client_id: str, base_version: int, version: int) -> None:
        return None

    def take(self, params: Params, delta: Params, *, staleness_weight: float, num_samples: int, client_id: str) -> dict[str, np.ndarray] | None:
        weight = staleness_weight * (num_samples if self.weight_by_samples else 1)
        if self._buffer.count + 1 < self.buffer_size:
            self._buffer.add(delta, weight)
            return None
        count, weight_sum = self._buffer.count + 1, self._buffer.weight_sum + weight
        norm = count if self.normalizer == "count" else weight_sum
        new_params = self._buffer.apply_with(params, delta, weight, self.server_lr / norm)
        self._buffer.reset()
        return new_params

    @property
    def pending(self) -> int:
        return self._buffer.count

    @property
    def publishes_on_next(self) -> bool:
        return self._buffer.count + 1 >= self.buffer_size


class FedAvg:
    """Synchronous rounds (McMahan et al. 2017). Round r trains on version r; it
    closes when `clients_per_round` distinct clients have pushed a delta based
    on version r, and x <- x + eta * sum(n_i delta_i) / sum(n_i). An update based
    on an older version arrives after its round closed and is refused: the
    client pulls the new version and trains again."""

    synchronous = True

    def __init__(self, clients_per_round: int, server_lr: float) -> None:
        self.clients_per_round = clients_per_round
        self.server_lr = server_lr
        self._round = _Accumulator()
        self._contributors: set[str] = set()

    def admit(self, client_id: str, base_version: int, version: int) -> None:
        if base_version != version:
            raise RoundClosed(
                f"round {base_version} closed before this update arrived (the model is at version {version}); "
                "pull the current version and train on it"
            )
        if client_id in self._contributors:
            raise PreconditionFailed(
                f"client {client_id!r} already pushed an update in round {version}; wait for version {version + 1}"
            )

    def take(self, params: Params, delta: Params, *, staleness_weight: float, num_samples: int, client_id: str) -> dict[str, np.ndarray] | None:
        if self._round.count + 1 < self.clients_per_round:
            self._round.add(delta, float(num_samples))
            self._contributors.add(client_id)
            return None
        weight_sum = self._round.weight_sum + num_samples
        new_params = self._round.apply_with(params, delta, float(num_samples), self.server_lr / weight_sum)
        self._round.reset()
        self._contributors = set()
        return new_params

    @property
    def pending(self) -> int:
        return self._round.count

    @property
    def publishes_on_next(self) -> bool:
        return self._round.count + 1 >= self.clients_per_round


def build_strategy(config: StrategyConfig) -> Strategy:
    if config.name == "fedasync":
        return FedAsync(config.alpha)
    if config.name == "fedbuff":
        return FedBuff(config.buffer_size, config.server_lr, config.weight_by_samples, config.normalizer)
    return FedAvg(config.clients_per_round, config.server_lr)
