"""t-of-n Shamir sharing of 32-byte secrets over GF(2^521 - 1).

A cohort member shares its self-mask seed and its mask-agreement private key
so that any `threshold` survivors can remove the masks of a member that
dropped out (or its self-mask, if it survived), while fewer learn nothing.

This is plain polynomial arithmetic over a prime field; the only randomness
is the polynomial's coefficients, drawn from `secrets`. The field is the
Mersenne prime 2^521 - 1 because it is larger than any 32-byte secret, so a
secret is the polynomial's constant term as is, with no reduction.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PRIME", "SECRET_BYTES", "Share", "combine", "split"]

PRIME = 2**521 - 1
SECRET_BYTES = 32

_INDEX_BYTES = 2
_VALUE_BYTES = (PRIME.bit_length() + 7) // 8  # 66
_SHARE_BYTES = _INDEX_BYTES + _VALUE_BYTES


@dataclass(frozen=True)
class Share:
    """One point (index, value) of the sharing polynomial.

    The index is the x coordinate and is never 0: the polynomial's value at 0
    is the secret itself.
    """

    index: int
    value: int

    def __post_init__(self) -> None:
        if not 0 < self.index < PRIME:
            raise ValueError(f"share index must be in [1, PRIME), got {self.index}")
        if not 0 <= self.value < PRIME:
            raise ValueError("share value must be in [0, PRIME)")

    def to_bytes(self) -> bytes:
        """Fixed-length encoding (2-byte index, 66-byte value, both big-endian).

        Fixed length so that a sealed share reveals nothing through its size
        and the wire format needs no framing. Indices above 65535 cannot be
        encoded (cohorts are far smaller).
        """
        if self.index >= 1 << (8 * _INDEX_BYTES):
            raise ValueError(f"share index {self.index} does not fit in {_INDEX_BYTES} bytes")
        return self.index.to_bytes(_INDEX_BYTES, "big") + self.value.to_bytes(_VALUE_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Inverse of `to_bytes`; ValueError on a wrong length or an index/value out of range."""
        if len(data) != _SHARE_BYTES:
            raise ValueError(f"a share is {_SHARE_BYTES} bytes, got {len(data)}")
        index = int.from_bytes(data[:_INDEX_BYTES], "big")
        value = int.from_bytes(data[_INDEX_BYTES:], "big")
        return cls(index, value)  # __post_init__ rejects index 0 and value >= PRIME


def split(secret: bytes, *, threshold: int, indices: Sequence[int]) -> list[Share]:
    """Share `secret` so that any `threshold` of the returned shares recover it.

    The polynomial has degree threshold - 1, constant term the secret, and the
    other coefficients uniform in the field; one share per entry of `indices`
    (the members' x coordinates), in that order.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(indices):
        raise ValueError(f"threshold must be in [1, {len(indices)}], got {threshold}")
    if len(set(indices)) != len(indices):
        raise ValueError("share indices must be unique")
    if any(not 0 < x < PRIME for x in indices):
        raise ValueError("share indices must be in [1, PRIME)")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coefficients, x)) for x in indices]


def combine(shares: Sequence[Share], *, threshold: int) -> bytes:
    """Recover the 32-byte secret from the first `threshold` shares.

    Exactly `threshold` shares are interpolated (the rest are ignored), so the
    result does not depend on how many extra shares a caller happens to pass.
    A randomly corrupted share moves the interpolated constant to a uniform
    field element, which almost surely exceeds 32 bytes and is reported as
    inconsistent. This is a sanity check, not authentication: a deliberate
    small offset shifts the secret by a small amount and goes unnoticed, so
    shares must be authenticated (sealing does that) before they get here.
    """
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1, got {threshold}")
    if len(shares) < threshold:
        raise ValueError(f"need at least {threshold} shares to recover the secret, got {len(shares)}")
    if len({share.index for share in shares}) != len(shares):
        raise ValueError("duplicate share indices")
    points = shares[:threshold]
    secret = 0
    for i, share in enumerate(points):
        # Lagrange basis polynomial for this point, evaluated at x = 0.
        numerator, denominator = 1, 1
        for j, other in enumerate(points):
            if j != i:
                numerator = numerator * other.index % PRIME
                denominator = denominator * (other.index - share.index) % PRIME
        secret = (secret + share.value * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ValueError("shares are inconsistent")
    return secret.to_bytes(SECRET_BYTES, "big")


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """Horner evaluation mod PRIME; coefficients are lowest degree first."""
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result
