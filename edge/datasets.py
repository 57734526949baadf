"""Federated data sets for simulation, generated or loaded locally (no download),
and the small models that train on them.

- `digits_dirichlet`: scikit-learn's 8x8 digits as 64 features, the training
  set split among clients with Dirichlet(alpha) label skew
  (`edge.tasks.dirichlet_shards`), a stratified held-out test set.
- `synthetic`: Synthetic(alpha, beta) of the FedProx paper (Li et al. 2020,
  "Federated Optimization in Heterogeneous Networks", sec. 5.1 and its
  generator): per device k, u_k ~ N(0, alpha), W_k ~ N(u_k, 1) (10 x 60),
  b_k ~ N(u_k, 1); B_k ~ N(0, beta), v_k ~ N(B_k, 1) (60); x ~ N(v_k, Sigma),
  Sigma diagonal with Sigma_jj = j^-1.2; y = argmax softmax(W_k x + b_k).
  alpha sets how much the devices' models differ, beta how much their inputs
  do. Sample counts follow a power law (log-normal(4, 2) + 50, as the paper's
  generator draws them, capped by `max_samples`); each device keeps 80% for
  training and 20% goes to the shared test set.

Models are deliberately small (logistic regression, a one-hidden-layer MLP):
in a simulation, compute should cost next to nothing so that the emulated
device delays decide the wall time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edge.tasks import dirichlet_shards, load_digits_split

DATASETS = ("digits", "synthetic")
MODELS = ("logistic", "mlp")
SYNTHETIC_FEATURES = 60
SYNTHETIC_CLASSES = 10


@dataclass(frozen=True)
class Shard:
    x: np.ndarray  # float32 (n, features)
    y: np.ndarray  # int64 (n,)


@dataclass(frozen=True)
class FederatedDataset:
    name: str
    shards: tuple[Shard, ...]
    x_test: np.ndarray
    y_test: np.ndarray
    num_features: int
    num_classes: int

    def describe(self) -> dict[str, object]:
        sizes = np.array([len(s.y) for s in self.shards])
        return {
            "name": self.name,
            "clients": len(self.shards),
            "train_examples": int(sizes.sum()),
            "test_examples": len(self.y_test),
            "shard_size": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        }


def digits_dirichlet(num_clients: int, alpha: float = 0.5, seed: int = 0, *, min_size: int = 10) -> FederatedDataset:
    """Digits split over `num_clients` with Dirichlet(`alpha`) label skew; each
    client gets at least `min_size` examples (1,437 training examples in all)."""
    split = load_digits_split(seed)
    shards = dirichlet_shards(split.y_train, num_clients, alpha, seed, min_size=min_size)
    x_train = split.x_train.reshape(len(split.x_train), -1)
    return FederatedDataset(
        name=f"digits(dirichlet alpha={alpha:g})",
        shards=tuple(Shard(x_train[idx], split.y_train[idx]) for idx in shards),
        x_test=split.x_test.reshape(len(split.x_test), -1),
        y_test=split.y_test,
        num_features=64,
        num_classes=10,
    )


def synthetic(
    num_clients: int,
    alpha: float = 1.0,
    beta: float = 1.0,
    seed: int = 0,
    *,
    max_samples: int = 1000,
    iid: bool = False,
) -> FederatedDataset:
    """Synthetic(alpha, beta) over `num_clients` devices. `iid=True` gives the
    paper's Synthetic-IID instead (one W, b and v for every device, Sigma as above)."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    if max_samples < 60:
        raise ValueError(f"max_samples must be >= 60 (every device draws at least 50 examples), got {max_samples}")
    rng = np.random.default_rng([seed, 0x5A7])
    d, c = SYNTHETIC_FEATURES, SYNTHETIC_CLASSES
    sigma_diag = np.arange(1, d + 1, dtype=np.float64) ** -1.2
    counts = np.minimum(rng.lognormal(4, 2, num_clients).astype(int) + 50, max_samples)
    shared_w, shared_b = rng.normal(0, 1, (c, d)), rng.normal(0, 1, c)
    shards, tests_x, tests_y = [], [], []
    for k in range(num_clients):
        if iid:
            w, b, v = shared_w, shared_b, np.zeros(d)
        else:
            u = rng.normal(0, alpha)
            w, b = rng.normal(u, 1, (c, d)), rng.normal(u, 1, c)
            v = rng.normal(rng.normal(0, beta), 1, d)
        x = rng.normal(v, np.sqrt(sigma_diag), (counts[k], d))
        y = np.argmax(x @ w.T + b, axis=1)  # softmax is monotone: its argmax is the logits' argmax
        cut = int(0.8 * counts[k])
        shards.append(Shard(x[:cut].astype(np.float32), y[:cut].astype(np.int64)))
        tests_x.append(x[cut:])
        tests_y.append(y[cut:])
    return FederatedDataset(
        name=f"synthetic({alpha:g},{beta:g})" if not iid else "synthetic(iid)",
        shards=tuple(shards),
        x_test=np.concatenate(tests_x).astype(np.float32),
        y_test=np.concatenate(tests_y).astype(np.int64),
        num_features=d,
        num_classes=c,
    )


def build_model(kind: str, num_features: int, num_classes: int, *, hidden: int = 32, seed: int = 0) -> nn.Module:
    """`logistic`: one linear layer (multinomial logistic regression, FedProx's
    model for Synthetic); `mlp`: one hidden ReLU layer of `hidden` units."""
    if kind not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {kind!r}")
    torch.manual_seed(seed)
    if kind == "logistic":
        return nn.Linear(num_features, num_classes)
    return nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy of `model` on (x, y)."""
    model.eval()
    predictions = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((predictions == y).mean())
