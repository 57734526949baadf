"""Staleness functions s(tau) of Xie, Koyejo and Gupta (2019), "Asynchronous
Federated Optimization": how much an update computed `tau` versions ago counts.

Plain functions; `StalenessConfig.function()` binds their parameters.
"""

from __future__ import annotations


def constant(tau: int) -> float:
    """s(tau) = 1: every update counts fully, however old."""
    return 1.0


def polynomial(tau: int, a: float) -> float:
    """s(tau) = (1 + tau)^-a. a = 0.5 is FedBuff's 1/sqrt(1 + tau)."""
    return float((1.0 + tau) ** (-a))


def hinge(tau: int, a: float, b: float) -> float:
    """s(tau) = 1 while tau <= b, then 1 / (a (tau - b) + 1)."""
    if tau <= b:
        return 1.0
    return 1.0 / (a * (tau - b) + 1.0)
