"""Shamir sharing over GF(2^521 - 1): properties (no standard known-answer test exists)."""

from __future__ import annotations

import random
import secrets

import pytest

from proto.secagg.shamir import PRIME, SECRET_BYTES, Share, combine, split

SHARE_BYTES = 2 + 66


def forge_share(points: list[Share], target: bytes, index: int) -> Share:
    """The share at `index` of the unique degree-t-1 polynomial through (0, target)
    and the t-1 given points: Lagrange interpolation written out independently."""
    xs = [0] + [p.index for p in points]
    ys = [int.from_bytes(target, "big")] + [p.value for p in points]
    value = 0
    for i, (xi, yi) in enumerate(zip(xs, ys)):
        term = yi
        for j, xj in enumerate(xs):
            if j != i:
                term = term * (index - xj) * pow(xi - xj, -1, PRIME) % PRIME
        value = (value + term) % PRIME
    return Share(index, value)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 20])
def test_any_threshold_subset_recovers_the_secret(n: int) -> None:
    rng = random.Random(n)
    for threshold in range(1, n + 1):
        secret = secrets.token_bytes(SECRET_BYTES)
        shares = split(secret, threshold=threshold, indices=range(1, n + 1))
        assert [s.index for s in shares] == list(range(1, n + 1))
        for _ in range(4):
            subset = rng.sample(shares, rng.randint(threshold, n))
            assert combine(subset, threshold=threshold) == secret


@pytest.mark.parametrize("secret", [bytes(32), b"\xff" * 32, b"\x00" * 31 + b"\x01", b"\x00\x00" + b"\x7f" * 30])
def test_edge_secrets_keep_all_32_bytes(secret: bytes) -> None:
    shares = split(secret, threshold=3, indices=[4, 9, 17, 30])
    assert combine(shares[1:], threshold=3) == secret


def test_non_contiguous_indices_work() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, threshold=2, indices=[65535, 7, 1000])
    assert combine([shares[2], shares[0]], threshold=2) == secret


def test_threshold_one_shares_are_the_secret_itself() -> None:
    """Degree 0: every share's value is the secret (a documented, expected property)."""
    secret = secrets.token_bytes(32)
    for share in split(secret, threshold=1, indices=[1, 2, 3]):
        assert share.value == int.from_bytes(secret, "big")


def test_fewer_than_threshold_shares_raise() -> None:
    shares = split(secrets.token_bytes(32), threshold=4, indices=range(1, 7))
    with pytest.raises(ValueError, match="need at least 4 shares"):
        combine(shares[:3], threshold=4)
    with pytest.raises(ValueError, match="need at least"):
        combine([], threshold=1)


def test_threshold_minus_one_shares_are_consistent_with_any_secret() -> None:
    """For t-1 real shares and ANY other secret there is a degree t-1 polynomial
    through both: the forged t-th share makes combine return that other secret,
    so t-1 shares cannot tell the real secret from any other."""
    secret = secrets.token_bytes(32)
    threshold = 5
    shares = split(secret, threshold=threshold, indices=range(1, 9))
    known = shares[: threshold - 1]
    for _ in range(5):
        other = secrets.token_bytes(32)
        forged = forge_share(known, other, index=8)
        assert forged != shares[7]
        assert combine([*known, forged], threshold=threshold) == other
    # and the honest t-th share gives the real secret through the same t-1 shares
    assert combine([*known, shares[7]], threshold=threshold) == secret


def test_a_randomly_corrupted_share_is_reported_as_inconsistent() -> None:
    """A uniformly random wrong value moves the constant term to a uniform field
    element, which fits in 32 bytes with probability about 2^-265."""
    shares = split(secrets.token_bytes(32), threshold=3, indices=[1, 2, 3])
    bad = Share(shares[1].index, secrets.randbelow(PRIME))
    with pytest.raises(ValueError, match="shares are inconsistent"):
        combine([shares[0], bad, shares[2]], threshold=3)


def test_a_small_deliberate_offset_is_not_detected() -> None:
    """The size check is a sanity check, not authentication: adding e to share i
    adds e times its Lagrange coefficient at 0 (here -3 for x = 2 of {1, 2, 3}),
    which still fits in 32 bytes. Shares are authenticated by sealing instead."""
    secret = (1000).to_bytes(32, "big")
    shares = split(secret, threshold=3, indices=[1, 2, 3])
    bad = Share(2, (shares[1].value + 1) % PRIME)
    assert combine([shares[0], bad, shares[2]], threshold=3) == (997).to_bytes(32, "big")


def test_combine_uses_exactly_the_first_threshold_shares() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, threshold=3, indices=[1, 2, 3, 4])
    garbage = Share(4, (shares[3].value + 1) % PRIME)
    assert combine([*shares[:3], garbage], threshold=3) == secret


def test_duplicate_indices_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        split(secrets.token_bytes(32), threshold=2, indices=[1, 2, 2])
    shares = split(secrets.token_bytes(32), threshold=2, indices=[1, 2, 3])
    with pytest.raises(ValueError, match="duplicate"):
        combine([shares[0], shares[0]], threshold=2)
    with pytest.raises(ValueError, match="duplicate"):  # also beyond the first threshold shares
        combine([shares[0], shares[1], shares[0]], threshold=2)
    with pytest.raises(ValueError, match="duplicate"):  # same index, different value
        combine([shares[0], Share(1, (shares[0].value + 1) % PRIME)], threshold=2)


@pytest.mark.parametrize("indices", [[0, 1, 2], [-1, 1, 2], [1, 2, PRIME], [1, PRIME + 1, 2]])
def test_index_zero_negative_or_outside_the_field_is_refused(indices: list[int]) -> None:
    with pytest.raises(ValueError, match="indices"):
        split(secrets.token_bytes(32), threshold=2, indices=indices)


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_secret_must_be_32_bytes(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        split(bytes(length), threshold=1, indices=[1])


@pytest.mark.parametrize("threshold", [-1, 0, 4])
def test_threshold_outside_one_to_n_is_refused(threshold: int) -> None:
    with pytest.raises(ValueError, match="threshold"):
        split(secrets.token_bytes(32), threshold=threshold, indices=[1, 2, 3])


def test_combine_refuses_a_threshold_below_one() -> None:
    shares = split(secrets.token_bytes(32), threshold=1, indices=[1])
    with pytest.raises(ValueError, match="threshold"):
        combine(shares, threshold=0)


def test_share_construction_checks_ranges() -> None:
    with pytest.raises(ValueError):
        Share(0, 5)
    with pytest.raises(ValueError):
        Share(1, PRIME)
    with pytest.raises(ValueError):
        Share(1, -1)


def test_share_bytes_round_trip_at_fixed_length() -> None:
    for share in split(secrets.token_bytes(32), threshold=3, indices=[1, 2, 300, 65535]):
        data = share.to_bytes()
        assert len(data) == SHARE_BYTES
        assert Share.from_bytes(data) == share
    extreme = Share(65535, PRIME - 1)
    assert Share.from_bytes(extreme.to_bytes()) == extreme
    assert Share(1, 0).to_bytes() == b"\x00\x01" + bytes(66)


def test_share_encoding_is_big_endian() -> None:
    assert Share(0x0102, 0x0304).to_bytes() == b"\x01\x02" + bytes(64) + b"\x03\x04"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(SHARE_BYTES - 1),
        bytes(SHARE_BYTES + 1),
        bytes(SHARE_BYTES),  # index 0
        b"\x00\x01" + PRIME.to_bytes(66, "big"),  # value == PRIME
        b"\x00\x01" + b"\xff" * 66,  # value > PRIME
    ],
)
def test_share_from_bytes_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ValueError):
        Share.from_bytes(data)


def test_share_index_too_large_to_encode_raises() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        Share(65536, 1).to_bytes()


def test_two_hundred_shares_threshold_one_hundred() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, threshold=100, indices=range(1, 201))
    assert combine(shares[100:], threshold=100) == secret
    assert combine(random.Random(0).sample(shares, 100), threshold=100) == secret
    with pytest.raises(ValueError, match="need at least"):
        combine(shares[:99], threshold=100)


def test_splitting_is_randomized() -> None:
    secret = secrets.token_bytes(32)
    first = split(secret, threshold=2, indices=[1, 2])
    second = split(secret, threshold=2, indices=[1, 2])
    assert first != second
