"""Compressed updates for thin links: the wire layout both sides share.

An `Encoding` (the `UpdateEncoding` message) says how a push's payload is
compressed; the `TensorHeader` still lists the decoded tensors (the model's
names, shapes and dtypes). Each tensor is encoded on its own, in header order,
and the encodings are concatenated. For a tensor of n elements of itemsize s:

    k        = n                                   dense (top_k_fraction = 0)
             = min(n, max(1, ceil(f * n)))         top-k (f = top_k_fraction; IEEE double)
    indices  = k x uint32 LE, strictly increasing, < n        top-k only
    values   = k x the tensor's dtype (LE)                    quantize_bits = 0
             = lo: float32 LE, hi: float32 LE, then k codes   quantize_bits = b in {8, 4}
               of b bits (4 bits: two per byte, the first in the low nibble; an odd
               count leaves the last high nibble zero); a code c decodes to
               lo + c * (hi - lo) / (2^b - 1), computed in float64
    n = 0    -> nothing at all

so `encoded_size` knows the payload's size from the header alone, before a byte
of it arrives (the receiver checks `payload_bytes` and its size limit against it).

Quantization is unbiased stochastic rounding (QSGD, Alistarh et al. 2017, with a
per-tensor [min, max] grid): a value between two levels rounds up with
probability equal to its distance from the lower one, so E[decoded] = value and
the error averages out over clients and rounds. Top-k keeps the largest-magnitude
elements; what it drops is biased, so senders keep it as error feedback
(client_sdk/_compression.py) and add it to their next update.

Every failure on untrusted input raises `MalformedPayload` (INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from proto import tributary_pb2 as pb
from proto.tensors import MalformedPayload, TensorSpec, wire_dtype

QUANTIZE_BITS = (4, 8)
"""Bit widths a quantized update may use (0 in an encoding: not quantized)."""

MAX_ELEMENTS = 1 << 32
"""Top-k indices are uint32: a tensor of more elements cannot be sparsified."""

_BOUND_BYTES = 8  # lo and hi, float32 each

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]


@dataclass(frozen=True)
class Encoding:
    """How an update's values travel. Both zero: raw (no encoding)."""

    quantize_bits: int = 0
    top_k_fraction: float = 0.0

    def __post_init__(self) -> None:
        bits = self.quantize_bits
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (0, *QUANTIZE_BITS):
            raise MalformedPayload(f"quantize_bits must be 0 (off), 4 or 8, got {bits!r}")
        fraction = self.top_k_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise MalformedPayload(f"top_k_fraction must be a number, got {fraction!r}")
        if fraction != 0 and not (math.isfinite(fraction) and 0 < fraction <= 1):
            raise MalformedPayload(f"top_k_fraction must be 0 (dense) or in (0, 1], got {fraction!r}")
        object.__setattr__(self, "top_k_fraction", float(fraction))

    @property
    def is_raw(self) -> bool:
        return self.quantize_bits == 0 and self.top_k_fraction == 0

    @property
    def sparse(self) -> bool:
        return self.top_k_fraction > 0

    def describe(self) -> str:
        parts = [f"{self.quantize_bits}-bit" if self.quantize_bits else "", f"top-k {self.top_k_fraction:g}" if self.sparse else ""]
        return " + ".join(p for p in parts if p) or "raw"

    def to_pb(self) -> pb.UpdateEncoding:
        return pb.UpdateEncoding(quantize_bits=self.quantize_bits, top_k_fraction=self.top_k_fraction)

    @classmethod
    def from_pb(cls, message: pb.UpdateEncoding) -> Encoding:
        return cls(quantize_bits=int(message.quantize_bits), top_k_fraction=float(message.top_k_fraction))


RAW = Encoding()


def kept_count(n: int, encoding: Encoding) -> int:
    """k: how many of a tensor's n elements travel."""
    if n == 0 or not encoding.sparse:
        return n
    return min(n, max(1, math.ceil(encoding.top_k_fraction * n)))


def tensor_encoded_size(spec: TensorSpec, encoding: Encoding) -> int:
    n = math.prod(spec.shape)
    k = kept_count(n, encoding)
    if k == 0:
        return 0
    if encoding.sparse and n > MAX_ELEMENTS:
        raise MalformedPayload(f"tensor {spec.name!r} has {n} elements; top-k indices are uint32 (at most {MAX_ELEMENTS})")
    indices = 4 * k if encoding.sparse else 0
    if encoding.quantize_bits:
        values = _BOUND_BYTES + (k * encoding.quantize_bits + 7) // 8
    else:
        values = k * spec.dtype.itemsize
    return indices + values


def encoded_size(specs: Sequence[TensorSpec], encoding: Encoding) -> int:
    """Bytes of the payload that carries `specs` under `encoding`."""
    return sum(tensor_encoded_size(spec, encoding) for spec in specs)


def _check_quantizable(spec: TensorSpec, encoding: Encoding) -> None:
    if (encoding.quantize_bits or encoding.sparse) and spec.dtype.kind != "f":
        raise MalformedPayload(f"tensor {spec.name!r} is {spec.dtype.name}; only floating-point tensors can be compressed")


# -- encoding (senders) ---------------------------------------------------------------


@dataclass(frozen=True)
class EncodedTensor:
    data: bytes
    decoded: np.ndarray
    """What the receiver will decode (same shape and dtype as the input): the
    sender's error feedback is input - decoded."""


def encode_tensor(array: np.ndarray, encoding: Encoding, rng: np.random.Generator, name: str = "tensor") -> EncodedTensor:
    """Encode one tensor (see the module docstring); `rng` draws the rounding."""
    dtype = wire_dtype(array.dtype)
    spec = TensorSpec(name, dtype, tuple(int(d) for d in array.shape))
    _check_quantizable(spec, encoding)
    flat = np.ascontiguousarray(array, dtype=dtype).reshape(-1)
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        raise ValueError(f"tensor {name!r} holds NaN or Inf; nothing can be encoded")
    n = flat.size
    k = kept_count(n, encoding)
    tensor_encoded_size(spec, encoding)  # refuses tensors too large for uint32 indices
    parts: list[bytes] = []
    if encoding.sparse and k:
        if k == n:
            indices = np.arange(n, dtype=np.int64)
        else:
            indices = np.sort(np.argpartition(np.abs(flat), n - k)[n - k :])
        parts.append(indices.astype("<u4").tobytes())
        values = flat[indices]
    else:
        indices = None
        values = flat
    if encoding.quantize_bits and k:
        data, sent = _quantize(values, encoding.quantize_bits, rng)
        parts.append(data)
        sent = sent.astype(dtype)
    else:
        parts.append(values.astype(dtype).tobytes())
        sent = values
    if indices is None:
        decoded = sent.reshape(spec.shape)
    else:
        decoded = np.zeros(n, dtype=dtype)
        decoded[indices] = sent
        decoded = decoded.reshape(spec.shape)
    return EncodedTensor(b"".join(parts), decoded)


def _quantize(values: np.ndarray, bits: int, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """(bytes of lo, hi and the packed codes; the float64 values they decode to)."""
    work = values.astype(np.float64)
    lo = _float32_toward(float(work.min()), -math.inf)
    hi = _float32_toward(float(work.max()), math.inf)
    levels = (1 << bits) - 1
    step = (float(hi) - float(lo)) / levels
    if step > 0:
        position = (work - float(lo)) / step
        codes = np.floor(position)
        codes += rng.random(position.shape) < (position - codes)  # round up with probability frac: unbiased
        np.clip(codes, 0, levels, out=codes)
    else:
        codes = np.zeros_like(work)
    codes_u8 = codes.astype(np.uint8)
    data = np.array([lo, hi], dtype="<f4").tobytes() + _pack(codes_u8, bits)
    return data, _levels_to_values(codes_u8, float(lo), float(hi), bits)


def _float32_toward(value: float, direction: float) -> np.float32:
    """`value` as a float32, rounded away from the data (so [lo, hi] covers it)."""
    single = np.float32(value)
    if (direction < 0 and float(single) > value) or (direction > 0 and float(single) < value):
        single = np.nextafter(single, np.float32(direction))
    return single


def _pack(codes: np.ndarray, bits: int) -> bytes:
    if bits == 8:
        return codes.tobytes()
    padded = codes if codes.size % 2 == 0 else np.append(codes, np.uint8(0))
    packed: np.ndarray = (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8)
    return packed.tobytes()


def _levels_to_values(codes: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    step = (hi - lo) / ((1 << bits) - 1)
    return lo + codes.astype(np.float64) * step


# -- decoding (receivers) -------------------------------------------------------------


def decode_payload(specs: Sequence[TensorSpec], encoding: Encoding, payload: Buffer) -> dict[str, np.ndarray]:
    """The decoded tensors (the specs' dtypes and shapes, fresh arrays), or
    MalformedPayload naming the first thing wrong."""
    buffer = np.frombuffer(payload, dtype=np.uint8)
    expected = encoded_size(specs, encoding)
    if buffer.size != expected:
        raise MalformedPayload(f"encoded payload holds {buffer.size} bytes; {encoding.describe()} of these tensors takes {expected}")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for spec in specs:
        size = tensor_encoded_size(spec, encoding)
        tensors[spec.name] = _decode_tensor(spec, encoding, buffer[offset : offset + size])
        offset += size
    return tensors


def _decode_tensor(spec: TensorSpec, encoding: Encoding, data: np.ndarray) -> np.ndarray:
    _check_quantizable(spec, encoding)
    n = math.prod(spec.shape)
    k = kept_count(n, encoding)
    if k == 0:
        return np.zeros(spec.shape, dtype=spec.dtype)
    position = 0
    indices = None
    if encoding.sparse:
        indices = data[: 4 * k].view("<u4").astype(np.int64)
        position = 4 * k
        largest = int(indices.max())
        if largest >= n:
            raise MalformedPayload(f"tensor {spec.name!r}: top-k index {largest} is out of range for {n} elements")
        if k > 1 and not bool((np.diff(indices) > 0).all()):
            raise MalformedPayload(f"tensor {spec.name!r}: top-k indices must be strictly increasing (sorted, no duplicates)")
    rest = data[position:]
    if encoding.quantize_bits:
        lo, hi = (float(v) for v in rest[:_BOUND_BYTES].view("<f4"))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise MalformedPayload(f"tensor {spec.name!r}: quantization range [{lo}, {hi}] is not finite")
        if hi < lo:
            raise MalformedPayload(f"tensor {spec.name!r}: quantization range has hi {hi} < lo {lo}")
        codes = _unpack(spec, rest[_BOUND_BYTES:], k, encoding.quantize_bits)
        values = _levels_to_values(codes, lo, hi, encoding.quantize_bits).astype(spec.dtype)
    else:
        values = rest.view(spec.dtype).copy()
    if indices is None:
        return values.reshape(spec.shape)
    dense = np.zeros(n, dtype=spec.dtype)
    dense[indices] = values
    return dense.reshape(spec.shape)


def _unpack(spec: TensorSpec, packed: np.ndarray, k: int, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    codes = np.empty(2 * packed.size, dtype=np.uint8)
    codes[0::2] = packed & 0x0F
    codes[1::2] = packed >> 4
    if k % 2 and codes[-1] != 0:
        raise MalformedPayload(f"tensor {spec.name!r}: the padding nibble after the last 4-bit code must be zero")
    return codes[:k]


def encode_update(tensors: Mapping[str, np.ndarray], encoding: Encoding, rng: np.random.Generator) -> dict[str, EncodedTensor]:
    """Each tensor encoded, in the mapping's order."""
    return {name: encode_tensor(array, encoding, rng, name) for name, array in tensors.items()}
