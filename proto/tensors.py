"""Named tensors on the wire: a header of specs, then raw little-endian chunks.

This module is the one place that knows both the protobuf tensor messages and
numpy. Senders call `specs_of` + `header_to_pb` + `iter_chunks`; receivers call
`specs_from_pb` and feed chunks to a `PayloadAssembler`, which refuses a stream
that is truncated, longer than declared, or cut into oversized chunks, before it
allocates or copies more than the header promised.

Every failure on untrusted input raises `MalformedPayload` with a message that
names what was wrong; callers turn it into INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from proto import tributary_pb2 as pb

CHUNK_BYTES = 1 << 20
"""Largest chunk a sender emits and a receiver accepts (1 MiB)."""

MAX_MESSAGE_BYTES = 4 << 20
"""Largest single message the server accepts (gRPC's default, set explicitly):
a chunk plus room for a header listing many tensors."""

MAX_PAYLOAD_BYTES = 1 << 40
"""No header may declare more (1 TiB): far above any model, far below overflow."""

_DTYPE_TO_PB: dict[np.dtype, int] = {
    np.dtype("<f4"): pb.DTYPE_FLOAT32,
    np.dtype("<f8"): pb.DTYPE_FLOAT64,
    np.dtype("<f2"): pb.DTYPE_FLOAT16,
    np.dtype("<i8"): pb.DTYPE_INT64,
    np.dtype("<i4"): pb.DTYPE_INT32,
    np.dtype("|u1"): pb.DTYPE_UINT8,
    np.dtype("<u4"): pb.DTYPE_UINT32,
}
_PB_TO_DTYPE = {code: dtype for dtype, code in _DTYPE_TO_PB.items()}

class MalformedPayload(ValueError):
    """A tensor header or payload that cannot be what it claims to be."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of one tensor; what the header carries."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize  # Python ints: a hostile shape cannot wrap around

    def describe(self) -> str:
        return f"{self.name}: {self.dtype.name}{list(self.shape)}"


def wire_dtype(dtype: np.dtype) -> np.dtype:
    """The little-endian dtype that travels for `dtype`, or MalformedPayload."""
    little = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
    if little not in _DTYPE_TO_PB:
        supported = ", ".join(sorted(d.name for d in _DTYPE_TO_PB))
        raise MalformedPayload(f"dtype {np.dtype(dtype).name} cannot travel; supported: {supported}")
    return little


def specs_of(tensors: Mapping[str, np.ndarray]) -> list[TensorSpec]:
    return [TensorSpec(name, wire_dtype(array.dtype), tuple(int(d) for d in array.shape)) for name, array in tensors.items()]


def header_to_pb(specs: Sequence[TensorSpec]) -> pb.TensorHeader:
    return pb.TensorHeader(
        tensors=[pb.TensorSpec(name=s.name, dtype=_DTYPE_TO_PB[s.dtype], shape=s.shape) for s in specs],  # type: ignore[arg-type]
        payload_bytes=sum(s.nbytes for s in specs),
    )


def specs_from_pb(header: pb.TensorHeader, *, payload_size: Callable[[Sequence[TensorSpec]], int] | None = None) -> list[TensorSpec]:
    """Validate a received header on its own terms (not against any model).
    `payload_size`: the bytes the specs take on the wire when not raw (a
    compressed update, proto/compression.py); payload_bytes must equal it."""
    specs: list[TensorSpec] = []
    seen: set[str] = set()
    for index, spec in enumerate(header.tensors):
        if not spec.name:
            raise MalformedPayload(f"tensor #{index} has an empty name")
        if spec.name in seen:
            raise MalformedPayload(f"tensor name {spec.name!r} appears twice in the header")
        seen.add(spec.name)
        if spec.dtype not in _PB_TO_DTYPE:
            raise MalformedPayload(f"tensor {spec.name!r} has unsupported dtype code {spec.dtype}")
        if any(d < 0 for d in spec.shape):
            raise MalformedPayload(f"tensor {spec.name!r} has a negative dimension in shape {list(spec.shape)}")
        specs.append(TensorSpec(spec.name, _PB_TO_DTYPE[spec.dtype], tuple(spec.shape)))
        if specs[-1].nbytes > MAX_PAYLOAD_BYTES:
            raise MalformedPayload(f"tensor {spec.name!r} of shape {list(spec.shape)} is larger than {MAX_PAYLOAD_BYTES} bytes")
    declared = int(header.payload_bytes)
    actual = sum(s.nbytes for s in specs)
    if actual > MAX_PAYLOAD_BYTES:
        raise MalformedPayload(f"the header's tensors add up to {actual} bytes, above the {MAX_PAYLOAD_BYTES}-byte limit")
    if payload_size is not None:
        actual = payload_size(specs)
    if declared != actual:
        encoded = " encoded" if payload_size is not None else ""
        raise MalformedPayload(f"header declares {declared} payload bytes but its tensors need {actual}{encoded}")
    return specs


def as_wire_array(array: np.ndarray) -> np.ndarray:
    """C-contiguous, little-endian view (or copy) of `array`."""
    return np.ascontiguousarray(array, dtype=wire_dtype(array.dtype))


def iter_chunks(arrays: Iterable[np.ndarray], chunk_bytes: int = CHUNK_BYTES, start: int = 0) -> Iterator[bytes]:
    """Cut the concatenated bytes of `arrays` into chunks of exactly `chunk_bytes`
    (the last may be shorter). Small tensors share chunks, so a model of many
    biases does not turn into many tiny messages. With `start`, the bytes
    before it are skipped: a resumed transfer from a multiple of `chunk_bytes`
    sends exactly the chunks the whole stream would have sent from there."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    pending = bytearray()
    skip = start
    for array in arrays:
        # flattened first: memoryview cannot cast a view with a zero in its shape
        view = memoryview(as_wire_array(array).reshape(-1)).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer
        if skip >= len(view):
            skip -= len(view)
            continue
        pos, skip = skip, 0
        while pos < len(view):
            take = min(chunk_bytes - len(pending), len(view) - pos)
            if not pending and take == chunk_bytes:
                yield bytes(view[pos : pos + take])
            else:
                pending += view[pos : pos + take]
                if len(pending) == chunk_bytes:
                    yield bytes(pending)
                    pending.clear()
            pos += take
    if pending:
        yield bytes(pending)


class PayloadAssembler:
    """Collects the chunks of one payload into a buffer sized by the header.

    The buffer is allocated once from the header's byte count, which the caller
    has already checked against its own size limit, so a sender cannot make the
    receiver grow memory past what it agreed to.
    """

    def __init__(self, specs: Sequence[TensorSpec], max_chunk_bytes: int = CHUNK_BYTES) -> None:
        self._specs = list(specs)
        self._expected = sum(s.nbytes for s in self._specs)
        # np.empty, not bytearray: no zero-filling of memory every byte of which
        # is about to be overwritten (finish() refuses a buffer not fully written)
        self._buffer = np.empty(self._expected, dtype=np.uint8)
        self._view = memoryview(self._buffer)  # type: ignore[arg-type]  # ndarray is a buffer
        self._filled = 0
        self._max_chunk = max_chunk_bytes

    @property
    def received_bytes(self) -> int:
        return self._filled

    def add(self, data: bytes) -> None:
        if len(data) > self._max_chunk:
            raise MalformedPayload(f"chunk of {len(data)} bytes exceeds the {self._max_chunk}-byte chunk limit")
        end = self._filled + len(data)
        if end > self._expected:
            raise MalformedPayload(
                f"stream carries more than the {self._expected} payload bytes its header declared"
            )
        self._view[self._filled : end] = data
        self._filled = end

    @property
    def expected_bytes(self) -> int:
        return self._expected

    def rewind(self, offset: int) -> None:
        """Forget the bytes from `offset` on (a resumed stream sends them again)."""
        if not 0 <= offset <= self._filled:
            raise MalformedPayload(f"cannot resume at byte {offset}: only {self._filled} bytes were received")
        self._filled = offset

    def finish(self) -> dict[str, np.ndarray]:
        if self._filled != self._expected:
            raise MalformedPayload(
                f"stream ended after {self._filled} of {self._expected} payload bytes (truncated)"
            )
        return split_payload(self._specs, self._buffer)


def split_payload(specs: Sequence[TensorSpec], buffer: Union[bytes, bytearray, memoryview, np.ndarray]) -> dict[str, np.ndarray]:
    """Views of each tensor inside `buffer` (no copy), in header order."""
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for spec in specs:
        count = spec.nbytes // spec.dtype.itemsize
        tensors[spec.name] = np.frombuffer(buffer, dtype=spec.dtype, count=count, offset=offset).reshape(spec.shape)
        offset += spec.nbytes
    return tensors
