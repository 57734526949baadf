"""Built-in task: handwritten digits (scikit-learn's bundled 8x8 digits, no
download) with a small CNN, non-IID client shards and emulated slow devices.

Used by `tributary client --task digits` and `tributary demo`; everything is
seeded, so the same seed gives the same split, shards and initial model.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from client_sdk import EvaluateFn, TrainFn


@dataclass(frozen=True)
class DigitsSplit:
    x_train: np.ndarray  # float32, (n, 1, 8, 8), scaled to [0, 1]
    y_train: np.ndarray  # int64, (n,)
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> DigitsSplit:
    """A stratified train/test split of the 1,797 digits (the test set stays on
    whoever evaluates; clients only see their shard of the train set)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return DigitsSplit(x_train, y_train, x_test, y_test)


def dirichlet_shards(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 10) -> list[np.ndarray]:
    """Label-skewed shards: for each class, split its examples among clients in
    proportions drawn from Dirichlet(alpha) (small alpha: each client sees few
    classes). Redraws until every client has at least `min_size` examples."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if len(labels) < num_clients * min_size:
        raise ValueError(f"{len(labels)} examples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(members)).astype(int)[:-1]
            for client, part in enumerate(np.split(members, cuts)):
                shards[client].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shards]
    raise ValueError(f"could not draw {num_clients} shards of >= {min_size} examples with alpha={alpha}")


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, one pooling, two dense layers: 85,066 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits


def build_model(seed: int = 0) -> DigitsCNN:
    torch.manual_seed(seed)
    return DigitsCNN()


def initial_weights(seed: int = 0) -> dict[str, np.ndarray]:
    return {name: t.detach().numpy().copy() for name, t in build_model(seed).state_dict().items()}


def make_train_fn(
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.9,
    seed: int = 0,
    round_seconds: float = 0.0,
) -> TrainFn:
    """A `TrainFn` for the SDK's loop: `epochs` passes of SGD over (x, y);
    reports the mean training loss of the round.

    `round_seconds` pads each call to at least that long, emulating a device
    slower than this machine (the padding sleeps, so emulated devices do not
    steal CPU from each other). A fresh optimizer per round: momentum does not
    carry across model versions it was not computed on.
    """
    features = torch.from_numpy(x)
    targets = torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()

    def train(model: nn.Module, device: torch.device) -> tuple[int, dict[str, float]]:
        started = time.monotonic()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        loss_sum, batches = torch.zeros((), device=device), 0  # summed on the device: no sync per batch
        for _ in range(epochs):
            order = torch.randperm(len(features), generator=generator)
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                optimizer.zero_grad()
                loss = loss_fn(model(features[batch].to(device)), targets[batch].to(device))
                loss.backward()
                optimizer.step()
                loss_sum, batches = loss_sum + loss.detach(), batches + 1
        pad = round_seconds - (time.monotonic() - started)
        if pad > 0:
            time.sleep(pad)
        return len(features) * epochs, {"loss": float(loss_sum) / max(1, batches)}

    return train


def hold_out(size: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions 0..size-1 into (training, held-out) for federated
    evaluation: a seeded shuffle, `round(size * fraction)` held out but at
    least 1, and at least 1 left to train on (else ValueError)."""
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    held = max(1, round(size * fraction))
    if held >= size:
        raise ValueError(f"{size} example(s) are too few to hold out {fraction:g} of them and still train on the rest")
    order = np.random.default_rng(seed).permutation(size)
    return np.sort(order[held:]), np.sort(order[:held])


def make_evaluate_fn(x: np.ndarray, y: np.ndarray) -> EvaluateFn:
    """An `EvaluateFn` for the SDK's federated evaluation (`fit(evaluate_fn=...)`):
    accuracy and mean cross-entropy loss of the model on (x, y), computed on
    the device the model's parameters are on."""
    features = torch.from_numpy(x)
    targets = torch.from_numpy(y)

    def evaluate(model: nn.Module) -> tuple[int, dict[str, float]]:
        device = next(model.parameters()).device
        return len(targets), _accuracy_and_loss(model, features.to(device), targets.to(device))

    return evaluate


@torch.no_grad()
def _accuracy_and_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    logits = model(x)
    return {
        "accuracy": float((logits.argmax(dim=1) == y).float().mean()),
        "loss": float(nn.functional.cross_entropy(logits, y)),
    }


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    predictions = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((predictions == y).mean())


EVALUATION_SEED = 0
"""The split `digits_evaluator` holds out: the one `tributary client --task digits`
trains around with its default --seed 0 (clients with another seed would train
on some of these test examples)."""


@functools.lru_cache(maxsize=1)
def _held_out() -> tuple[torch.Tensor, torch.Tensor]:
    split = load_digits_split(EVALUATION_SEED)
    return torch.from_numpy(split.x_test), torch.from_numpy(split.y_test)


@torch.no_grad()
def digits_evaluator(tensors: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Server-side evaluator of the digits task (`evaluator = "edge.tasks:digits_evaluator"`):
    accuracy and mean cross-entropy loss of the DigitsCNN on the held-out test split."""
    x, y = _held_out()
    model = DigitsCNN()  # one per call (85k parameters): evaluators of several jobs may run at once
    model.load_state_dict({name: torch.from_numpy(np.array(value)) for name, value in tensors.items()})
    return _accuracy_and_loss(model, x, y)
