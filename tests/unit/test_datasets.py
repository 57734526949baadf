"""Federated data sets: seeded partitions, FedProx Synthetic's shape, the small models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge.datasets import build_model, digits_dirichlet, evaluate, synthetic


def test_digits_dirichlet_partitions_the_training_set() -> None:
    data = digits_dirichlet(20, alpha=0.3, seed=1)
    assert len(data.shards) == 20 and data.num_features == 64
    assert sum(len(s.y) for s in data.shards) == 1437 and len(data.y_test) == 360
    assert all(s.x.shape[1] == 64 and s.x.dtype == np.float32 for s in data.shards)
    # label skew: most shards miss some classes at alpha 0.3
    assert np.mean([len(np.unique(s.y)) < 10 for s in data.shards]) > 0.5
    again = digits_dirichlet(20, alpha=0.3, seed=1)
    assert all(np.array_equal(a.y, b.y) for a, b in zip(data.shards, again.shards, strict=True))


def test_synthetic_is_seeded_and_shaped_like_fedprox() -> None:
    data = synthetic(30, alpha=1.0, beta=1.0, seed=0)
    again = synthetic(30, alpha=1.0, beta=1.0, seed=0)
    other = synthetic(30, alpha=1.0, beta=1.0, seed=1)
    assert data.num_features == 60 and data.num_classes == 10
    assert all(np.array_equal(a.x, b.x) for a, b in zip(data.shards, again.shards, strict=True))
    assert not np.array_equal(data.shards[0].x, other.shards[0].x)
    sizes = np.array([len(s.y) for s in data.shards])
    assert sizes.min() >= 40 and sizes.max() <= 800  # 80% of [50, max_samples=1000]
    assert sizes.max() > 3 * np.median(sizes)  # power law: a few devices hold much more
    total = sum(len(s.y) for s in data.shards) + len(data.y_test)
    assert 0.15 < len(data.y_test) / total < 0.25
    # the devices' input distributions differ (beta): their means are far apart
    means = np.array([s.x.mean(axis=0) for s in data.shards])
    assert means.std(axis=0).mean() > 0.5
    iid = synthetic(30, seed=0, iid=True)
    assert np.array([s.x.mean(axis=0) for s in iid.shards]).std(axis=0).mean() < 0.3


def test_synthetic_errors() -> None:
    with pytest.raises(ValueError, match="num_clients must be >= 1"):
        synthetic(0)
    with pytest.raises(ValueError, match="alpha and beta must be >= 0"):
        synthetic(3, alpha=-1)


def test_models_learn_the_digits() -> None:
    data = digits_dirichlet(1, seed=0)
    for kind in ("logistic", "mlp"):
        model = build_model(kind, 64, 10, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        x, y = torch.from_numpy(data.shards[0].x), torch.from_numpy(data.shards[0].y)
        for _ in range(100):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        assert evaluate(model, data.x_test, data.y_test) > 0.85
    with pytest.raises(ValueError, match="model must be one of logistic, mlp"):
        build_model("cnn", 64, 10)
