"""The digits task's pieces for client-side (federated) evaluation:
`hold_out` (the held-out split of a shard) and `make_evaluate_fn`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge.tasks import DigitsCNN, build_model, digits_evaluator, hold_out, initial_weights, load_digits_split, make_evaluate_fn


def test_hold_out_is_seeded_disjoint_and_covers_the_shard() -> None:
    kept, held = hold_out(100, 0.2, seed=3)
    assert len(held) == 20 and len(kept) == 80
    assert sorted([*kept.tolist(), *held.tolist()]) == list(range(100))
    again_kept, again_held = hold_out(100, 0.2, seed=3)
    assert np.array_equal(kept, again_kept) and np.array_equal(held, again_held)
    assert not np.array_equal(held, hold_out(100, 0.2, seed=4)[1])


def test_hold_out_keeps_at_least_one_example_each_side() -> None:
    kept, held = hold_out(10, 0.01, seed=0)
    assert len(held) == 1 and len(kept) == 9
    with pytest.raises(ValueError, match="2 example\\(s\\) are too few to hold out 0.9"):
        hold_out(2, 0.9, seed=0)
    with pytest.raises(ValueError, match="too few"):
        hold_out(1, 0.5, seed=0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_hold_out_refuses_a_fraction_outside_zero_one(fraction: float) -> None:
    with pytest.raises(ValueError, match="held-out fraction must be in \\(0, 1\\)"):
        hold_out(100, fraction, seed=0)


def test_evaluate_fn_reports_the_held_out_count_accuracy_and_loss() -> None:
    split = load_digits_split(0)
    evaluate = make_evaluate_fn(split.x_test, split.y_test)
    model = build_model(0)
    num_examples, metrics = evaluate(model)
    assert num_examples == len(split.y_test)
    assert set(metrics) == {"accuracy", "loss"}
    # the same numbers as the server-side evaluator on the same model and data
    expected = digits_evaluator(initial_weights(0))
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"])
    assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_evaluate_fn_accuracy_follows_the_model() -> None:
    """A model that always answers class 3 is right exactly on the 3s."""
    x = np.zeros((6, 1, 8, 8), dtype=np.float32)
    y = np.array([3, 3, 1, 2, 3, 0], dtype=np.int64)
    model = DigitsCNN()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.classifier[-1].bias[3] = 5.0
    num_examples, metrics = make_evaluate_fn(x, y)(model)
    assert num_examples == 6
    assert metrics["accuracy"] == pytest.approx(0.5)
    right = -math.log(math.exp(5) / (math.exp(5) + 9))
    wrong = -math.log(1 / (math.exp(5) + 9))
    assert metrics["loss"] == pytest.approx((3 * right + 3 * wrong) / 6, rel=1e-5)
