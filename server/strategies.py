"""Aggregation rules on numpy arrays. No gRPC, no locking: `server.core.Job`
calls these under its lock, one update at a time, in arrival order.

A strategy never mutates the arrays it is given (they belong to immutable
snapshots that clients may be reading); it returns fresh arrays when a new
version is due. Arithmetic is spelled out so a test can reproduce it exactly:
fedasync works in the model's dtype; fedbuff and fedavg accumulate in float64
and cast the result back to the model's dtype.
"""

from __future__ import annotations

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


class FedAsync:
    """Xie, Koyejo, Gupta (2019): x <- x + alpha * s(tau) * delta on each arrival."""

    synchronous = False

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def admit(self, client_id: str, base_version: int, version: int) -> None:
        return None

    def take(self, params: Params, delta: Params, *, staleness_weight: float, num_samples: int, client_id: str) -> dict[str, np.ndarray]:
        scale = self.alpha * staleness_weight
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked by _require_finite
            new = {name: x + x.dtype.type(scale) * delta[name] for name, x in params.items()}
        return _require_finite(new)

    @property
    def pending(self) -> int:
        return 0


def _require_finite(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A finite update can still push the model past its dtype's range; such a
    model would poison every later update, so the update is refused instead."""
    for name, x in params.items():
        if not np.isfinite(x).all():
            raise InvalidUpdate(
                f"applying this update would overflow tensor {name!r} of the model to Inf or NaN "
                f"in {x.dtype.name}; nothing was applied"
            )
    return params


class _Accumulator:
    """sum(w_i * delta_i) in float64, plus sum(w_i) and the count. float64
    cannot overflow here: deltas are finite and weights are bounded (s <= 1,
    num_samples <= 2^32)."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.weight_sum = 0.0
        self.count = 0

    def add(self, delta: Params, weight: float) -> None:
        for name, d in delta.items():
            scaled = np.multiply(d, weight, dtype=np.float64)
            if name in self.sums:
                self.sums[name] += scaled
            else:
                self.sums[name] = scaled
        self.weight_sum += weight
        self.count += 1

    def plus(self, delta: Params, weight: float) -> _Accumulator:
        """A new accumulator holding this one's updates and one more; this one
        is left as it was (so a refused last update changes nothing)."""
        result = _Accumulator()
        result.sums = {name: s.copy() for name, s in self.sums.items()}
        result.weight_sum, result.count = self.weight_sum, self.count
        result.add(delta, weight)
        return result

    def apply(self, params: Params, scale: float) -> dict[str, np.ndarray]:
        """params + scale * sums, cast back to each tensor's dtype."""
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked by _require_finite
            new = {name: (x.astype(np.float64) + scale * self.sums[name]).astype(x.dtype) for name, x in params.items()}
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
        full = self._buffer.plus(delta, weight)
        norm = full.count if self.normalizer == "count" else full.weight_sum
        new_params = full.apply(params, self.server_lr / norm)
        self._buffer = _Accumulator()
        return new_params

    @property
    def pending(self) -> int:
        return self._buffer.count


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
        full = self._round.plus(delta, float(num_samples))
        new_params = full.apply(params, self.server_lr / full.weight_sum)
        self._round = _Accumulator()
        self._contributors = set()
        return new_params

    @property
    def pending(self) -> int:
        return self._round.count


def build_strategy(config: StrategyConfig) -> Strategy:
    if config.name == "fedasync":
        return FedAsync(config.alpha)
    if config.name == "fedbuff":
        return FedBuff(config.buffer_size, config.server_lr, config.weight_by_samples, config.normalizer)
    return FedAvg(config.clients_per_round, config.server_lr)
