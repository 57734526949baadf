"""Fixed-point quantization into Z_2^bits: the headroom check, clipping,
unbiased stochastic rounding, two's complement, and modular add/sub."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest

from proto.secagg.quantize import FixedPoint, add_mod, sub_mod

ALL_BITS = (8, 16, 32)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- construction -----------------------------------------------------------


@pytest.mark.parametrize("bits", [7, 33, 0, -1, True, 16.0, "16"])
def test_bits_outside_8_to_32_refused(bits: Any) -> None:
    with pytest.raises(ValueError, match="bits"):
        FixedPoint(bits=bits, scale=1.0, bound=1.0, max_summands=1)


@pytest.mark.parametrize("field", ["scale", "bound"])
@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, -math.inf, True, "1"])
def test_scale_and_bound_must_be_finite_positive(field: str, bad: Any) -> None:
    kwargs: dict[str, Any] = {"bits": 32, "scale": 1.0, "bound": 1.0, "max_summands": 1, field: bad}
    with pytest.raises(ValueError, match=field):
        FixedPoint(**kwargs)


@pytest.mark.parametrize("bad", [0, -3, 1.0, True])
def test_max_summands_must_be_positive_int(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_summands"):
        FixedPoint(bits=32, scale=1.0, bound=1.0, max_summands=bad)


def test_fields_are_normalised_so_equal_configs_are_equal() -> None:
    numpy_bits: Any = np.int64(16)
    numpy_bound: Any = np.float32(2.0)
    a = FixedPoint(bits=numpy_bits, scale=4, bound=numpy_bound, max_summands=3)
    b = FixedPoint(bits=16, scale=4.0, bound=2.0, max_summands=3)
    assert a == b and hash(a) == hash(b)
    assert type(a.bits) is int and type(a.scale) is float


def test_overflow_refused_with_the_headroom_computation() -> None:
    with pytest.raises(ValueError) as caught:
        FixedPoint(bits=32, scale=2.0**20, bound=2.0, max_summands=1100)
    message = str(caught.value)
    # 1100 x (ceil(2.0 x 2^20) + 1) = 1100 x 2097153 = 2306868300 > 2^31 - 1
    assert "1100 summands" in message and "2097153" in message and "2306868300" in message
    assert "exceeds 2^31 - 1" in message
    assert "lower scale, bound or max_summands" in message and "raise bits" in message


@pytest.mark.parametrize(
    "bits,max_summands",
    [(16, 1), (16, 7), (8, 3), (32, 1), (32, 100)],
)
def test_headroom_boundary_accepted_and_one_past_refused(bits: int, max_summands: int) -> None:
    per_value = ((1 << (bits - 1)) - 1) // max_summands  # largest ceil(bound*scale) + 1 allowed
    bound_at_edge = float(per_value - 1)  # with scale 1: ceil(bound) + 1 == per_value
    FixedPoint(bits=bits, scale=1.0, bound=bound_at_edge, max_summands=max_summands)
    with pytest.raises(ValueError, match="exceeds"):
        FixedPoint(bits=bits, scale=1.0, bound=bound_at_edge + 0.5, max_summands=max_summands)
    if max_summands > 1:
        # the same bound cannot take one more summand when the division was exact
        exact = per_value * max_summands == (1 << (bits - 1)) - 1
        if exact:
            with pytest.raises(ValueError, match="exceeds"):
                FixedPoint(bits=bits, scale=1.0, bound=bound_at_edge, max_summands=max_summands + 1)


def test_huge_scale_times_bound_refused_not_crashing() -> None:
    with pytest.raises(ValueError, match="scale"):
        FixedPoint(bits=32, scale=1e300, bound=1e300, max_summands=1)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("bound", [0.001, 0.37, 1.0, 3.0, 100.0])
@pytest.mark.parametrize("max_summands", [1, 5, 100])
def test_for_cohort_picks_the_largest_valid_power_of_two_scale(bits: int, bound: float, max_summands: int) -> None:
    try:
        fp = FixedPoint.for_cohort(bits=bits, bound=bound, max_summands=max_summands)
    except ValueError as error:
        assert "no scale >= 1" in str(error)
        with pytest.raises(ValueError):
            FixedPoint(bits=bits, scale=1.0, bound=bound, max_summands=max_summands)
        return
    assert fp.scale >= 1 and math.frexp(fp.scale)[0] == 0.5  # a power of two
    assert (fp.bits, fp.bound, fp.max_summands) == (bits, bound, max_summands)
    with pytest.raises(ValueError, match="exceeds"):
        FixedPoint(bits=bits, scale=fp.scale * 2, bound=bound, max_summands=max_summands)


def test_for_cohort_refuses_when_even_scale_one_overflows() -> None:
    with pytest.raises(ValueError, match="no scale >= 1.*raise bits"):
        FixedPoint.for_cohort(bits=8, bound=100.0, max_summands=10)


def test_for_cohort_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="bits"):
        FixedPoint.for_cohort(bits=40, bound=1.0, max_summands=1)
    with pytest.raises(ValueError, match="bound"):
        FixedPoint.for_cohort(bits=32, bound=-1.0, max_summands=1)
    with pytest.raises(ValueError, match="max_summands"):
        FixedPoint.for_cohort(bits=32, bound=1.0, max_summands=0)


def test_modulus_and_resolution() -> None:
    fp = FixedPoint(bits=20, scale=256.0, bound=1.0, max_summands=10)
    assert fp.modulus == 2**20
    assert fp.resolution == 1 / 256


# --- encode / decode ---------------------------------------------------------


@pytest.mark.parametrize("bits", ALL_BITS)
def test_encode_gives_uint32_ring_elements_of_the_same_shape(bits: int) -> None:
    fp = FixedPoint.for_cohort(bits=bits, bound=1.0, max_summands=3)
    values = rng().uniform(-2, 2, size=(7, 5)).astype(np.float32)
    encoded = fp.encode(values, rng(1))
    assert encoded.dtype == np.uint32 and encoded.shape == (7, 5)
    assert int(encoded.max()) < 2**bits


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grid_values_round_trip_exactly_including_negatives(bits: int, dtype: type) -> None:
    fp = FixedPoint.for_cohort(bits=bits, bound=2.0, max_summands=1)
    steps = np.array([-2.0, -1.5, -1.0, -fp.resolution, 0.0, fp.resolution, 0.25, 1.0, 2.0])
    values: np.ndarray = steps.astype(dtype)
    np.testing.assert_array_equal(fp.decode(fp.encode(values, rng())), values.astype(np.float64))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_negative_values_use_twos_complement(bits: int) -> None:
    fp = FixedPoint(bits=bits, scale=1.0, bound=3.0, max_summands=1)
    encoded = fp.encode(np.array([-1.0, -3.0]), rng())
    assert encoded.tolist() == [2**bits - 1, 2**bits - 3]


def test_values_beyond_bound_are_clipped() -> None:
    fp = FixedPoint.for_cohort(bits=32, bound=1.5, max_summands=10)
    values = np.array([-1e30, -7.0, -1.5000001, 1.5000001, 7.0, 3.4e38], dtype=np.float32)
    decoded = fp.decode(fp.encode(values, rng()))
    np.testing.assert_array_equal(decoded, [-1.5, -1.5, -1.5, 1.5, 1.5, 1.5])


@pytest.mark.parametrize("bound,scale", [(0.1, 4.0), (1000 - 1e-9, 1.0), (0.3, 2.0**20)])
def test_encodings_never_exceed_the_ceiling_the_headroom_check_assumed(bound: float, scale: float) -> None:
    # float32(bound) rounds up for each of these bounds; clipping must not go past `bound` itself
    fp = FixedPoint(bits=32, scale=scale, bound=bound, max_summands=10)
    values = np.concatenate([np.full(10_000, 5.0), np.full(10_000, -5.0)]).astype(np.float32)
    decoded = fp.decode(fp.encode(values, rng()))
    assert np.abs(decoded).max() <= math.ceil(bound * scale) / scale


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_inf_refused(bad: float, dtype: type) -> None:
    fp = FixedPoint.for_cohort(bits=32, bound=1.0, max_summands=10)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fp.encode(np.array([0.0, bad], dtype=dtype), rng())


@pytest.mark.parametrize("values", [np.array(["a"]), np.array([1j]), np.array([None])])
def test_non_real_input_refused(values: np.ndarray) -> None:
    fp = FixedPoint.for_cohort(bits=32, bound=1.0, max_summands=10)
    with pytest.raises(ValueError, match="real numeric"):
        fp.encode(values, rng())


def test_integer_input_and_scalars_and_empty_arrays() -> None:
    fp = FixedPoint(bits=16, scale=2.0, bound=100.0, max_summands=10)
    np.testing.assert_array_equal(fp.decode(fp.encode(np.array([-3, 0, 250]), rng())), [-3.0, 0.0, 100.0])
    scalar = fp.encode(np.asarray(1.5), rng())
    assert isinstance(scalar, np.ndarray) and scalar.shape == () and fp.decode(scalar) == 1.5
    assert fp.encode(np.zeros((0, 3), np.float32), rng()).shape == (0, 3)


def test_encode_is_reproducible_with_a_seeded_generator() -> None:
    fp = FixedPoint.for_cohort(bits=32, bound=1.0, max_summands=10)
    values = rng().standard_normal(1000).astype(np.float32)
    np.testing.assert_array_equal(fp.encode(values, rng(42)), fp.encode(values, rng(42)))
    assert not np.array_equal(fp.encode(values, rng(42)), fp.encode(values, rng(43)))


CONFIGS = [
    FixedPoint(bits=16, scale=64.0, bound=4.0, max_summands=10),  # float32 path
    FixedPoint.for_cohort(bits=32, bound=2.0, max_summands=10),  # bound * scale > 2^24: float64 path
    FixedPoint(bits=32, scale=1000.0, bound=2.0, max_summands=10),  # not a power of two: float64 path
]


@pytest.mark.parametrize("fp", CONFIGS, ids=lambda fp: f"bits{fp.bits}-scale{fp.scale:g}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("steps", [12.3, -12.3, 0.5, -0.5, 0.01, -0.97, 3.75])
def test_stochastic_rounding_is_unbiased(fp: FixedPoint, dtype: type, steps: float) -> None:
    n = 200_000
    values: np.ndarray = np.full(n, steps / fp.scale, dtype=dtype)
    exact = float(values[0])  # the value as stored in `dtype`
    decoded = fp.decode(fp.encode(values, rng(7)))
    # each encoding is one of the two neighbouring grid points ...
    floor = math.floor(exact * fp.scale)
    assert set(np.unique(decoded).tolist()) <= {floor / fp.scale, (floor + 1) / fp.scale}
    # ... the upper one with probability = the fractional part: mean within 6 standard errors
    p = exact * fp.scale - floor
    standard_error = math.sqrt(p * (1 - p) / n) * fp.resolution
    assert abs(decoded.mean() - exact) <= 6 * standard_error + 1e-9 * fp.resolution


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_decoded_sum_is_within_n_steps_of_the_clipped_sum(bits: int, dtype: type) -> None:
    n = 12
    fp = FixedPoint.for_cohort(bits=bits, bound=1.0, max_summands=n)
    generator = rng(3)
    updates: list[np.ndarray] = [generator.normal(0, 0.8, size=5000).astype(dtype) for _ in range(n)]
    total = np.zeros(5000, dtype=np.uint32)
    for update in updates:
        total = add_mod(total, fp.encode(update, generator), bits)
    clipped_sum = sum(np.clip(u.astype(np.float64), -1.0, 1.0) for u in updates)
    assert np.abs(fp.decode(total) - clipped_sum).max() <= n * fp.resolution


@pytest.mark.parametrize("bits", ALL_BITS)
def test_full_cohort_at_the_bound_does_not_overflow(bits: int) -> None:
    n = 5
    fp = FixedPoint.for_cohort(bits=bits, bound=1.0, max_summands=n)
    for sign in (1.0, -1.0):
        total = np.zeros(3, dtype=np.uint32)
        for _ in range(n):
            total = add_mod(total, fp.encode(np.full(3, sign * 50.0), rng()), bits)
        np.testing.assert_array_equal(fp.decode(total), np.full(3, sign * n))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_decode_covers_the_signed_range(bits: int) -> None:
    fp = FixedPoint(bits=bits, scale=1.0, bound=1.0, max_summands=1)
    half = 2 ** (bits - 1)
    ring = np.array([0, 1, half - 1, half, 2**bits - 1], dtype=np.uint32)
    np.testing.assert_array_equal(fp.decode(ring), [0, 1, half - 1, -half, -1])


def test_decode_reduces_any_integer_mod_2_bits_and_refuses_floats() -> None:
    fp = FixedPoint(bits=8, scale=2.0, bound=1.0, max_summands=1)
    np.testing.assert_array_equal(fp.decode(np.array([256 + 2, -2], dtype=np.int64)), [1.0, -1.0])
    np.testing.assert_array_equal(fp.decode(np.array([[258]], dtype=np.uint32)), [[1.0]])
    with pytest.raises(ValueError, match="ring_values"):
        fp.decode(np.array([1.0]))


# --- add_mod / sub_mod -------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 13, 16, 31, 32])
def test_add_and_sub_mod_match_python_integers(bits: int) -> None:
    generator = rng(bits)
    a = generator.integers(0, 2**bits, size=1000, dtype=np.uint64).astype(np.uint32)
    b = generator.integers(0, 2**bits, size=1000, dtype=np.uint64).astype(np.uint32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        added, subtracted = add_mod(a, b, bits), sub_mod(a, b, bits)
    assert added.dtype == subtracted.dtype == np.uint32
    assert added.tolist() == [(int(x) + int(y)) % 2**bits for x, y in zip(a, b)]
    assert subtracted.tolist() == [(int(x) - int(y)) % 2**bits for x, y in zip(a, b)]


@pytest.mark.parametrize("bits", ALL_BITS)
def test_add_and_sub_mod_wrap_at_the_edges(bits: int) -> None:
    top = np.array([2**bits - 1, 2**bits - 1], dtype=np.uint32)
    assert add_mod(top, np.array([1, 2], dtype=np.uint32), bits).tolist() == [0, 1]
    assert sub_mod(np.array([0, 3], dtype=np.uint32), np.array([1, 5], dtype=np.uint32), bits).tolist() == [
        2**bits - 1,
        2**bits - 2,
    ]


def test_add_mod_does_not_modify_its_inputs() -> None:
    a = np.array([250], dtype=np.uint32)
    b = np.array([10], dtype=np.uint32)
    assert add_mod(a, b, 8).tolist() == [4]
    assert a.tolist() == [250] and b.tolist() == [10]


def test_add_and_sub_mod_refuse_mismatched_shapes_bad_dtypes_and_bits() -> None:
    a = np.zeros(3, dtype=np.uint32)
    with pytest.raises(ValueError, match="same shape"):
        add_mod(a, np.zeros(4, dtype=np.uint32), 32)
    with pytest.raises(ValueError, match="b must be an integer array"):
        sub_mod(a, np.zeros(3), 32)
    with pytest.raises(ValueError, match="bits"):
        add_mod(a, a, 7)
