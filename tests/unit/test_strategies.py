"""Aggregation strategies on small arrays, against numbers worked out by hand.

Every input array is made read-only before it is handed to a strategy: a
strategy that wrote into a snapshot's tensors (or a client's delta) would raise.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from server.config import StrategyConfig
from server.errors import PreconditionFailed, RoundClosed
from server.strategies import FedAsync, FedAvg, FedBuff, build_strategy


def frozen(**arrays: list[float] | float) -> dict[str, np.ndarray]:
    """float32 tensors, read-only."""
    out = {}
    for name, values in arrays.items():
        array = np.array(values, dtype=np.float32)
        array.flags.writeable = False
        out[name] = array
    return out


def copies(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: array.copy() for name, array in tensors.items()}


def assert_unchanged(tensors: dict[str, np.ndarray], before: dict[str, np.ndarray]) -> None:
    for name, array in tensors.items():
        assert not array.flags.writeable
        assert_array_equal(array, before[name])


# -- FedAsync -----------------------------------------------------------------


def test_fedasync_applies_alpha_times_staleness_times_delta() -> None:
    params = frozen(w=[1.0, 2.0, -3.0], b=[0.5])
    delta = frozen(w=[4.0, -8.0, 2.0], b=[1.0])
    # alpha * s = 0.5 * 0.5 = 0.25
    # w: [1 + 1, 2 - 2, -3 + 0.5] = [2, 0, -2.5];  b: 0.5 + 0.25 = 0.75
    out = FedAsync(alpha=0.5).take(params, delta, staleness_weight=0.5, num_samples=10, client_id="c")
    assert_array_equal(out["w"], np.array([2.0, 0.0, -2.5], dtype=np.float32))
    assert_array_equal(out["b"], np.array([0.75], dtype=np.float32))
    assert out["w"].dtype == np.float32
    assert list(out) == ["w", "b"]


def test_fedasync_full_weight_fresh_update() -> None:
    params = frozen(w=[10.0, 20.0])
    delta = frozen(w=[1.0, -1.0])
    # alpha = 1, s = 1: x + delta
    out = FedAsync(alpha=1.0).take(params, delta, staleness_weight=1.0, num_samples=1, client_id="c")
    assert_array_equal(out["w"], [11.0, 19.0])


def test_fedasync_ignores_num_samples() -> None:
    params = frozen(w=[0.0])
    delta = frozen(w=[8.0])
    strategy = FedAsync(alpha=0.25)
    one = strategy.take(params, delta, staleness_weight=1.0, num_samples=1, client_id="c")
    many = strategy.take(params, delta, staleness_weight=1.0, num_samples=1000, client_id="c")
    assert_array_equal(one["w"], [2.0])  # 0 + 0.25 * 8
    assert_array_equal(many["w"], [2.0])


def test_fedasync_returns_a_model_on_every_arrival_and_never_buffers() -> None:
    strategy = FedAsync(alpha=0.5)
    assert strategy.synchronous is False
    params = frozen(w=[0.0])
    for _ in range(3):
        assert strategy.take(params, frozen(w=[2.0]), staleness_weight=1.0, num_samples=1, client_id="c") is not None
        assert strategy.pending == 0
    strategy.admit("c", base_version=0, version=7)  # any staleness is the job's business, not the strategy's


def test_fedasync_does_not_mutate_inputs() -> None:
    params = frozen(w=[1.0, 2.0])
    delta = frozen(w=[3.0, 4.0])
    before_p, before_d = copies(params), copies(delta)
    out = FedAsync(alpha=0.5).take(params, delta, staleness_weight=1.0, num_samples=1, client_id="c")
    assert_unchanged(params, before_p)
    assert_unchanged(delta, before_d)
    assert not np.shares_memory(out["w"], params["w"])


# -- FedBuff ------------------------------------------------------------------

PARAMS = {"w": [1.0, 2.0]}
# Three updates with staleness weights 1, 0.5, 0.5:
#   sum(w_i d_i) = 1*[1, 0] + 0.5*[0, 2] + 0.5*[4, 0] = [3, 1];   sum(w_i) = 2
UPDATES = [([1.0, 0.0], 1.0), ([0.0, 2.0], 0.5), ([4.0, 0.0], 0.5)]


def feed(strategy: FedBuff, params: dict[str, np.ndarray], updates: list[tuple[list[float], float]], num_samples: list[int] | None = None) -> list[dict[str, np.ndarray] | None]:
    results = []
    for i, (delta, weight) in enumerate(updates):
        n = num_samples[i] if num_samples else 1
        results.append(strategy.take(params, frozen(w=delta), staleness_weight=weight, num_samples=n, client_id=f"c{i}"))
    return results


def test_fedbuff_publishes_nothing_until_the_kth_update() -> None:
    strategy = FedBuff(buffer_size=3, server_lr=3.0, weight_by_samples=False, normalizer="count")
    params = frozen(**PARAMS)
    first = strategy.take(params, frozen(w=UPDATES[0][0]), staleness_weight=1.0, num_samples=1, client_id="a")
    assert first is None
    assert strategy.pending == 1
    second = strategy.take(params, frozen(w=UPDATES[1][0]), staleness_weight=0.5, num_samples=1, client_id="b")
    assert second is None
    assert strategy.pending == 2
    third = strategy.take(params, frozen(w=UPDATES[2][0]), staleness_weight=0.5, num_samples=1, client_id="c")
    assert third is not None
    assert strategy.pending == 0


def test_fedbuff_count_normalizer_divides_by_k() -> None:
    strategy = FedBuff(buffer_size=3, server_lr=3.0, weight_by_samples=False, normalizer="count")
    results = feed(strategy, frozen(**PARAMS), UPDATES)
    assert results[:2] == [None, None]
    # x + 3 * [3, 1] / 3 = [1 + 3, 2 + 1]
    assert_array_equal(results[2]["w"], np.array([4.0, 3.0], dtype=np.float32))
    assert results[2]["w"].dtype == np.float32


def test_fedbuff_weight_sum_normalizer_divides_by_sum_of_weights() -> None:
    strategy = FedBuff(buffer_size=3, server_lr=1.0, weight_by_samples=False, normalizer="weight_sum")
    results = feed(strategy, frozen(**PARAMS), UPDATES)
    # x + 1 * [3, 1] / 2 = [1 + 1.5, 2 + 0.5]
    assert_array_equal(results[2]["w"], [2.5, 2.5])


def test_fedbuff_weight_by_samples_multiplies_weights_by_num_samples() -> None:
    strategy = FedBuff(buffer_size=3, server_lr=0.5, weight_by_samples=True, normalizer="weight_sum")
    # w_i = s_i * n_i = 1*1, 0.5*4, 1*3 = 1, 2, 3;  sum(w_i) = 6
    # sum(w_i d_i) = 1*[6, 0] + 2*[0, 3] + 3*[2, -2] = [12, 0]
    # x + 0.5 * [12, 0] / 6 = [1 + 1, 2 + 0]
    updates = [([6.0, 0.0], 1.0), ([0.0, 3.0], 0.5), ([2.0, -2.0], 1.0)]
    results = feed(strategy, frozen(**PARAMS), updates, num_samples=[1, 4, 3])
    assert_array_equal(results[2]["w"], [2.0, 2.0])


def test_fedbuff_without_weight_by_samples_ignores_num_samples() -> None:
    strategy = FedBuff(buffer_size=3, server_lr=1.0, weight_by_samples=False, normalizer="weight_sum")
    results = feed(strategy, frozen(**PARAMS), UPDATES, num_samples=[1, 100, 1000])
    assert_array_equal(results[2]["w"], [2.5, 2.5])  # same as with n_i = 1


def test_fedbuff_buffer_resets_after_a_flush() -> None:
    strategy = FedBuff(buffer_size=3, server_lr=3.0, weight_by_samples=False, normalizer="count")
    first = feed(strategy, frozen(**PARAMS), UPDATES)[2]
    assert_array_equal(first["w"], [4.0, 3.0])
    first["w"].flags.writeable = False
    # Second buffer, on the new model [4, 3]; weights 1 each:
    #   sum(d_i) = [3, 0] + [0, -3] + [0, 0] = [3, -3];  x + 3 * [3, -3] / 3 = [7, 0]
    # A buffer that kept the first round's sums would give [10, 1].
    second = feed(strategy, first, [([3.0, 0.0], 1.0), ([0.0, -3.0], 1.0), ([0.0, 0.0], 1.0)])
    assert second[:2] == [None, None]
    assert_array_equal(second[2]["w"], [7.0, 0.0])


def test_fedbuff_weight_sum_resets_after_a_flush() -> None:
    strategy = FedBuff(buffer_size=1, server_lr=1.0, weight_by_samples=False, normalizer="weight_sum")
    params = frozen(w=[0.0])
    # K = 1 with weight_sum: each flush moves by exactly its delta, whatever its weight.
    a = strategy.take(params, frozen(w=[2.0]), staleness_weight=0.25, num_samples=1, client_id="a")
    b = strategy.take(params, frozen(w=[2.0]), staleness_weight=0.25, num_samples=1, client_id="b")
    assert_array_equal(a["w"], [2.0])
    assert_array_equal(b["w"], [2.0])  # a stale weight_sum (0.5) would give [1.0]


def test_fedbuff_accumulates_in_float64() -> None:
    # float16 model. Above 2048 float16 values are 2 apart, so 2048 + 1 rounds back to
    # 2048: summed in float16, [2048] + [1] + [1] would stay 2048. In float64 it is 2050,
    # which float16 holds exactly.
    strategy = FedBuff(buffer_size=3, server_lr=3.0, weight_by_samples=False, normalizer="count")
    params = {"w": np.array([0.0], dtype=np.float16)}
    params["w"].flags.writeable = False
    results = []
    for value in (2048.0, 1.0, 1.0):
        delta = np.array([value], dtype=np.float16)
        delta.flags.writeable = False
        results.append(strategy.take(params, {"w": delta}, staleness_weight=1.0, num_samples=1, client_id="c"))
    out = results[2]
    # x + 3 * 2050 / 3
    assert out["w"].dtype == np.float16
    assert_array_equal(out["w"], [2050.0])


def test_fedbuff_does_not_mutate_inputs() -> None:
    strategy = FedBuff(buffer_size=2, server_lr=1.0, weight_by_samples=False, normalizer="count")
    params = frozen(w=[1.0, 2.0], b=[3.0])
    deltas = [frozen(w=[1.0, 1.0], b=[1.0]), frozen(w=[2.0, 2.0], b=[2.0])]
    before_p = copies(params)
    before_d = [copies(d) for d in deltas]
    assert strategy.take(params, deltas[0], staleness_weight=0.5, num_samples=1, client_id="a") is None
    out = strategy.take(params, deltas[1], staleness_weight=0.5, num_samples=1, client_id="b")
    assert_unchanged(params, before_p)
    for delta, before in zip(deltas, before_d):
        assert_unchanged(delta, before)
    # x + (0.5*[1,1] + 0.5*[2,2]) / 2 = x + [0.75, 0.75];  b: 3 + (0.5 + 1) / 2
    assert_array_equal(out["w"], [1.75, 2.75])
    assert_array_equal(out["b"], [3.75])


# -- FedAvg -------------------------------------------------------------------


def test_fedavg_is_synchronous() -> None:
    assert FedAvg(clients_per_round=2, server_lr=1.0).synchronous is True


def test_fedavg_sample_weighted_mean_closes_at_clients_per_round() -> None:
    strategy = FedAvg(clients_per_round=3, server_lr=1.0)
    params = frozen(w=[0.0, 10.0])
    # sum(n_i d_i) = 1*[3, 0] + 2*[0, 3] + 3*[1, 1] = [6, 9];  sum(n_i) = 6
    # x + [6, 9] / 6 = [0 + 1, 10 + 1.5]
    pushes = [("a", 1, [3.0, 0.0]), ("b", 2, [0.0, 3.0]), ("c", 3, [1.0, 1.0])]
    results = []
    for client, n, delta in pushes:
        strategy.admit(client, base_version=0, version=0)
        results.append(strategy.take(params, frozen(w=delta), staleness_weight=1.0, num_samples=n, client_id=client))
    assert results[0] is None and results[1] is None
    assert_array_equal(results[2]["w"], [1.0, 11.5])
    assert strategy.pending == 0


def test_fedavg_server_lr_scales_the_step() -> None:
    strategy = FedAvg(clients_per_round=2, server_lr=2.0)
    params = frozen(w=[1.0])
    # (1*[4] + 3*[0]) / 4 = [1];  x + 2 * [1] = [3]
    assert strategy.take(params, frozen(w=[4.0]), staleness_weight=1.0, num_samples=1, client_id="a") is None
    out = strategy.take(params, frozen(w=[0.0]), staleness_weight=1.0, num_samples=3, client_id="b")
    assert_array_equal(out["w"], [3.0])


def test_fedavg_ignores_staleness_weight() -> None:
    strategy = FedAvg(clients_per_round=2, server_lr=1.0)
    params = frozen(w=[0.0])
    assert strategy.take(params, frozen(w=[2.0]), staleness_weight=0.1, num_samples=1, client_id="a") is None
    out = strategy.take(params, frozen(w=[4.0]), staleness_weight=0.9, num_samples=1, client_id="b")
    assert_array_equal(out["w"], [3.0])  # (2 + 4) / 2


@pytest.mark.parametrize(("base", "version"), [(0, 1), (3, 5)])
def test_fedavg_refuses_updates_for_a_closed_round(base: int, version: int) -> None:
    strategy = FedAvg(clients_per_round=2, server_lr=1.0)
    with pytest.raises(RoundClosed, match=f"round {base} closed"):
        strategy.admit("a", base_version=base, version=version)


def test_fedavg_refuses_a_second_push_by_the_same_client_in_one_round() -> None:
    strategy = FedAvg(clients_per_round=3, server_lr=1.0)
    params = frozen(w=[0.0])
    strategy.admit("a", base_version=0, version=0)
    assert strategy.take(params, frozen(w=[1.0]), staleness_weight=1.0, num_samples=1, client_id="a") is None
    with pytest.raises(PreconditionFailed, match="'a' already pushed") as info:
        strategy.admit("a", base_version=0, version=0)
    assert not isinstance(info.value, RoundClosed)
    strategy.admit("b", base_version=0, version=0)  # another client is still welcome
    assert strategy.pending == 1


def test_fedavg_round_resets_contributors_and_sums() -> None:
    strategy = FedAvg(clients_per_round=2, server_lr=1.0)
    params = frozen(w=[0.0])
    for client, delta in (("a", [2.0]), ("b", [4.0])):
        strategy.admit(client, base_version=0, version=0)
        out = strategy.take(params, frozen(w=delta), staleness_weight=1.0, num_samples=1, client_id=client)
    assert_array_equal(out["w"], [3.0])
    out["w"].flags.writeable = False
    # Round 1: "a" may push again; the new mean is over round 1's deltas only.
    strategy.admit("a", base_version=1, version=1)
    assert strategy.take(out, frozen(w=[10.0]), staleness_weight=1.0, num_samples=1, client_id="a") is None
    strategy.admit("b", base_version=1, version=1)
    second = strategy.take(out, frozen(w=[20.0]), staleness_weight=1.0, num_samples=1, client_id="b")
    assert_array_equal(second["w"], [18.0])  # 3 + (10 + 20) / 2


def test_fedavg_does_not_mutate_inputs() -> None:
    strategy = FedAvg(clients_per_round=2, server_lr=1.0)
    params = frozen(w=[1.0, 1.0])
    deltas = [frozen(w=[1.0, 2.0]), frozen(w=[3.0, 4.0])]
    before_p = copies(params)
    before_d = [copies(d) for d in deltas]
    strategy.take(params, deltas[0], staleness_weight=1.0, num_samples=1, client_id="a")
    out = strategy.take(params, deltas[1], staleness_weight=1.0, num_samples=1, client_id="b")
    assert_unchanged(params, before_p)
    for delta, before in zip(deltas, before_d):
        assert_unchanged(delta, before)
    assert_array_equal(out["w"], [3.0, 4.0])  # 1 + [2, 3]


# -- build_strategy -----------------------------------------------------------


def test_build_strategy_binds_config_parameters() -> None:
    fedasync = build_strategy(StrategyConfig(name="fedasync", alpha=0.3))
    assert isinstance(fedasync, FedAsync) and fedasync.alpha == 0.3

    fedbuff = build_strategy(StrategyConfig(name="fedbuff", buffer_size=7, server_lr=0.5, weight_by_samples=True, normalizer="weight_sum"))
    assert isinstance(fedbuff, FedBuff)
    assert (fedbuff.buffer_size, fedbuff.server_lr, fedbuff.weight_by_samples, fedbuff.normalizer) == (7, 0.5, True, "weight_sum")

    fedavg = build_strategy(StrategyConfig(name="fedavg", clients_per_round=5, server_lr=2.0))
    assert isinstance(fedavg, FedAvg)
    assert (fedavg.clients_per_round, fedavg.server_lr) == (5, 2.0)


def test_fedbuff_blocked_accumulation_is_exact_on_large_tensors() -> None:
    """Tensors larger than the accumulator's block, weights other than 1: the
    result equals the float64 formula computed on whole arrays."""
    from server.strategies import FedBuff

    rng = np.random.default_rng(5)
    x = {"w": rng.standard_normal(200_003).astype(np.float32), "b": rng.standard_normal((3, 7)).astype(np.float32)}
    deltas = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in x.items()} for _ in range(3)]
    weights = [0.7, 1.0, 0.3]
    strategy = FedBuff(buffer_size=3, server_lr=0.9, weight_by_samples=False, normalizer="count")
    result = None
    for delta, weight in zip(deltas, weights):
        result = strategy.take(x, delta, staleness_weight=weight, num_samples=1, client_id="c")
    assert result is not None
    for name, base in x.items():
        sums = np.float64(weights[0]) * deltas[0][name].astype(np.float64)
        for delta, weight in zip(deltas[1:], weights[1:]):
            sums = sums + np.float64(weight) * delta[name].astype(np.float64)
        expected = (base.astype(np.float64) + (0.9 / 3) * sums).astype(np.float32)
        np.testing.assert_array_equal(result[name], expected)
