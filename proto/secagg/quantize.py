"""Fixed-point encoding of real-valued updates into the ring Z_2^bits.

Masks cancel only under exact modular arithmetic, so every client turns its
float update into ring elements (np.uint32, reduced mod 2^bits) before masking,
and the server decodes the unmasked *sum*. Three choices keep that sum right:

* Clipping to [-bound, bound] bounds every encoded value, which is what lets
  `FixedPoint` prove up front that the sum of a whole cohort cannot wrap
  around the signed range; a configuration that could overflow is refused at
  construction, not discovered as garbage after aggregation.
* Stochastic rounding (floor(x) + [u < frac(x)]) is unbiased, so quantization
  error averages out across clients and rounds instead of accumulating as a
  systematic drift; each value is still off by less than one step.
* Negative values use two's complement mod 2^bits, so plain modular addition
  of encodings is (signed) addition of the encoded integers.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

MIN_BITS = 8
MAX_BITS = 32

_FLOAT32_EXACT = 2**24
"""Largest magnitude below which every integer, and so every floor(x), is a float32."""


def validate_bits(bits: object) -> int:
    """Return `bits` as an int, or refuse it: encodings are stored as np.uint32,
    and fewer than 8 bits leaves no room for both values and cohort headroom."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    value = operator.index(bits)
    if not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}] (ring Z_2^bits stored as uint32), got {value}")
    return value


def _positive_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    result = float(value)
    if not math.isfinite(result) or result <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {result!r}")
    return result


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    result = operator.index(value)
    if result < 1:
        raise ValueError(f"{name} must be an int >= 1, got {result}")
    return result


def _signed_max(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _max_encoded(bound: float, scale: float) -> int:
    """Largest |integer| an encoding can produce: ceil(bound * scale) (rounding up
    never exceeds the ceiling of the clipped, scaled value)."""
    product = bound * scale
    if not math.isfinite(product):
        raise ValueError(f"bound x scale = {bound!r} x {scale!r} overflows a float; lower scale or bound")
    return math.ceil(product)


def _is_power_of_two(value: float) -> bool:
    return math.frexp(value)[0] == 0.5


@dataclass(frozen=True)
class FixedPoint:
    """How reals map to Z_2^bits, checked so a cohort's sum cannot overflow.

    A real v is clipped to [-bound, bound] and encoded as a stochastic rounding
    of v * scale. Construction refuses any configuration in which the sum of
    `max_summands` encodings could leave the signed range of the ring:
    max_summands * (ceil(bound * scale) + 1) <= 2^(bits-1) - 1.
    """

    bits: int
    scale: float
    bound: float
    max_summands: int

    def __post_init__(self) -> None:
        # normalise through object.__setattr__ (frozen) so equal configs compare and hash equal
        object.__setattr__(self, "bits", validate_bits(self.bits))
        object.__setattr__(self, "scale", _positive_finite("scale", self.scale))
        object.__setattr__(self, "bound", _positive_finite("bound", self.bound))
        object.__setattr__(self, "max_summands", _positive_int("max_summands", self.max_summands))
        self._check_headroom()

    def _check_headroom(self) -> None:
        per_value = _max_encoded(self.bound, self.scale) + 1
        total = self.max_summands * per_value
        limit = _signed_max(self.bits)
        if total > limit:
            raise ValueError(
                f"{self.max_summands} summands x (|v| <= {self.bound!r} x {self.scale!r} scale, "
                f"ceil + 1 = {per_value}) = {total} exceeds 2^{self.bits - 1} - 1 = {limit}, "
                "so the cohort's sum could overflow; lower scale, bound or max_summands (cohort size), or raise bits"
            )

    @classmethod
    def for_cohort(cls, *, bits: int, bound: float, max_summands: int) -> FixedPoint:
        """The configuration with the largest power-of-two scale (finest resolution)
        that passes the headroom check. Powers of two make v * scale exact in
        floating point. Refuses when even scale 1 would overflow: a scale below 1
        would round every |v| < 0.5 to zero, which is almost never intended."""
        bits = validate_bits(bits)
        bound = _positive_finite("bound", bound)
        max_summands = _positive_int("max_summands", max_summands)
        # ceil(bound * scale) <= limit  <=>  bound * scale <= limit, for integer limit
        limit = _signed_max(bits) // max_summands - 1
        if bound > limit:
            raise ValueError(
                f"no scale >= 1 fits: {max_summands} summands x (ceil({bound!r} x 1) + 1) exceeds "
                f"2^{bits - 1} - 1 = {_signed_max(bits)}; raise bits, or lower bound or max_summands"
            )
        return cls(bits=bits, scale=_largest_power_of_two_scale(bound, limit), bound=bound, max_summands=max_summands)

    @classmethod
    def for_values(cls, *, value_bits: int, bound: float, max_summands: int) -> FixedPoint:
        """Quantized secure aggregation: each member's values get 2^value_bits - 1
        levels over [-bound, bound] (scale (2^(value_bits-1) - 1) / bound), and the
        ring is only as wide as the sum of `max_summands` of them needs
        (`ring_bits_for`), so masked inputs travel in narrower words."""
        if isinstance(value_bits, bool) or not isinstance(value_bits, int) or not 2 <= value_bits <= 16:
            raise ValueError(f"value_bits must be an int in [2, 16], got {value_bits!r}")
        bound = _positive_finite("bound", bound)
        max_summands = _positive_int("max_summands", max_summands)
        scale = ((1 << (value_bits - 1)) - 1) / bound
        return cls(bits=ring_bits_for(value_bits, max_summands), scale=scale, bound=bound, max_summands=max_summands)

    @property
    def modulus(self) -> int:
        """2^bits: the ring's size; every encoding is < modulus."""
        return 1 << self.bits

    @property
    def resolution(self) -> float:
        """1 / scale: one quantization step. Each decoded value is within one step
        of its clipped input, so a sum of n is within n * resolution."""
        return 1.0 / self.scale

    def encode(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Clip, scale, stochastically round and reduce `values` into the ring.

        Returns np.uint32 of the same shape, each < 2^bits. `rng` supplies the
        rounding draws, so a seeded generator makes encoding reproducible.
        """
        array = _finite_real_array(values)
        work = self._work_dtype(array.dtype)
        # flat copy in the working dtype: our own buffer, so every step below is
        # in place, and 0-d input stays an array (ufuncs return scalars for 0-d)
        scaled = array.astype(work).reshape(-1)
        bound = _bound_in(work, self.bound)
        np.clip(scaled, -bound, bound, out=scaled)
        scaled *= work.type(self.scale)
        integer = np.floor(scaled)
        scaled -= integer  # now the fractional part, in [0, 1)
        round_up = rng.random(scaled.shape, dtype=work) < scaled
        encoded = integer.astype(np.int32)  # |floor(x)| + 1 <= 2^31 - 1, guaranteed by the headroom check
        encoded += round_up
        return _mask_bits(encoded.view(np.uint32), self.bits).reshape(array.shape)

    def decode(self, ring_values: np.ndarray) -> np.ndarray:
        """Read ring elements (integers, taken mod 2^bits) as signed integers in
        [-2^(bits-1), 2^(bits-1)) and divide by scale; float64 out."""
        ring = _ring_array("ring_values", ring_values)
        flat = ring.reshape(-1)
        if self.bits == 32:
            signed = flat.view(np.int32)
        else:
            half = np.int32(1 << (self.bits - 1))
            signed = (flat & np.uint32(self.modulus - 1)).view(np.int32)
            signed = (signed ^ half) - half  # sign-extend from `bits` to 32 bits
        return (signed.astype(np.float64) / self.scale).reshape(ring.shape)

    def _work_dtype(self, dtype: np.dtype) -> np.dtype:
        """float32 only where it is exact: float32 (or narrower) input, and a
        configuration in which v * scale is never rounded and floor/frac are exact
        (see `_float32_is_exact`); otherwise float64."""
        narrow = dtype.kind == "f" and dtype.itemsize <= 4
        return np.dtype(np.float32) if narrow and _float32_is_exact(self.scale, self.bound) else np.dtype(np.float64)


def ring_bits_for(value_bits: int, summands: int) -> int:
    """Ring width for the sum of `summands` values of `value_bits` signed bits:
    value_bits + ceil(log2 summands) + 1 (headroom for the rounding-up and the
    +1 of the overflow check), at least MIN_BITS."""
    return max(MIN_BITS, value_bits + math.ceil(math.log2(max(1, summands))) + 1)


def masked_dtype(bits: int) -> np.dtype:
    """The narrowest little-endian word that carries ring elements of `bits`
    (masked inputs are uniform over the whole ring, so that many bits travel)."""
    bits = validate_bits(bits)
    return np.dtype("|u1") if bits <= 8 else np.dtype("<u2") if bits <= 16 else np.dtype("<u4")


def _float32_is_exact(scale: float, bound: float) -> bool:
    """A power-of-two scale only shifts a float32's exponent (no rounding, as long
    as scale and bound sit well inside float32's normal range), and below 2^24
    every integer, hence floor(x) and x - floor(x), is exact in float32."""
    in_range = 2.0**-60 <= scale <= 2.0**60 and bound >= 2.0**-60
    return in_range and _is_power_of_two(scale) and bound * scale <= _FLOAT32_EXACT


def _largest_power_of_two_scale(bound: float, limit: int) -> float:
    """max 2^k with k >= 0 and bound * 2^k <= limit (caller ensures bound <= limit)."""
    exponent = max(0, math.floor(math.log2(limit / bound)))
    while bound * math.ldexp(1.0, exponent + 1) <= limit:  # log2 may round down
        exponent += 1
    while exponent > 0 and bound * math.ldexp(1.0, exponent) > limit:  # ... or up
        exponent -= 1
    return math.ldexp(1.0, exponent)


def _bound_in(dtype: np.dtype, bound: float) -> np.floating:
    """`bound` in `dtype`, rounded toward zero so clipping never exceeds it."""
    value: np.floating = dtype.type(bound)
    if float(value) > bound:
        value = np.nextafter(value, dtype.type(0))
    return value


def _finite_real_array(values: np.ndarray) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"values must be a real numeric array (float or int), got dtype {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError("values contain NaN or Inf; clean or clip the update before encoding")
    return array


def _ring_array(name: str, values: np.ndarray) -> np.ndarray:
    """`values` as np.uint32; other integer dtypes are reduced mod 2^32 (a ring
    element's residue does not depend on which integer type carried it)."""
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array of ring elements (np.uint32), got dtype {array.dtype}")
    return array.astype(np.uint32, copy=False)


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}; masks and encodings are elementwise")


def add_mod(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """(a + b) mod 2^bits, elementwise on uint32. uint32 array addition wraps
    mod 2^32 silently; a final mask reduces it to 2^bits (2^bits divides 2^32)."""
    bits = validate_bits(bits)
    left, right = _ring_array("a", a), _ring_array("b", b)
    _same_shape(left, right)
    return _mask_bits(np.add(left, right), bits)


def sub_mod(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """(a - b) mod 2^bits, elementwise on uint32; wraps like `add_mod`."""
    bits = validate_bits(bits)
    left, right = _ring_array("a", a), _ring_array("b", b)
    _same_shape(left, right)
    return _mask_bits(np.subtract(left, right), bits)


def _mask_bits(ring: np.ndarray, bits: int) -> np.ndarray:
    if bits < 32:
        ring &= np.uint32((1 << bits) - 1)
    return ring
